"""Darknet's batch normalisation: training mode (batch statistics) forward/backward, and inference.

Used after a convolution (statistics over N, H, W per channel), after a connected layer (over N per output; pass an
(N, C) array) and as the standalone `[batchnorm]` layer. Darknet's rules (AlexeyAB's batchnorm_layer.c / blas.c):

  - batch variance is the unbiased one: sum((x - mean)^2) / (m - 1), m = N*H*W (we use max(m - 1, 1) so that a
    single value does not divide by zero);
  - normalisation is (x - mean) / sqrt(variance + eps), eps = 1e-5 in training and at inference;
  - y = scales * x_norm + biases (the conv layer's biases are the batch-norm shift);
  - rolling statistics: rolling = rolling * (1 - momentum) + momentum * batch_statistic, with the unbiased variance.
    momentum = 0.01 is what AlexeyAB's GPU training (cuDNN and non-cuDNN) and pjreddie's darknet do; AlexeyAB's
    CPU-only build uses 0.1 in forward_batchnorm_layer (0.05 in its connected layer), so it is a parameter.

The backward is the exact derivative of this forward (Darknet's normalize_delta_cpu mixes 1/(sqrt(var)+eps) and an
m (not m - 1) variance gradient, which is not the derivative of what it computes):
    dx = (dxn - mean(dxn) - x_norm * sum(dxn * x_norm) / (m - 1)) / sqrt(var + eps),   dxn = dy * scales
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from darkprune.engine.activations import channel_view
from darkprune.engine.blas import limit_threads, threads_for

DARKNET_EPS = 1e-5
DARKNET_MOMENTUM = 0.01


@dataclass
class BatchNormCache:
    """What the training backward needs from its forward."""

    x_norm: np.ndarray   # same shape as the input
    mean: np.ndarray     # (C,) float64
    variance: np.ndarray  # (C,) float64, unbiased
    eps: float


def _view3(a: np.ndarray) -> np.ndarray:
    view = channel_view(a)
    if view is None:
        raise ValueError(f"batch norm needs an (N, C, H, W) or (N, C) array, got shape {a.shape}")
    return view


def _check(a: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be a float32/float64 numpy array")
    return np.ascontiguousarray(a)


def _vec(v, c: int, what: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(v, dtype=np.float64).reshape(-1))
    if arr.shape[0] != c:
        raise ValueError(f"{what} has {arr.shape[0]} entries for {c} channels")
    return arr


@njit(cache=True, parallel=True, nogil=True)
def _batch_stats(x, mean, var):
    nb, nc, ns = x.shape
    m = nb * ns
    denom = max(m - 1, 1)
    for c in prange(nc):
        total = 0.0
        for b in range(nb):
            for s in range(ns):
                total += x[b, c, s]
        mu = total / m
        sq = 0.0
        for b in range(nb):
            for s in range(ns):
                d = x[b, c, s] - mu
                sq += d * d
        mean[c] = mu
        var[c] = sq / denom


@njit(cache=True, parallel=True, nogil=True)
def _normalize_scale_shift(x, mean, var, eps, scales, biases, x_norm, y):
    """x_norm = (x - mean)/sqrt(var + eps); y = scales*x_norm + biases (x_norm may be a dummy (0,0,0) array)."""
    nb, nc, ns = x.shape
    keep = x_norm.shape[0] > 0
    for job in prange(nb * nc):
        b = job // nc
        c = job % nc
        inv = 1.0 / math.sqrt(var[c] + eps)
        mu = mean[c]
        g = scales[c]
        sh = biases[c]
        for s in range(ns):
            xn = (x[b, c, s] - mu) * inv
            if keep:
                x_norm[b, c, s] = xn
            y[b, c, s] = g * xn + sh


@njit(cache=True, parallel=True, nogil=True)
def _bn_backward(gy, x_norm, var, eps, scales, gx, gscale, gbias):
    nb, nc, ns = gy.shape
    m = nb * ns
    denom = max(m - 1, 1)
    for c in prange(nc):
        sum_g = 0.0
        sum_gxn = 0.0
        for b in range(nb):
            for s in range(ns):
                g = gy[b, c, s]
                sum_g += g
                sum_gxn += g * x_norm[b, c, s]
        gbias[c] = sum_g
        gscale[c] = sum_gxn
        gamma = scales[c]
        inv = 1.0 / math.sqrt(var[c] + eps)
        mean_dxn = gamma * sum_g / m
        proj = gamma * sum_gxn / denom
        for b in range(nb):
            for s in range(ns):
                gx[b, c, s] = (gamma * gy[b, c, s] - mean_dxn - x_norm[b, c, s] * proj) * inv


def batchnorm_forward_train(x, scales, biases, rolling_mean, rolling_variance, *, momentum=DARKNET_MOMENTUM,
                            eps=DARKNET_EPS, update_rolling=True, out=None):
    """Training-mode batch norm: returns (y, cache). Updates rolling_mean/rolling_variance in place (as Darknet does)
    unless update_rolling is False; they must then be writable float arrays."""
    x = _check(x, "x")
    x3 = _view3(x)
    nc = x3.shape[1]
    mean = np.empty(nc, np.float64)
    var = np.empty(nc, np.float64)
    x_norm = np.empty_like(x)
    y = np.empty_like(x) if out is None else out
    with limit_threads(threads_for(6.0 * x.size, 5.0 * x.nbytes)):
        _batch_stats(x3, mean, var)
        _normalize_scale_shift(x3, mean, var, float(eps), _vec(scales, nc, "scales"), _vec(biases, nc, "biases"),
                               _view3(x_norm), _view3(y))
    if update_rolling:
        for arr, stat, what in ((rolling_mean, mean, "rolling_mean"), (rolling_variance, var, "rolling_variance")):
            if not isinstance(arr, np.ndarray) or arr.shape != (nc,):
                raise ValueError(f"{what} must be a ({nc},) numpy array to be updated in place")
            arr *= 1.0 - momentum
            arr += (momentum * stat).astype(arr.dtype)
    return y, BatchNormCache(x_norm, mean, var, float(eps))


def batchnorm_backward_train(grad_y, cache: BatchNormCache, scales):
    """Backward of batchnorm_forward_train: (grad_x, grad_scales, grad_biases)."""
    grad_y = _check(grad_y, "grad_y")
    g3 = _view3(grad_y)
    nc = g3.shape[1]
    gx = np.empty_like(grad_y)
    gscale = np.empty(nc, np.float64)
    gbias = np.empty(nc, np.float64)
    with limit_threads(threads_for(6.0 * grad_y.size, 5.0 * grad_y.nbytes)):
        _bn_backward(g3, _view3(cache.x_norm), cache.variance, cache.eps, _vec(scales, nc, "scales"), _view3(gx),
                     gscale, gbias)
    return gx, gscale.astype(grad_y.dtype), gbias.astype(grad_y.dtype)


def batchnorm_forward_inference(x, scales, biases, rolling_mean, rolling_variance, eps=DARKNET_EPS, out=None):
    """Inference batch norm (rolling statistics), e.g. the standalone `[batchnorm]` layer:
    y = scales * (x - rolling_mean) / sqrt(rolling_variance + eps) + biases. pjreddie's [batchnorm] has no biases:
    pass None (zeros)."""
    x = _check(x, "x")
    x3 = _view3(x)
    nc = x3.shape[1]
    y = np.empty_like(x) if out is None else out
    biases = np.zeros(nc) if biases is None else biases
    dummy = np.empty((0, 0, 0), dtype=x.dtype)
    with limit_threads(threads_for(2.0 * x.size, 2.0 * x.nbytes)):
        _normalize_scale_shift(x3, _vec(rolling_mean, nc, "rolling_mean"),
                               _vec(rolling_variance, nc, "rolling_variance"), float(eps), _vec(scales, nc, "scales"),
                               _vec(biases, nc, "biases"), dummy, _view3(y))
    return y


def batchnorm_backward_inference(grad_y, x, scales, rolling_mean, rolling_variance, eps=DARKNET_EPS):
    """Backward with frozen (rolling) statistics: (grad_x, grad_scales, grad_biases)."""
    grad_y = _check(grad_y, "grad_y")
    x = _check(x, "x")
    g3 = _view3(grad_y)
    nc = g3.shape[1]
    shape = (1, nc, 1)
    inv = 1.0 / np.sqrt(_vec(rolling_variance, nc, "rolling_variance") + eps)
    x_norm = (_view3(x) - _vec(rolling_mean, nc, "rolling_mean").reshape(shape)) * inv.reshape(shape)
    grad_x = (g3 * (_vec(scales, nc, "scales") * inv).reshape(shape)).astype(grad_y.dtype).reshape(grad_y.shape)
    grad_scales = (g3 * x_norm).sum(axis=(0, 2)).astype(grad_y.dtype)
    grad_biases = g3.sum(axis=(0, 2)).astype(grad_y.dtype)
    return grad_x, grad_scales, grad_biases
