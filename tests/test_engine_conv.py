"""Convolution forward against a plain numpy loop reference, on every forward path, plus geometry and batch-norm
folding checks. (OpenCV parity is in test_engine_conv_opencv.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from darkprune.engine.activations import activate_
from darkprune.engine.conv import (
    PATHS,
    conv2d_forward,
    conv_output_size,
    fold_batchnorm,
    prepare_conv2d,
)
from darkprune.errors import DarkpruneError


def reference_conv(x, w, b, stride_x, stride_y, pad, dilation, groups, out_h=None, out_w=None):
    """Direct definition, float64: y[b,f,oy,ox] = bias[f] + sum_{c,ky,kx} w[f,c,ky,kx] * xpad[...]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    nb, c, h, wd = x.shape
    n, cg, kh, kw = w.shape
    oh = (h + 2 * pad - dilation * (kh - 1) - 1) // stride_y + 1 if out_h is None else out_h
    ow = (wd + 2 * pad - dilation * (kw - 1) - 1) // stride_x + 1 if out_w is None else out_w
    hp = max(h + 2 * pad, (oh - 1) * stride_y + (kh - 1) * dilation + 1)
    wp = max(wd + 2 * pad, (ow - 1) * stride_x + (kw - 1) * dilation + 1)
    xp = np.zeros((nb, c, hp, wp))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    y = np.zeros((nb, n, oh, ow))
    ng = n // groups
    for f in range(n):
        g = f // ng
        for ky in range(kh):
            for kx in range(kw):
                # the input samples that tap (ky, kx) meets at every output position
                window = xp[:, g * cg:(g + 1) * cg,
                            ky * dilation: ky * dilation + (oh - 1) * stride_y + 1: stride_y,
                            kx * dilation: kx * dilation + (ow - 1) * stride_x + 1: stride_x]
                y[:, f] += np.einsum("bchw,c->bhw", window, w[f, :, ky, kx])
        if b is not None:
            y[:, f] += b[f]
    return y


def check(x, w, b, sx, sy, pad, dil, groups, path=None, activation="linear", rel=1e-5, **kw):
    y = conv2d_forward(x, w, b, sx, sy, pad, dil, groups, activation=activation, path=path, **kw)
    ref = reference_conv(x, w, b, sx, sy, pad, dil, groups, kw.get("out_h"), kw.get("out_w"))
    activate_(ref, activation)
    assert y.shape == ref.shape
    assert y.dtype == x.dtype
    scale = max(np.abs(ref).max(), 1e-12)
    assert np.abs(y - ref).max() <= rel * scale


