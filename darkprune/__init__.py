"""darkprune: make Darknet (YOLO) networks smaller and faster without losing accuracy.

    import darkprune as dp
    model = dp.load("yolo.cfg", "yolo.weights")
"""
__version__ = "0.1.0"

from .darknet import Model, load          # noqa: E402
from .errors import DarkpruneError        # noqa: E402

__all__ = ["__version__", "Model", "load", "DarkpruneError"]
