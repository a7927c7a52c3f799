"""Darknet's [softmax] layer (softmax_layer.c, softmax_cpu in blas.c).

Darknet's CPU softmax works on each sample's flattened C*H*W values, split into `groups` equal contiguous parts,
one softmax per part: y = exp(x/T - max/T) / sum. For a classifier's (C, 1, 1) input with groups=1 that is the
softmax over channels. With spatial=True (Darknet's GPU-only option, the one a model trained with spatial=1 saw) the
softmax runs over the channels at each position instead, without temperature (as Darknet's GPU call).
softmax_tree (hierarchical softmax) is not supported.
Memory-bound, so the kernels run serially: on 2 cores a parallel region costs more than it saves here.
"""
import numpy as np
from numba import njit

from darkprune.engine.activations import channel_argmax


@njit(cache=True, nogil=True)
def _softmax_rows(x, temp, zero, out):
    # x, out: (rows, n); softmax of each row, in Darknet's order of operations: exp(x/T - max/T), then / sum
    rows, n = x.shape
    for r in range(rows):
        largest = x[r, 0]
        for i in range(1, n):
            if x[r, i] > largest:
                largest = x[r, i]
        total = zero
        for i in range(n):
            e = np.exp(x[r, i] / temp - largest / temp)
            out[r, i] = e
            total += e
        for i in range(n):
            out[r, i] = out[r, i] / total


@njit(cache=True, nogil=True)
def _softmax_channels(x, zero, out):
    # per (n, y, x): softmax over the channel axis of x (N, C, P)
    n_batch, c, p = x.shape
    for bp in range(n_batch * p):
        b = bp // p
        q = bp % p
        largest = x[b, channel_argmax(x, b, q), q]
        total = zero
        for k in range(c):
            e = np.exp(x[b, k, q] - largest)
            out[b, k, q] = e
            total += e
        for k in range(c):
            out[b, k, q] = out[b, k, q] / total


def _check(x, groups):
    if x.ndim < 2 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"softmax: expected a float32/float64 (N, ...) array, got {x.dtype} {x.shape}")
    per_sample = x[0].size if x.shape[0] else int(np.prod(x.shape[1:]))
    if groups < 1 or per_sample % groups:
        raise ValueError(f"softmax: {per_sample} values per sample cannot be split into groups={groups}")


def softmax_forward(x: np.ndarray, groups: int = 1, temperature: float = 1.0, spatial: bool = False,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [softmax] on x of shape (N, C, H, W) (or (N, K)); same shape out."""
    _check(x, groups)
    if out is None:
        out = np.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError("softmax: out must be C-contiguous with x's shape and dtype")
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    if spatial:
        _softmax_channels(x.reshape(n, x.shape[1], -1), x.dtype.type(0), out.reshape(n, x.shape[1], -1))
        return out
    _softmax_rows(x.reshape(n * groups, -1), x.dtype.type(temperature), x.dtype.type(0),
                  out.reshape(n * groups, -1))
    return out


def softmax_backward(grad_out: np.ndarray, y: np.ndarray, groups: int = 1, temperature: float = 1.0,
                     spatial: bool = False) -> np.ndarray:
    """General dL/dx from dL/dy and the forward output y: (1/T) * y * (g - sum(g*y)) over each softmax group."""
    y = np.ascontiguousarray(y)
    g = np.ascontiguousarray(grad_out, dtype=y.dtype)
    n = y.shape[0]
    if spatial:
        yv, gv = y.reshape(n, y.shape[1], -1), g.reshape(n, y.shape[1], -1)
        return (yv * (gv - (gv * yv).sum(axis=1, keepdims=True))).reshape(y.shape)
    yv, gv = y.reshape(n * groups, -1), g.reshape(n * groups, -1)
    grad = yv * (gv - (gv * yv).sum(axis=1, keepdims=True)) / y.dtype.type(temperature)
    return grad.reshape(y.shape)


def softmax_cross_entropy_backward(y: np.ndarray, truth: np.ndarray, groups: int = 1,
                                   temperature: float = 1.0) -> np.ndarray:
    """dL/dx of L = -sum(truth * log(y)) through the softmax: (y * sum(truth) - truth) / T per group, i.e.
    (y - truth) / T for one-hot or smoothed labels. Darknet's delta is the negative, truth - y, without 1/T."""
    y = np.ascontiguousarray(y)
    t = np.ascontiguousarray(truth, dtype=y.dtype)
    n = y.shape[0]
    yv, tv = y.reshape(n * groups, -1), t.reshape(n * groups, -1)
    return ((yv * tv.sum(axis=1, keepdims=True) - tv) / y.dtype.type(temperature)).reshape(y.shape)


def softmax_cross_entropy_loss(y: np.ndarray, truth: np.ndarray) -> float:
    """-sum(truth * log(y)) over the batch (Darknet's printed cost is -sum(log y) over every nonzero truth)."""
    t = np.asarray(truth, np.float64)
    yy = np.asarray(y, np.float64)
    mask = t != 0
    return float(-(t[mask] * np.log(yy[mask])).sum())
