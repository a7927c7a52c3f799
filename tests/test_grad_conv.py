"""Convolution and training-mode batch norm backward against central finite differences (float64), inputs and
parameters; plus the batch-norm training forward against numpy and the rolling-statistics update."""

from __future__ import annotations

import numpy as np
import pytest

from darkprune.engine.activations import activate_, activation_backward
from darkprune.engine.batchnorm import (
    batchnorm_backward_inference,
    batchnorm_backward_train,
    batchnorm_forward_inference,
    batchnorm_forward_train,
)
from darkprune.engine.conv import conv2d_backward, conv2d_forward

from conftest import central_grad

STEP = 1e-6


def numeric_grad(f, arr, weights, entries=None):
    """d sum(f() * weights) / d arr by central differences over every entry of arr (or only the flat indices
    `entries`; the others are left NaN). arr is modified in place and restored."""
    return central_grad(lambda: float((f() * weights).sum()), arr, STEP, entries)


def assert_grad(got, numeric, rel=1e-6):
    assert got.shape == numeric.shape
    checked = ~np.isnan(numeric)
    diff = np.abs(got - numeric)[checked]
    assert diff.max() <= rel * max(1.0, np.abs(numeric[checked]).max())


CONV_CASES = [
    # nb, c, h, w, n, k, stride, pad, dilation, groups
    (2, 3, 6, 5, 4, 3, 1, 1, 1, 1),
    (2, 3, 7, 7, 4, 3, 2, 1, 1, 1),
    (1, 4, 6, 6, 3, 1, 1, 0, 1, 1),
    (1, 2, 7, 6, 3, 1, 2, 0, 1, 1),
    (1, 2, 8, 8, 3, 3, 1, 0, 2, 1),
    (2, 4, 6, 6, 4, 3, 1, 1, 1, 2),
    (2, 4, 7, 7, 4, 3, 2, 1, 1, 4),   # depthwise stride 2
    (1, 3, 6, 6, 6, 3, 1, 2, 2, 3),   # depthwise, multiplier 2, dilated
    (1, 3, 9, 8, 3, 5, 2, 2, 1, 3),   # depthwise 5x5 stride 2 (parity-split path)
    (1, 2, 7, 7, 2, 3, 3, 1, 1, 2),   # depthwise stride 3 (row-by-row path)
    (1, 2, 5, 5, 2, 2, 2, 0, 1, 1),   # even kernel
    (1, 16, 5, 6, 16, 3, 1, 1, 1, 1),  # Winograd-sized (forward path differs, backward is shared)
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gradients(case):
    nb, c, h, w, n, k, stride, pad, dil, groups = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((nb, c, h, w))
    wt = rng.standard_normal((n, c // groups, k, k))
    b = rng.standard_normal(n)

    def forward():
        return conv2d_forward(x, wt, b, stride, stride, pad, dil, groups)

    r = rng.standard_normal(forward().shape)
    gx, gw, gb = conv2d_backward(x, wt, r, stride, stride, pad, dil, groups)
    if c * h * w * nb > 400:  # keep the big case quick: a sample of entries
        sample = rng.choice(wt.size, 60, replace=False)
        assert_grad(gw, numeric_grad(forward, wt, r, sample))
        assert_grad(gx, numeric_grad(forward, x, r, rng.choice(x.size, 60, replace=False)))
    else:
        assert_grad(gx, numeric_grad(forward, x, r))
        assert_grad(gw, numeric_grad(forward, wt, r))
    assert_grad(gb, numeric_grad(forward, b, r))
    gx2, gw2, _ = conv2d_backward(x, wt, r, stride, stride, pad, dil, groups, need_grad_x=False)
    assert gx2 is None and np.allclose(gw2, gw)


def test_conv_gradient_float32_matches_float64():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 6, 9, 9))
    wt = rng.standard_normal((8, 3, 3, 3))
    gy = rng.standard_normal((2, 8, 9, 9))
    ref = conv2d_backward(x, wt, gy, 1, 1, 1, 1, 2)
    got = conv2d_backward(x.astype(np.float32), wt.astype(np.float32), gy.astype(np.float32), 1, 1, 1, 1, 2)
    for a, b in zip(got, ref):
        assert a.dtype == np.float32
        assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()


# ---------------------------------------------------------------------------------------------------------------
# batch norm


@pytest.mark.parametrize("shape", [(3, 4, 3, 2), (5, 3)])
def test_batchnorm_train_forward_is_darknets(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + 1
    c = shape[1]
    scales, biases = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    rm0, rv0 = rm.copy(), rv.copy()
    y, _ = batchnorm_forward_train(x, scales, biases, rm, rv)
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    bshape = (1, c) + (1,) * (len(shape) - 2)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes, ddof=1)  # Darknet divides by m - 1
    expected = scales.reshape(bshape) * (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5)
    assert np.allclose(y, expected + biases.reshape(bshape), atol=1e-12)
    assert np.allclose(rm, 0.99 * rm0 + 0.01 * mean) and np.allclose(rv, 0.99 * rv0 + 0.01 * var)
    # momentum is a parameter (AlexeyAB's CPU build uses 0.1)
    batchnorm_forward_train(x, scales, biases, rm, rv, momentum=0.1)
    assert np.allclose(rm, 0.9 * (0.99 * rm0 + 0.01 * mean) + 0.1 * mean)


def test_batchnorm_inference_forward():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    scales, biases = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y = batchnorm_forward_inference(x, scales, biases, mean, var)
    b = (1, 3, 1, 1)
    expected = scales.reshape(b) * (x - mean.reshape(b)) / np.sqrt(var.reshape(b) + 1e-5) + biases.reshape(b)
    assert y.dtype == np.float32 and np.abs(y - expected).max() < 1e-5
    y0 = batchnorm_forward_inference(x, scales, None, mean, var)  # pjreddie's [batchnorm]: no biases
    assert np.abs(y0 - (expected - biases.reshape(b))).max() < 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (4, 5), (1, 2, 1, 1)])
