"""The numba engine: one module per layer type (forward and backward together), the network runner, decoding.

Importing it configures threading first (see blas.py): OpenMP threads wait passively instead of spinning, so numba's
pool and the BLAS calls made from inside it do not fight over the cores.
"""
from . import blas  # noqa: F401  (must run before numba starts its thread pool)