CASES = [
    # nb, c, h, w, n, k, stride_x, stride_y, pad, dilation, groups
    (2, 3, 9, 8, 5, 3, 1, 1, 1, 1, 1),
    (2, 3, 9, 8, 5, 3, 1, 1, 0, 1, 1),
    (1, 4, 10, 11, 6, 3, 2, 2, 1, 1, 1),
    (1, 4, 10, 11, 6, 3, 2, 1, 1, 1, 1),   # stride_x != stride_y
    (2, 5, 8, 8, 4, 1, 1, 1, 0, 1, 1),
    (2, 5, 8, 8, 4, 1, 2, 2, 0, 1, 1),
    (1, 3, 9, 9, 4, 2, 2, 2, 0, 1, 1),     # even kernel
    (1, 3, 12, 12, 4, 5, 1, 1, 2, 1, 1),
    (1, 4, 12, 12, 4, 3, 1, 1, 2, 2, 1),   # dilation 2, same size
    (1, 4, 13, 12, 4, 3, 2, 2, 3, 3, 1),   # dilation 3, stride 2
    (2, 6, 9, 9, 4, 3, 1, 1, 1, 1, 2),     # groups
    (2, 6, 9, 9, 6, 3, 2, 2, 1, 1, 3),
    (2, 6, 9, 9, 6, 3, 1, 1, 1, 1, 6),     # depthwise
    (2, 6, 10, 9, 6, 3, 2, 2, 1, 1, 6),    # depthwise stride 2
    (1, 4, 10, 10, 8, 3, 1, 1, 1, 1, 4),   # depthwise with channel multiplier 2
    (1, 4, 11, 11, 4, 5, 1, 1, 4, 2, 4),   # depthwise dilated
    (3, 16, 9, 7, 16, 3, 1, 1, 1, 1, 1),   # Winograd-sized
    (2, 17, 13, 6, 18, 3, 1, 1, 0, 1, 1),
    (1, 16, 5, 5, 24, 3, 1, 1, 2, 1, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_default_path_matches_reference(case):
    nb, c, h, w, n, k, sx, sy, pad, dil, groups = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((nb, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((n, c // groups, k, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    check(x, wt, b, sx, sy, pad, dil, groups, activation="leaky", rel=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_reference(path, dtype):
    rng = np.random.default_rng(1)
    if path == "depthwise":
        shapes = [(2, 6, 9, 10, 6, 3, 1, 1, 1, 1, 6), (1, 3, 8, 8, 6, 3, 2, 2, 1, 1, 3)]
    elif path == "gemm1x1":
        shapes = [(3, 7, 5, 6, 9, 1, 1, 1, 0, 1, 1)]
    elif path == "winograd":
        shapes = [(2, 5, 9, 10, 6, 3, 1, 1, 1, 1, 1), (1, 3, 4, 4, 2, 3, 1, 1, 0, 1, 1),
                  (1, 3, 6, 7, 2, 3, 1, 1, 2, 1, 1), (5, 2, 1, 1, 3, 3, 1, 1, 1, 1, 1)]
    elif path == "direct3x3":
        # column stride 1 and 2 (row stride either), pads 0-2, odd and even filter counts, odd and even sizes
        shapes = [(2, 3, 9, 10, 6, 3, 1, 1, 1, 1, 1), (1, 3, 9, 8, 5, 3, 2, 2, 1, 1, 1),
                  (3, 1, 7, 6, 3, 3, 2, 1, 1, 1, 1), (1, 2, 8, 9, 1, 3, 1, 2, 0, 1, 1),
                  (2, 5, 6, 7, 4, 3, 2, 2, 2, 1, 1), (1, 3, 2, 2, 2, 3, 1, 1, 1, 1, 1)]
    else:
        shapes = [(2, 5, 9, 10, 6, 3, 1, 1, 1, 1, 1), (3, 6, 7, 7, 4, 3, 2, 2, 1, 2, 2),
                  (9, 4, 3, 3, 5, 3, 1, 1, 1, 1, 1)]  # many small images: several images per block
    for nb, c, h, w, n, k, sx, sy, pad, dil, groups in shapes:
        x = rng.standard_normal((nb, c, h, w)).astype(dtype)
        wt = rng.standard_normal((n, c // groups, k, k)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        rel = 1e-12 if dtype == np.float64 else 2e-5
        check(x, wt, b, sx, sy, pad, dil, groups, path=path, activation="relu", rel=rel)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_both_tile_sizes_match_reference(dtype):
    """The Winograd path runs F(2x2) on calls of at most 49 F(4x4) tiles and F(4x4) above: odd and even sizes,
    pads 0-2, both sides of the switch (batch 1 and 8 of a 13x13 image, as in yolov3-tiny's last layers)."""
    rng = np.random.default_rng(7)
    for nb, c, h, w, n, pad in ((1, 6, 13, 13, 5, 1), (8, 6, 13, 13, 5, 1), (1, 4, 26, 26, 3, 1),
                                (3, 5, 11, 8, 4, 0), (2, 3, 7, 9, 2, 2), (5, 3, 16, 16, 4, 1)):
        x = rng.standard_normal((nb, c, h, w)).astype(dtype)
        wt = rng.standard_normal((n, c, 3, 3)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        rel = 1e-12 if dtype == np.float64 else 2e-5
        check(x, wt, b, 1, 1, pad, 1, 1, path="winograd", activation="leaky", rel=rel)


def test_large_image_uses_several_blocks():
    """Enough rows/columns that the im2col and 1x1 kernels split an image into several jobs."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 70, 90)).astype(np.float32)
    for path, k, pad in (("im2col", 3, 1), ("gemm1x1", 1, 0), ("winograd", 3, 1), ("depthwise", 3, 1),
                         ("direct3x3", 3, 1)):
        groups = 3 if path == "depthwise" else 1
        wt = rng.standard_normal((3, 3 // groups, k, k)).astype(np.float32)
        b = rng.standard_normal(3).astype(np.float32)
        check(x, wt, b, 1, 1, pad, 1, groups, path=path, activation="leaky", rel=2e-5)


@pytest.mark.parametrize("activation", ["linear", "leaky", "relu", "relu6", "logistic", "tanh", "mish", "swish",
                                        "hard_mish", "elu", "selu", "gelu", "normalize_channels",
                                        "normalize_channels_softmax", "normalize_channels_softmax_maxval"])
def test_fused_activation(activation):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 16, 7, 8)).astype(np.float32)
    wt = rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(16).astype(np.float32)
    for path in PATHS[::3] + ("winograd", "direct3x3"):  # gemm1x1 needs k=1: cover the 3x3 paths here
        if path == "gemm1x1":
            continue
        check(x, wt, b, 1, 1, 1, 1, 1, path=path, activation=activation, rel=1e-4)


def test_darknet_dilation_output_size_override():
    """Darknet sizes a dilated conv as (in + 2*padding - k)/stride + 1 and pads by padding*dilation: with padding 0
    that output is larger than the usual formula; the extra positions read zeros."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 9, 9))
    wt = rng.standard_normal((4, 3, 3, 3))
    darknet_out = (9 + 0 - 3) // 1 + 1
    check(x, wt, None, 1, 1, 0, 2, 1, out_h=darknet_out, out_w=darknet_out, rel=1e-12)
    wd = rng.standard_normal((3, 1, 3, 3))
    check(x, wd, None, 1, 1, 0, 2, 3, out_h=darknet_out, out_w=darknet_out, rel=1e-12)


def test_output_size_rule():
    assert conv_output_size(416, 3, 2, 1) == 208
    assert conv_output_size(13, 3, 1, 1) == 13
    assert conv_output_size(10, 3, 1, 0) == 8
    assert conv_output_size(12, 3, 1, 2, 2) == 12
    assert conv_output_size(11, 1, 2, 0) == 6
    assert conv_output_size(7, 5, 1, 0, 2) == -1  # empty: caller's error


def test_fold_batchnorm_matches_unfolded_batchnorm():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((5, 4, 3, 3))
    biases, scales = rng.standard_normal(5), rng.uniform(0.5, 1.5, 5)
    mean, var = rng.standard_normal(5), rng.uniform(0.1, 2.0, 5)
    for eps in (1e-5, 1e-6):
        fw, fb = fold_batchnorm(w, biases, scales, mean, var, eps=eps)
        z = reference_conv(x, w, None, 1, 1, 1, 1, 1)
        expected = (scales[None, :, None, None] * (z - mean[None, :, None, None])
                    / np.sqrt(var[None, :, None, None] + eps) + biases[None, :, None, None])
        got = conv2d_forward(x, fw, fb, 1, 1, 1)
        assert np.abs(got - expected).max() < 1e-12 * np.abs(expected).max() + 1e-12
    # dtype follows the weights; connected-layer weights (n, inputs) fold the same way
    fw, fb = fold_batchnorm(w.astype(np.float32), biases, scales, mean, var)
    assert fw.dtype == np.float32 and fb.dtype == np.float32
    w2 = rng.standard_normal((5, 12))
    fw2, _ = fold_batchnorm(w2, biases, scales, mean, var)
    assert np.allclose(fw2, w2 * (scales / np.sqrt(var + 1e-5))[:, None])


def test_plan_out_buffer_and_errors():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    plan = prepare_conv2d(w, None, 1, 1, 1)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    out = np.empty(plan.output_shape(x.shape), np.float32)
    assert plan(x, out=out) is out
    assert np.allclose(out, reference_conv(x, w, None, 1, 1, 1, 1, 1), atol=1e-5)
    with pytest.raises(ValueError):
        plan(rng.standard_normal((2, 4, 5, 5)).astype(np.float32))   # wrong channel count
    with pytest.raises(ValueError):
        plan(x, out=np.empty((2, 4, 5, 4), np.float32))
    with pytest.raises(ValueError):
        prepare_conv2d(w, None, groups=3)                             # 4 filters in 3 groups
    with pytest.raises(ValueError):
        prepare_conv2d(w, None, 2, 2, 1, path="winograd")             # Winograd needs stride 1
    with pytest.raises(DarkpruneError, match="swishy"):
        prepare_conv2d(w, None, activation="swishy")
    # an input of another dtype is converted to the plan's
    assert plan(x.astype(np.float64)).dtype == np.float32
