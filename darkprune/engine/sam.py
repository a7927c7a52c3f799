"""Darknet's [sam] layer (sam_layer.c, YOLOv4's spatial attention): out = x_prev * x_from elementwise, both of the
same shape. The layer's activation is applied by the network runner, not here.
Memory-bound elementwise products: numpy's loops are as fast as a kernel of ours would be.
"""
import numpy as np


def _check(x_prev, x_from):
    if x_prev.shape != x_from.shape or x_prev.dtype != x_from.dtype or x_prev.dtype not in (np.float32, np.float64):
        raise ValueError(f"sam: x_prev {x_prev.dtype} {x_prev.shape} and x_from {x_from.dtype} {x_from.shape} must "
                         f"be float32/float64 arrays of one shape and dtype")


def sam_forward(x_prev: np.ndarray, x_from: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    _check(x_prev, x_from)
    if out is None:
        out = np.empty(x_prev.shape, x_prev.dtype)
    elif out.shape != x_prev.shape or out.dtype != x_prev.dtype or not out.flags.c_contiguous:
        raise ValueError("sam: out must be C-contiguous with the inputs' shape and dtype")
    np.multiply(x_prev, x_from, out=out)
    return out


def sam_backward(grad_out: np.ndarray, x_prev: np.ndarray, x_from: np.ndarray):
    """Returns (grad_x_prev, grad_x_from) = (grad_out * x_from, grad_out * x_prev)."""
    _check(x_prev, x_from)
    g = np.ascontiguousarray(grad_out, dtype=x_prev.dtype)
    return np.multiply(g, x_from, out=np.empty_like(g)), np.multiply(g, x_prev, out=np.empty_like(g))
