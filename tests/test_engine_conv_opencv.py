"""Convolution (and its fused activation / batch norm) against OpenCV's Darknet importer on tiny cfgs.

Each test writes a 1-2 layer Darknet cfg and a .weights file built with numpy (header int32 0,2,5 + int64 seen; per
conv: biases, [scales, rolling_mean, rolling_variance], weights), runs it through cv2.dnn.readNetFromDarknet and
compares with our kernels. OpenCV folds batch norm with eps 1e-6, so we fold with 1e-6 here.
OpenCV's importer supports the activations linear, logistic, relu, leaky, tanh, mish, swish; it ignores `dilation`
(dilation is checked against the numpy reference in test_engine_conv.py instead).
"""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from darkprune.engine.conv import conv2d_forward, fold_batchnorm, prepare_conv2d  # noqa: E402

OPENCV_EPS = 1e-6


def conv_params(rng, c, n, k, groups, batch_normalize):
    fan_in = (c // groups) * k * k
    p = {
        "weights": (rng.standard_normal((n, c // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32),
        "biases": (rng.standard_normal(n) * 0.2).astype(np.float32),
    }
    if batch_normalize:
        p["scales"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        p["rolling_mean"] = (rng.standard_normal(n) * 0.3).astype(np.float32)
        p["rolling_variance"] = rng.uniform(0.01, 2.0, n).astype(np.float32)
    return p


def write_net(folder, c, h, w, layers):
    """layers: list of (cfg_options dict, params dict). Returns (cfg path, weights path)."""
    lines = ["[net]", "batch=1", f"width={w}", f"height={h}", f"channels={c}", ""]
    blobs = [np.array([0, 2, 5], np.int32).tobytes(), np.array([0], np.int64).tobytes()]
    for options, params in layers:
        lines.append("[convolutional]")
        lines += [f"{k}={v}" for k, v in options.items()]
        lines.append("")
        blobs.append(params["biases"].tobytes())
        if options.get("batch_normalize", 0):
            blobs += [params["scales"].tobytes(), params["rolling_mean"].tobytes(),
                      params["rolling_variance"].tobytes()]
        blobs.append(params["weights"].tobytes())
    cfg = folder / "net.cfg"
    weights = folder / "net.weights"
    cfg.write_text("\n".join(lines), encoding="ascii")
    weights.write_bytes(b"".join(blobs))
    return str(cfg), str(weights)


def opencv_forward(cfg, weights, x):
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    cv2.setNumThreads(1)
    net.setInput(x)
    return net.forward()


def ours(x, options, params):
    k = options["size"]
    pad = k // 2 if options.get("pad", 0) else options.get("padding", 0)
    if options.get("batch_normalize", 0):
        w, b = fold_batchnorm(params["weights"], params["biases"], params["scales"], params["rolling_mean"],
                              params["rolling_variance"], eps=OPENCV_EPS)
    else:
        w, b = params["weights"], params["biases"]
    s = options.get("stride", 1)
    return conv2d_forward(x, w, b, s, s, pad, 1, options.get("groups", 1), activation=options["activation"])


def assert_close(ours_y, ref, rel=1e-5):
    """Max abs difference within rel * the output's max magnitude (Winograd-sized layers get 1e-4, the project's
    parity bar: both OpenCV and we then use Winograd transforms, which round differently)."""
    assert ours_y.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(ours_y - ref).max())
    assert err <= rel * scale, f"max abs diff {err:.3g} vs output scale {scale:.3g}"


CASES = [
    # (id, c, h, w, options)
    ("3x3_pad1", 3, 13, 11, dict(filters=5, size=3, stride=1, pad=1)),
    ("3x3_pad0", 4, 9, 10, dict(filters=6, size=3, stride=1, padding=0)),
    ("3x3_stride2", 5, 12, 13, dict(filters=7, size=3, stride=2, pad=1)),
    ("3x3_stride2_pad0", 5, 11, 12, dict(filters=4, size=3, stride=2, padding=0)),
    ("1x1", 6, 8, 9, dict(filters=5, size=1, stride=1, pad=1)),
    ("1x1_stride2", 6, 9, 9, dict(filters=5, size=1, stride=2, pad=1)),
    ("5x5", 3, 12, 12, dict(filters=4, size=5, stride=1, pad=1)),
    ("groups2", 8, 10, 10, dict(filters=6, size=3, stride=1, pad=1, groups=2)),
    ("groups4_stride2", 8, 10, 10, dict(filters=8, size=3, stride=2, pad=1, groups=4)),
    ("depthwise", 8, 12, 12, dict(filters=8, size=3, stride=1, pad=1, groups=8)),
    ("depthwise_stride2", 12, 13, 13, dict(filters=12, size=3, stride=2, pad=1, groups=12)),
    ("depthwise_5x5", 6, 10, 10, dict(filters=6, size=5, stride=1, pad=1, groups=6)),
    ("winograd_sized", 24, 17, 15, dict(filters=20, size=3, stride=1, pad=1)),          # F(2x2): 40 tiles of 4x4
    ("winograd_f4x4_sized", 16, 40, 35, dict(filters=18, size=3, stride=1, pad=1)),    # F(4x4): 180 tiles
    ("winograd_sized_pad0", 16, 14, 14, dict(filters=32, size=3, stride=1, padding=0)),
]


@pytest.mark.parametrize("batch_normalize", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv_matches_opencv(tmp_path, case, batch_normalize):
    name, c, h, w, options = case
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    options = dict(batch_normalize=batch_normalize, **options, activation="leaky")
    params = conv_params(rng, c, options["filters"], options["size"], options.get("groups", 1), batch_normalize)
    cfg, weights = write_net(tmp_path, c, h, w, [(options, params)])
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    assert_close(ours(x, options, params), opencv_forward(cfg, weights, x), rel=1e-4 if "winograd" in name else 1e-5)


OPENCV_ACTIVATIONS = ["linear", "logistic", "relu", "leaky", "tanh", "mish", "swish"]


@pytest.mark.parametrize("activation", OPENCV_ACTIVATIONS)
@pytest.mark.parametrize("shape", ["3x3", "winograd", "depthwise", "1x1"])
def test_activation_matches_opencv(tmp_path, activation, shape):
    rng = np.random.default_rng(7)
    c, h, w = {"winograd": (16, 10, 9)}.get(shape, (6, 10, 9))
    options = {
        "3x3": dict(filters=5, size=3, stride=1, pad=1),
        "winograd": dict(filters=16, size=3, stride=1, pad=1),
        "depthwise": dict(filters=c, size=3, stride=1, pad=1, groups=c),
        "1x1": dict(filters=7, size=1, stride=1, pad=0),
    }[shape]
    options = dict(batch_normalize=1, **options, activation=activation)
    params = conv_params(rng, c, options["filters"], options["size"], options.get("groups", 1), 1)
    params["weights"] *= 3.0  # reach the saturating parts of logistic/tanh and mish's negative tail
    cfg, weights = write_net(tmp_path, c, h, w, [(options, params)])
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    assert_close(ours(x, options, params), opencv_forward(cfg, weights, x), rel=1e-4 if shape == "winograd" else 1e-5)


def test_two_layer_network_matches_opencv(tmp_path):
    rng = np.random.default_rng(3)
    c, h, w = 3, 20, 18
    first = dict(batch_normalize=1, filters=16, size=3, stride=2, pad=1, activation="leaky")
    second = dict(batch_normalize=1, filters=24, size=3, stride=1, pad=1, activation="mish")
    p1 = conv_params(rng, c, 16, 3, 1, 1)
    p2 = conv_params(rng, 16, 24, 3, 1, 1)
    cfg, weights = write_net(tmp_path, c, h, w, [(first, p1), (second, p2)])
    x = rng.random((3, c, h, w), dtype=np.float32)
    y = ours(ours(x, first, p1), second, p2)
    assert_close(y, opencv_forward(cfg, weights, x), rel=1e-4)


def test_plan_reuse_and_every_path_agree_with_opencv(tmp_path):
    """One 3x3 stride-1 layer: each forced forward path gives OpenCV's output, and a plan can be called repeatedly."""
    rng = np.random.default_rng(11)
    c, h, w = 16, 12, 12
    options = dict(batch_normalize=1, filters=16, size=3, stride=1, pad=1, activation="leaky")
    params = conv_params(rng, c, 16, 3, 1, 1)
    cfg, weights = write_net(tmp_path, c, h, w, [(options, params)])
    fw, fb = fold_batchnorm(params["weights"], params["biases"], params["scales"], params["rolling_mean"],
                            params["rolling_variance"], eps=OPENCV_EPS)
    for path in ("im2col", "winograd"):
        plan = prepare_conv2d(fw, fb, 1, 1, 1, 1, 1, "leaky", path=path)
        for batch in (1, 3):
            x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
            assert_close(plan(x), opencv_forward(cfg, weights, x), rel=1e-4)


def test_batchnorm_eps_is_what_separates_us_from_opencv(tmp_path):
    """With small variances, folding with Darknet's eps (1e-5) visibly differs from OpenCV (1e-6), and 1e-6 matches:
    the parity tests above would catch a wrong eps."""
    rng = np.random.default_rng(5)
    c, h, w = 4, 8, 8
    options = dict(batch_normalize=1, filters=6, size=3, stride=1, pad=1, activation="linear")
    params = conv_params(rng, c, 6, 3, 1, 1)
    params["rolling_variance"] = np.full(6, 0.002, np.float32)
    cfg, weights = write_net(tmp_path, c, h, w, [(options, params)])
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    ref = opencv_forward(cfg, weights, x)
    assert_close(ours(x, options, params), ref)
    w5, b5 = fold_batchnorm(params["weights"], params["biases"], params["scales"], params["rolling_mean"],
                            params["rolling_variance"], eps=1e-5)
    darknet_eps = conv2d_forward(x, w5, b5, 1, 1, 1)
    assert np.abs(darknet_eps - ref).max() > 1e-3 * np.abs(ref).max()
