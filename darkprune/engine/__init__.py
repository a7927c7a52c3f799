"""The numba engine: one module per layer type (forward and backward together), the network runner, decoding.

Importing it configures threading first (see blas.py): OpenMP workers spin briefly between parallel regions (so the
next layer's kernel finds them awake) and BLAS runs single-threaded inside numba's threads, so the two pools do not
fight over the cores.
"""
from . import blas  # noqa: F401  (must run before numba starts its thread pool)
