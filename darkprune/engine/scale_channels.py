"""Darknet's [scale_channels] layer (scale_channels_layer.c), the squeeze-and-excitation multiply.

As in Darknet, the layer's input (the previous layer, x_prev) holds the scales and the `from` layer (x_from) is the
feature map being scaled, which also gives the output's shape:
- default: x_prev is (N, C, 1, 1), out[b, c, y, x] = x_prev[b, c] * x_from[b, c, y, x];
- scale_wh=1: x_prev is (N, 1, H, W), out[b, c, y, x] = x_prev[b, 0, y, x] * x_from[b, c, y, x].
The layer's activation is applied by the network runner, not here.
The products are numpy broadcasts; the scales' gradients are serial kernels (memory-bound: on 2 cores a
parallel region costs more than it saves here).
"""
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _grad_scales_channel(grad_out, x_from, grad_scales):
    n, c, h, w = x_from.shape
    for bc in range(n * c):
        b = bc // c
        k = bc % c
        acc = 0.0
        for y in range(h):
            for xx in range(w):
                acc += grad_out[b, k, y, xx] * x_from[b, k, y, xx]
        grad_scales[b, k, 0, 0] = acc


@njit(cache=True, nogil=True)
def _grad_scales_wh(grad_out, x_from, grad_scales):
    n, c, h, w = x_from.shape
    for by in range(n * h):
        b = by // h
        y = by % h
        for xx in range(w):
            acc = 0.0
            for k in range(c):
                acc += grad_out[b, k, y, xx] * x_from[b, k, y, xx]
            grad_scales[b, 0, y, xx] = acc


def _check(x_prev, x_from, scale_wh):
    for a, name in ((x_prev, "x_prev"), (x_from, "x_from")):
        if a.ndim != 4 or a.dtype not in (np.float32, np.float64):
            raise ValueError(f"scale_channels: {name} must be a float32/float64 NCHW array, got {a.dtype} {a.shape}")
    n, c, h, w = x_from.shape
    want = (n, 1, h, w) if scale_wh else (n, c, 1, 1)
    if x_prev.shape != want or x_prev.dtype != x_from.dtype:
        raise ValueError(f"scale_channels: x_prev must be {x_from.dtype} {want} to scale x_from {x_from.shape}"
                         f"{' with scale_wh' if scale_wh else ''}; got {x_prev.dtype} {x_prev.shape}")


def scale_channels_forward(x_prev: np.ndarray, x_from: np.ndarray, scale_wh: bool = False,
                           out: np.ndarray | None = None) -> np.ndarray:
    """out = x_from scaled per channel (or per position with scale_wh) by x_prev; shape of x_from."""
    _check(x_prev, x_from, scale_wh)
    if out is None:
        out = np.empty(x_from.shape, x_from.dtype)
    elif out.shape != x_from.shape or out.dtype != x_from.dtype or not out.flags.c_contiguous:
        raise ValueError("scale_channels: out must be C-contiguous with x_from's shape and dtype")
    np.multiply(x_prev, x_from, out=out)  # x_prev's 1-sized axes broadcast: one product per element
    return out


def scale_channels_backward(grad_out: np.ndarray, x_prev: np.ndarray, x_from: np.ndarray, scale_wh: bool = False):
    """Returns (grad_x_prev, grad_x_from): dL/dscales summed over each scale's cells, and grad_out * scales."""
    _check(x_prev, x_from, scale_wh)
    g = np.ascontiguousarray(grad_out, dtype=x_from.dtype)
    xf = np.ascontiguousarray(x_from)
    grad_prev = np.empty(x_prev.shape, x_from.dtype)
    if scale_wh:
        _grad_scales_wh(g, xf, grad_prev)
    else:
        _grad_scales_channel(g, xf, grad_prev)
    grad_from = np.empty(x_from.shape, x_from.dtype)
    np.multiply(x_prev, g, out=grad_from)
    return grad_prev, grad_from
