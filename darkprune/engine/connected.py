"""Darknet's `[connected]` layer: forward (inference and training) and backward; the caller applies the activation.

The input is flattened per image in Darknet's memory order, C*H*W (an NCHW array reshaped to (N, C*H*W)).
weights are (outputs, inputs) as Darknet stores them (the .weights reader un-transposes files written with
major/minor > 1000). Without batch norm: y = x @ W.T + biases. With batch norm (AlexeyAB's connected_layer.c):
y = scales * normalize(x @ W.T) + biases, statistics over the batch per output (see batchnorm.py); at inference it
uses the rolling statistics, which `fold_batchnorm` can fold into (W, b) once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from darkprune.engine.batchnorm import (
    DARKNET_EPS,
    DARKNET_MOMENTUM,
    BatchNormCache,
    batchnorm_backward_train,
    batchnorm_forward_inference,
    batchnorm_forward_train,
)
from darkprune.engine.blas import limit_threads, matmul, threads_for
from darkprune.engine.conv import fold_batchnorm

__all__ = ["connected_forward", "connected_forward_train", "connected_backward", "ConnectedCache",
           "fold_batchnorm"]


@dataclass
class ConnectedCache:
    """What connected_backward needs from a training forward."""

    x2d: np.ndarray                  # (N, inputs) view of the input
    x_shape: tuple
    bn: BatchNormCache | None = None


@njit(cache=True, parallel=True, nogil=True)
def _add_bias_rows_kernel(y, bias):
    nb, n = y.shape
    for b in prange(nb):
        row = y[b]
        for j in range(n):
            row[j] += bias[j]


def _add_bias_rows(y, bias):
    with limit_threads(threads_for(y.size, 2.0 * y.nbytes)):
        _add_bias_rows_kernel(y, bias)


def _flatten(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError("x must be a float32/float64 numpy array")
    if x.ndim < 1:
        raise ValueError("x must have a batch axis")
    x2d = np.ascontiguousarray(x).reshape(x.shape[0], -1)
    if x2d.shape[1] != weights.shape[1]:
        raise ValueError(f"connected layer takes {weights.shape[1]} inputs per image, got {x2d.shape[1]} "
                         f"(input shape {x.shape})")
    return x2d


def _weights(weights, dtype) -> np.ndarray:
    w = np.ascontiguousarray(np.asarray(weights, dtype=dtype))
    if w.ndim != 2:
        raise ValueError(f"connected weights must be (outputs, inputs), got shape {w.shape}")
    return w


def connected_forward(x, weights, biases, scales=None, rolling_mean=None, rolling_variance=None, *,
                      eps=DARKNET_EPS, out=None):
    """Inference: (N, outputs) = x @ W.T + biases, or with batch norm (pass scales, rolling_mean,
    rolling_variance) scales * (x @ W.T - mean) / sqrt(var + eps) + biases. Activation is the caller's."""
    w = _weights(weights, x.dtype)
    x2d = _flatten(x, w)
    y = matmul(x2d, w, out, trans_b=True)
    if scales is not None:
        return batchnorm_forward_inference(y, scales, biases, rolling_mean, rolling_variance, eps=eps, out=y)
    _add_bias_rows(y, np.ascontiguousarray(np.asarray(biases, dtype=y.dtype)))
    return y


def connected_forward_train(x, weights, biases, scales=None, rolling_mean=None, rolling_variance=None, *,
                            momentum=DARKNET_MOMENTUM, eps=DARKNET_EPS, update_rolling=True):
    """Training forward: returns (y, cache). With batch norm the batch statistics are used and the rolling ones are
    updated in place (rolling = rolling*(1-momentum) + momentum*batch)."""
    w = _weights(weights, x.dtype)
    x2d = _flatten(x, w)
    z = matmul(x2d, w, trans_b=True)
    if scales is None:
        _add_bias_rows(z, np.ascontiguousarray(np.asarray(biases, dtype=z.dtype)))
        return z, ConnectedCache(x2d, x.shape, None)
    y, bn = batchnorm_forward_train(z, scales, biases, rolling_mean, rolling_variance, momentum=momentum, eps=eps,
                                    update_rolling=update_rolling, out=z)
    return y, ConnectedCache(x2d, x.shape, bn)


def connected_backward(grad_y, weights, cache: ConnectedCache, scales=None, *, need_grad_x=True):
    """Gradients given dL/dy (pre-activation): (grad_x shaped like the input or None, grad_w, grad_b, grad_scales or
    None). Pass the layer's scales when it has batch norm."""
    grad_y = np.ascontiguousarray(grad_y)
    w = _weights(weights, grad_y.dtype)
    grad_scales = None
    if cache.bn is not None:
        if scales is None:
            raise ValueError("connected_backward: this layer has batch norm, pass its scales")
        grad_z, grad_scales, grad_b = batchnorm_backward_train(grad_y, cache.bn, scales)
    else:
        grad_z = grad_y
        grad_b = grad_y.sum(axis=0)
    grad_w = matmul(grad_z, cache.x2d, trans_a=True)
    grad_x = None
    if need_grad_x:
        grad_x = matmul(grad_z, w).reshape(cache.x_shape)
    return grad_x, grad_w, grad_b, grad_scales
