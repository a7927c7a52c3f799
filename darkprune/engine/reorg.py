"""Darknet's [reorg] (the YOLOv2 passthrough) and AlexeyAB's [reorg3d]: permutations of each sample's values.

Both are built on Darknet's reorg_cpu(x, W, H, C, stride, forward, out) index map: for k < C, j < H, i < W,
    a = i + W*(j + H*k)                                    (an index into a (C, H, W) view)
    z = (i*s + off % s) + W*s*((j*s + off // s) + H*s*c2)  (an index into a (C/s^2, H*s, W*s) view),
    with c2 = k % (C/s^2), off = k // (C/s^2);
forward=1 writes out[z] = x[a], forward=0 writes out[a] = x[z].

- [reorg] (AlexeyAB's REORG_OLD, pjreddie's reorg, OpenCV's Reorg): called with the INPUT's (W, H, C).
  Not reversed (forward=0) this reads the input as if it were (C/s^2, H*s, W*s) and writes an output viewed as
  (C, H, W), which is then taken as (C*s^2, H/s, W/s): not a plain space-to-depth, but what YOLOv2 was trained with.
  Reversed (forward=1) it is a plain depth-to-space: out[c2, j*s + off//s, i*s + off%s] = in[off*C/s^2 + c2, j, i].
- [reorg3d] (AlexeyAB's REORG): called with the OUTPUT's (W, H, C). Not reversed this is the plain space-to-depth
  out[off*C_in + c, j, i] = in[c, j*s + off//s, i*s + off%s] (off = dy*s + dx). Reversed it uses the output's dims
  again, which needs C_in divisible by s^4 and gives Darknet's own (odd) permutation.
Backward passes apply the inverse permutation (Darknet calls reorg_cpu with the other `forward` flag).
Memory-bound, so the kernels run serially: on 2 cores a parallel region costs more than it saves here.
"""
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _reorg_cpu(x, W, H, C, s, forward, out):
    n_batch = x.shape[0]
    cp = C // (s * s)
    for bk in range(n_batch * C):
        b = bk // C
        k = bk % C
        c2 = k % cp
        off = k // cp
        dx = off % s
        dy = off // s
        for j in range(H):
            for i in range(W):
                a = i + W * (j + H * k)
                z = (i * s + dx) + W * s * ((j * s + dy) + H * s * c2)
                if forward:
                    out[b, z] = x[b, a]
                else:
                    out[b, a] = x[b, z]


def _geometry(x_shape: tuple, stride: int, reverse: bool, kind: str):
    """(W, H, C) passed to reorg_cpu, the forward flag, and the output shape, for [reorg] or [reorg3d]."""
    n, c, h, w = x_shape
    s = stride
    if s < 1:
        raise ValueError(f"{kind}: stride must be >= 1, got {s}")
    if reverse:
        out_shape = (n, c // (s * s), h * s, w * s)
        if c % (s * s):
            raise ValueError(f"{kind}: reverse needs channels divisible by stride^2; got {c} channels, stride {s}")
    else:
        out_shape = (n, c * s * s, h // s, w // s)
        if h % s or w % s:
            raise ValueError(f"{kind}: a {w}x{h} input is not divisible by stride {s}")
    if kind == "reorg":
        dims = (w, h, c)
        if c % (s * s):
            raise ValueError(f"reorg: needs channels divisible by stride^2 (Darknet's index map); got {c}, stride {s}")
    else:
        dims = (out_shape[3], out_shape[2], out_shape[1])
        if dims[2] % (s * s) or dims[2] < s * s:
            raise ValueError(f"reorg3d: {'reverse ' if reverse else ''}needs {dims[2]} (the output channels) to be a "
                             f"positive multiple of stride^2={s * s}")
    return dims, (1 if reverse else 0), out_shape


def _run(x, stride, reverse, kind, out, backward=False):
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{kind}: expected a float32/float64 NCHW array, got {x.dtype} {x.shape}")
    dims, forward, out_shape = _geometry(x.shape, stride, reverse, kind)
    if out is None:
        out = np.empty(out_shape, x.dtype)
    elif out.shape != out_shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"{kind}: out must be a C-contiguous {x.dtype} array of shape {out_shape}")
    n = x.shape[0]
    _reorg_cpu(np.ascontiguousarray(x).reshape(n, -1), dims[0], dims[1], dims[2], stride, forward,
               out.reshape(n, -1))
    return out


def _run_backward(grad_out, x_shape, stride, reverse, kind):
    dims, forward, out_shape = _geometry(tuple(x_shape), stride, reverse, kind)
    if grad_out.shape != out_shape:
        raise ValueError(f"{kind}_backward: grad_out has shape {grad_out.shape}, expected {out_shape}")
    n = x_shape[0]
    grad = np.empty(x_shape, grad_out.dtype)
    _reorg_cpu(np.ascontiguousarray(grad_out).reshape(n, -1), dims[0], dims[1], dims[2], stride, 1 - forward,
               grad.reshape(n, -1))
    return grad


def reorg_output_shape(x_shape: tuple, stride: int, reverse: bool = False) -> tuple:
    """Output (N, C, H, W) of [reorg] and [reorg3d] (the same shapes)."""
    n, c, h, w = x_shape
    if reverse:
        return n, c // (stride * stride), h * stride, w * stride
    return n, c * stride * stride, h // stride, w // stride


def reorg_forward(x: np.ndarray, stride: int, reverse: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [reorg] (YOLOv2's passthrough, = OpenCV's Reorg layer)."""
    return _run(x, stride, reverse, "reorg", out)


def reorg_backward(grad_out: np.ndarray, x_shape: tuple, stride: int, reverse: bool = False) -> np.ndarray:
    return _run_backward(grad_out, x_shape, stride, reverse, "reorg")


def reorg3d_forward(x: np.ndarray, stride: int, reverse: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """AlexeyAB's [reorg3d] (plain space-to-depth when not reversed)."""
    return _run(x, stride, reverse, "reorg3d", out)


def reorg3d_backward(grad_out: np.ndarray, x_shape: tuple, stride: int, reverse: bool = False) -> np.ndarray:
    return _run_backward(grad_out, x_shape, stride, reverse, "reorg3d")