def test_batchnorm_train_gradients(shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape) * 2
    c = shape[1]
    scales, biases = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rm, rv = np.zeros(c), np.ones(c)

    def forward():
        return batchnorm_forward_train(x, scales, biases, rm, rv, update_rolling=False)[0]

    y, cache = batchnorm_forward_train(x, scales, biases, rm, rv, update_rolling=False)
    r = rng.standard_normal(y.shape)
    gx, gs, gb = batchnorm_backward_train(r, cache, scales)
    assert_grad(gx, numeric_grad(forward, x, r))
    assert_grad(gs, numeric_grad(forward, scales, r))
    assert_grad(gb, numeric_grad(forward, biases, r))


def test_batchnorm_inference_gradients():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 2, 2))
    scales, biases = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)

    def forward():
        return batchnorm_forward_inference(x, scales, biases, mean, var)

    r = rng.standard_normal(x.shape)
    gx, gs, gb = batchnorm_backward_inference(r, x, scales, mean, var)
    assert_grad(gx, numeric_grad(forward, x, r))
    assert_grad(gs, numeric_grad(forward, scales, r))
    assert_grad(gb, numeric_grad(forward, biases, r))


@pytest.mark.parametrize("activation", ["leaky", "mish", "swish", "logistic"])
def test_conv_batchnorm_activation_chain(activation):
    """A Darknet training conv layer: y = act(BN_train(conv(x, W))) (BN's biases are the conv biases)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, 5, 5))
    wt = rng.standard_normal((4, 3, 3, 3)) * 0.5
    scales, biases = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    rm, rv = np.zeros(4), np.ones(4)

    def forward():
        z = conv2d_forward(x, wt, None, 1, 1, 1)
        y, _ = batchnorm_forward_train(z, scales, biases, rm, rv, update_rolling=False)
        return activate_(y, activation)

    z = conv2d_forward(x, wt, None, 1, 1, 1)
    pre, cache = batchnorm_forward_train(z, scales, biases, rm, rv, update_rolling=False)
    out = activate_(pre.copy(), activation)
    r = rng.standard_normal(out.shape)
    g_pre = activation_backward(pre, out, r, activation)
    g_z, g_scales, g_biases = batchnorm_backward_train(g_pre, cache, scales)
    g_x, g_w, _ = conv2d_backward(x, wt, g_z, 1, 1, 1)
    assert_grad(g_w, numeric_grad(forward, wt, r))
    assert_grad(g_x, numeric_grad(forward, x, r))
    assert_grad(g_scales, numeric_grad(forward, scales, r))
    assert_grad(g_biases, numeric_grad(forward, biases, r))
