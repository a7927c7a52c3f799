"""Forward activations against Darknet's formulas (AlexeyAB's activations.h/.c) written out independently in numpy,
plus hand-computed values. OpenCV-supported activations are also checked through OpenCV in
test_engine_conv_opencv.py."""

from __future__ import annotations

import numpy as np
import pytest

from darkprune.engine.activations import (
    ACTIVATION_NAMES,
    activate_,
    activate_array,
    activation_code,
    is_cross_channel,
)
from darkprune.errors import DarkpruneError


def softplus_thresholded(x, threshold=20.0):
    middle = np.log1p(np.exp(np.minimum(x, threshold)))
    return np.where(x > threshold, x, np.where(x < -threshold, np.exp(np.minimum(x, 0)), middle))


def reference(name, x):
    """Darknet's activation `name` on float64 x (elementwise ones)."""
    with np.errstate(over="ignore"):
        if name == "linear":
            return x.copy()
        if name == "logistic":
            return 1 / (1 + np.exp(-x))
        if name == "loggy":
            return 2 / (1 + np.exp(-x)) - 1
        if name == "relu":
            return x * (x > 0)
        if name == "relu6":
            return np.clip(x, 0, 6)
        if name == "elu":
            return np.where(x >= 0, x, np.exp(np.minimum(x, 0)) - 1)
        if name == "selu":
            return np.where(x >= 0, 1.0507 * x, 1.0507 * 1.6732 * (np.exp(np.minimum(x, 0)) - 1))
        if name == "gelu":
            return 0.5 * x * (1 + np.tanh(0.797885 * x + 0.035677 * x ** 3))
        if name == "relie":
            return np.where(x > 0, x, 0.01 * x)
        if name == "ramp":
            return x * (x > 0) + 0.1 * x
        if name in ("leaky", "revleaky"):
            return np.where(x > 0, x, 0.1 * x)
        if name == "tanh":
            return np.tanh(x)
        if name == "plse":
            return np.where(x < -4, 0.01 * (x + 4), np.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5))
        if name == "stair":
            n = np.floor(x)
            return np.where(n % 2 == 0, np.floor(x / 2), (x - n) + np.floor(x / 2))
        if name == "hardtan":
            return np.clip(x, -1, 1)
        if name == "lhtan":
            return np.where(x < 0, 0.001 * x, np.where(x > 1, 0.001 * (x - 1) + 1, x))
        if name == "mish":
            return x * np.tanh(softplus_thresholded(x))
        if name == "hard_mish":
            return np.where(x > 0, x, np.where(x > -2, x * x / 2 + x, 0.0))
        if name == "swish":
            return x / (1 + np.exp(-x))
    raise KeyError(name)


def reference_channels(name, x):
    """normalize_channels* over axis 1 of (N, C, ...), Darknet's eps 1e-4."""
    if name == "normalize_channels":
        pos = np.where(x > 0, x, 0.0)
        return pos / (1e-4 + pos.sum(axis=1, keepdims=True))
    shift = x.max(axis=1, keepdims=True) if name.endswith("maxval") else 0.0
    e = np.exp(x - shift)
    return e / (1e-4 + e.sum(axis=1, keepdims=True))


ELEMENTWISE = [n for n in ACTIVATION_NAMES if not is_cross_channel(n)]
CROSS = [n for n in ACTIVATION_NAMES if is_cross_channel(n)]


def test_every_darknet_name_is_known():
    expected = {"linear", "logistic", "loggy", "relu", "relu6", "elu", "selu", "gelu", "relie", "ramp", "leaky",
                "revleaky", "tanh", "plse", "stair", "hardtan", "lhtan", "mish", "hard_mish", "swish",
                "normalize_channels", "normalize_channels_softmax", "normalize_channels_softmax_maxval"}
    assert set(ACTIVATION_NAMES) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_matches_darknet_formula(name, dtype):
    x = np.concatenate([np.linspace(-30, 30, 2401), [-20.0, 20.0, -4.0, 4.0, -2.0, -1.0, 0.0, 1.0, 6.0, 95.0, -95.0],
                        np.random.default_rng(0).standard_normal(5000) * 3]).astype(dtype)
    y = activate_(x.copy(), name)
    ref = reference(name, x.astype(np.float64))
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert np.all(np.isfinite(y))
    assert np.abs(y - ref).max() <= tol * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", CROSS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7)])
def test_normalize_channels_matches_darknet_formula(name, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 2
    y = activate_(x.copy(), name)
    assert np.abs(y - reference_channels(name, x)).max() < 1e-12
    x32 = x.astype(np.float32)
    assert np.abs(activate_(x32.copy(), name) - reference_channels(name, x)).max() < 1e-6


def test_hand_computed_values():
    x = np.array([-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5, 7.0])
    assert np.allclose(activate_array(x, "leaky"), [-0.3, -0.2, -0.1, -0.05, 0, 0.5, 1, 2.5, 7])
    assert np.allclose(activate_array(x, "relu6"), [0, 0, 0, 0, 0, 0.5, 1, 2.5, 6])
    assert np.allclose(activate_array(x, "hard_mish"), [0, 0, -0.5, -0.375, 0, 0.5, 1, 2.5, 7])
    assert np.allclose(activate_array(x, "ramp"), [-0.3, -0.2, -0.1, -0.05, 0, 0.55, 1.1, 2.75, 7.7])
    assert np.allclose(activate_array(x, "plse"), [0.125 * v + 0.5 for v in x[:-1]] + [0.01 * 3 + 1])
    # stair: flat on [2k, 2k+1), slope 1 on [2k+1, 2k+2)
    assert np.allclose(activate_array(np.array([0.5, 1.5, 2.25, 3.75, -0.5, -1.5]), "stair"),
                       [0.0, 0.5, 1.0, 1.75, -0.5, -1.0])
    assert np.allclose(activate_array(np.array([0.0]), "mish"), [0.0])
    assert np.allclose(activate_array(np.array([1.0]), "mish"), [np.tanh(np.log1p(np.e))])
    assert np.allclose(activate_array(np.array([1.0]), "selu"), [1.0507])
    assert np.allclose(activate_array(np.array([0.0]), "logistic"), [0.5])


def test_large_inputs_stay_finite():
    """Darknet's elu/selu multiply an overflowed exp(x) by zero (NaN) for large x; we return the intended value."""
    x = np.array([100.0, 1000.0], np.float32)
    for name in ELEMENTWISE:
        assert np.all(np.isfinite(activate_(x.copy(), name))), name


def test_in_place_and_shapes():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = x.copy()
    assert activate_(y, "leaky") is y
    assert np.allclose(y, np.where(x > 0, x, 0.1 * x))
    big = np.random.default_rng(3).standard_normal(100_003).astype(np.float32)  # several parallel chunks
    assert np.allclose(activate_(big.copy(), "swish"), reference("swish", big.astype(np.float64)), atol=1e-6)


def test_unknown_activation_is_a_user_error():
    with pytest.raises(DarkpruneError, match="'leakyy'"):
        activate_(np.zeros(3, np.float32), "leakyy")
    with pytest.raises(DarkpruneError):
        activation_code("")


def test_cross_channel_needs_channel_axis():
    with pytest.raises(DarkpruneError):
        activate_(np.zeros(5, np.float32), "normalize_channels")
