"""Darknet's [upsample] layer (upsample_layer.c, upsample_cpu in blas.c).

stride > 0: nearest-neighbour upsampling, out[y, x] = scale * in[y // stride, x // stride], (H*s, W*s).
stride < 0: Darknet's "reverse" mode, a downsample by s = -stride that SUMS each s x s block (not an average):
out[y, x] = scale * sum_{dy, dx < s} in[y*s + dy, x*s + dx], output (H // s, W // s). When H or W is not a multiple
of s we sum the blocks of the top-left (H//s)*s x (W//s)*s region; Darknet's flat indexing would instead read rows
as if the input were (W//s)*s wide (a misaligned read no real cfg triggers).
Memory-bound, so the kernels run serially: on 2 cores a parallel region costs more than it saves here.
"""
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _up_kernel(x, s, scale, out):
    n, c, h, w = x.shape
    for bc in range(n * c):
        b = bc // c
        k = bc % c
        for y in range(h):
            # one output row per input row, then copied: no division per element, and the copies vectorise
            first = out[b, k, y * s]
            src = x[b, k, y]
            for xx in range(w):
                v = scale * src[xx]
                for dx in range(s):
                    first[xx * s + dx] = v
            for dy in range(1, s):
                row = out[b, k, y * s + dy]
                for i in range(w * s):
                    row[i] = first[i]


@njit(cache=True, nogil=True)
def _block_sum_kernel(x, s, scale, out):
    # out[y, x] = scale * sum of the s x s block; used for the reverse forward and the upsample's backward
    n, c, out_h, out_w = out.shape
    for bc in range(n * c):
        b = bc // c
        k = bc % c
        for y in range(out_h):
            for xx in range(out_w):
                acc = x[b, k, y * s, xx * s] * scale
                for dy in range(s):
                    for dx in range(s):
                        if dy > 0 or dx > 0:
                            acc += scale * x[b, k, y * s + dy, xx * s + dx]
                out[b, k, y, xx] = acc


def upsample_output_shape(x_shape: tuple, stride: int) -> tuple:
    n, c, h, w = x_shape
    if stride == 0:
        raise ValueError("upsample: stride must not be 0")
    if stride > 0:
        return n, c, h * stride, w * stride
    return n, c, h // -stride, w // -stride


def upsample_forward(x: np.ndarray, stride: int, scale: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [upsample] with its `stride` (negative = summing downsample) and `scale` options."""
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"upsample: expected a float32/float64 NCHW array, got {x.dtype} {x.shape}")
    out_shape = upsample_output_shape(x.shape, stride)
    if out is None:
        out = np.empty(out_shape, x.dtype)
    elif out.shape != out_shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"upsample: out must be a C-contiguous {x.dtype} array of shape {out_shape}")
    x = np.ascontiguousarray(x)
    sc = x.dtype.type(scale)  # Darknet keeps scale as a float
    if stride > 0:
        _up_kernel(x, stride, sc, out)
    elif out.size:
        _block_sum_kernel(x, -stride, sc, out)
    return out


def upsample_backward(grad_out: np.ndarray, x_shape: tuple, stride: int, scale: float = 1.0) -> np.ndarray:
    """dL/dx for upsample_forward: sums over each input cell's copies (stride > 0) or spreads each block's
    gradient over its cells (stride < 0); both times scale."""
    grad_out = np.ascontiguousarray(grad_out)
    sc = grad_out.dtype.type(scale)
    if stride > 0:
        grad = np.empty(x_shape, grad_out.dtype)
        _block_sum_kernel(grad_out, stride, sc, grad)
        return grad
    s = -stride
    grad = np.zeros(x_shape, grad_out.dtype)
    n, c, oh, ow = grad_out.shape
    spread = np.empty((n, c, oh * s, ow * s), grad_out.dtype)
    _up_kernel(grad_out, s, sc, spread)
    grad[:, :, :oh * s, :ow * s] = spread
    return grad
