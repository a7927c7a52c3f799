"""Every activation's backward against central finite differences of its forward, in float64."""

from __future__ import annotations

import numpy as np
import pytest

from darkprune.engine.activations import ACTIVATION_NAMES, activate_, activation_backward, is_cross_channel

STEP = 1e-6


def points_away_from_kinks(rng, n):
    """Random inputs over the interesting range, kept clear of the piecewise functions' break points."""
    x = np.concatenate([rng.uniform(-8, 8, n), rng.uniform(-25, 25, n // 4)])
    breaks = np.array([-20.0, -4.0, -2.0, -1.0, 0.0, 1.0, 4.0, 6.0, 20.0])
    x = x[np.min(np.abs(x[:, None] - breaks[None, :]), axis=1) > 1e-3]
    frac = x - np.round(x)  # stair breaks at every integer
    return x[np.abs(frac) > 1e-3]


@pytest.mark.parametrize("name", [n for n in ACTIVATION_NAMES if not is_cross_channel(n)])
def test_elementwise_gradient(name):
    rng = np.random.default_rng(0)
    x = points_away_from_kinks(rng, 400)
    y = activate_(x.copy(), name)
    g = rng.standard_normal(x.shape)
    got = activation_backward(x, y, g, name)
    numeric = (activate_(x + STEP, name) - activate_(x - STEP, name)) / (2 * STEP) * g
    assert np.abs(got - numeric).max() <= 1e-6 * max(1.0, np.abs(numeric).max())


@pytest.mark.parametrize("name", [n for n in ACTIVATION_NAMES if is_cross_channel(n)])
@pytest.mark.parametrize("shape", [(2, 4, 3, 2), (3, 5)])
def test_cross_channel_gradient(name, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 2
    x[np.abs(x) < 1e-3] = 0.5  # normalize_channels has a relu kink at 0
    g = rng.standard_normal(shape)
    y = activate_(x.copy(), name)
    got = activation_backward(x, y, g, name)
    numeric = np.empty_like(x)
    for i in np.ndindex(*shape):
        xp = x.copy()
        xm = x.copy()
        xp[i] += STEP
        xm[i] -= STEP
        numeric[i] = ((activate_(xp, name) - activate_(xm, name)) * g).sum() / (2 * STEP)
    assert np.abs(got - numeric).max() <= 1e-6 * max(1.0, np.abs(numeric).max())


def test_backward_float32_and_out_aliasing():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    y = activate_(x.copy(), "mish")
    g = rng.standard_normal(x.shape).astype(np.float32)
    expected = activation_backward(x.astype(np.float64), y.astype(np.float64), g.astype(np.float64), "mish")
    got = activation_backward(x, y, g, "mish", out=g)  # in place over the incoming gradient
    assert got is g
    assert np.abs(got - expected).max() < 1e-5
    x2 = rng.standard_normal((2, 3, 2, 2))
    y2 = activate_(x2.copy(), "normalize_channels_softmax")
    g2 = rng.standard_normal(x2.shape)
    ref = activation_backward(x2, y2, g2.copy(), "normalize_channels_softmax")
    assert np.allclose(activation_backward(x2, y2, g2, "normalize_channels_softmax", out=g2), ref)
