"""Connected layer backward (with and without training-mode batch norm) against central finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from darkprune.engine.activations import activate_, activation_backward
from darkprune.engine.connected import connected_backward, connected_forward_train

from conftest import central_grad

STEP = 1e-6


def numeric_grad(f, arr, weights):
    """d sum(f() * weights) / d arr by central differences."""
    return central_grad(lambda: float((f() * weights).sum()), arr, STEP)


def assert_grad(got, numeric, rel=1e-6):
    assert got.shape == numeric.shape
    assert np.abs(got - numeric).max() <= rel * max(1.0, np.abs(numeric).max())


@pytest.mark.parametrize("batch_normalize", [False, True])
@pytest.mark.parametrize("x_shape", [(4, 6), (3, 2, 2, 2)])
def test_connected_gradients(batch_normalize, x_shape):
    rng = np.random.default_rng(len(x_shape) + batch_normalize)
    x = rng.standard_normal(x_shape)
    inputs = int(np.prod(x_shape[1:]))
    w = rng.standard_normal((5, inputs))
    b = rng.standard_normal(5)
    scales = rng.uniform(0.5, 1.5, 5) if batch_normalize else None
    rm, rv = np.zeros(5), np.ones(5)

    def forward():
        return connected_forward_train(x, w, b, scales, rm, rv, update_rolling=False)[0]

    y, cache = connected_forward_train(x, w, b, scales, rm, rv, update_rolling=False)
    r = rng.standard_normal(y.shape)
    gx, gw, gb, gs = connected_backward(r, w, cache, scales)
    assert gx.shape == x.shape
    assert_grad(gx, numeric_grad(forward, x, r))
    assert_grad(gw, numeric_grad(forward, w, r))
    assert_grad(gb, numeric_grad(forward, b, r))
    if batch_normalize:
        assert_grad(gs, numeric_grad(forward, scales, r))
    else:
        assert gs is None
    assert connected_backward(r, w, cache, scales, need_grad_x=False)[0] is None


def test_connected_with_activation_chain():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 7))
    w = rng.standard_normal((4, 7))
    b = rng.standard_normal(4)

    def forward():
        return activate_(connected_forward_train(x, w, b)[0], "logistic")

    pre, cache = connected_forward_train(x, w, b)
    out = activate_(pre.copy(), "logistic")
    r = rng.standard_normal(out.shape)
    gx, gw, gb, _ = connected_backward(activation_backward(pre, out, r, "logistic"), w, cache)
    assert_grad(gx, numeric_grad(forward, x, r))
    assert_grad(gw, numeric_grad(forward, w, r))
    assert_grad(gb, numeric_grad(forward, b, r))


def test_float32_backward():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 30))
    w = rng.standard_normal((12, 30))
    b = rng.standard_normal(12)
    y, cache = connected_forward_train(x, w, b)
    r = rng.standard_normal(y.shape)
    ref = connected_backward(r, w, cache)
    y32, cache32 = connected_forward_train(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    got = connected_backward(r.astype(np.float32), w.astype(np.float32), cache32)
    for a, e in zip(got[:3], ref[:3]):
        assert a.dtype == np.float32 and np.abs(a - e).max() < 1e-4 * np.abs(e).max()
