"""Our engine against OpenCV's Darknet importer: every layer's output, on every asset cfg OpenCV can load (random
seeded weights, input shrunk to keep the suite fast) and on the real trained models."""
import warnings

import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import Model, read_cfg
from darkprune.engine.network import OPENCV_BN_EPS, Network

from conftest import ASSETS, asset_cfgs, real_model_pairs
from opencv_ref import opencv_forward

cv2 = pytest.importorskip("cv2")

# Layers whose output OpenCV exposes in another form (decoded boxes) or not at all: we compare their inputs.
SKIP_TYPES = {"yolo", "region", "dropout", "cost", "detection", "contrastive"}


def _shrunk(path, side: int):
    cfg = read_cfg(path)
    for section in cfg.layers:
        # OpenCV ignores the softmax temperature (Darknet divides the logits by it; tested by hand elsewhere)
        if section.type == "softmax" and "temperature" in section:
            section.remove("temperature")
    net = cfg.net
    w, h = net.get_int("width", 0), net.get_int("height", 0)
    if w and h and max(w, h) > side and not any(s.type == "connected" for s in cfg.layers):
        net.set("width", side)
        net.set("height", side)
    return cfg


def _compare(model: Model, tmp_path, x, tol=1e-4):
    # Darknet's softmax runs over all of a layer's inputs (C*H*W, per group), OpenCV's over channels: they agree
    # only on (C, 1, 1) inputs, the classifier case.
    layers = [l.index for l in model.graph if l.type not in SKIP_TYPES
              and not (l.type == "softmax" and l.in_shape[1] * l.in_shape[2] > 1)]
    # A logistic output's error is measured against its input's scale (float32 differences in large pre-activations
    # of random deep nets move saturated outputs; the slope is at most 1/4).
    squashed = [l.index for l in model.graph if l.attrs.get("activation") == "logistic" and l.index in layers]
    model.save(tmp_path / "m.cfg", tmp_path / "m.weights")
    try:
        ref = opencv_forward(tmp_path / "m.cfg", tmp_path / "m.weights", x, layers, squashed)
    except cv2.error as exc:
        pytest.skip(f"OpenCV cannot load this cfg: {str(exc).strip().splitlines()[-1][:120]}")
    ours = Network(model, bn_eps=OPENCV_BN_EPS).forward(x, outputs=layers)
    worst = []
    for i in layers:
        o, r = ours[i], ref[i].reshape(ours[i].shape)
        scale = max(float(np.abs(r).max()), 1e-6)
        if ("pre", i) in ref:
            scale = max(scale, 0.25 * float(np.abs(ref[("pre", i)]).max()))
        worst.append((float(np.abs(o - r).max()) / scale, i))
    err, index = max(worst)
    assert err < tol, f"layer {index} ({model.graph[index].type}) differs from OpenCV by {err:.2e} of its scale"


CFGS = [p for p in asset_cfgs(include_extra=False)]


@pytest.mark.parametrize("path", CFGS, ids=[p.name for p in CFGS])
def test_every_layer_matches_opencv_on_asset_cfgs(path, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = _shrunk(path, 128)
        try:
            model = Model.from_cfg(cfg, seed=7)
        except dp.DarkpruneError as exc:
            pytest.fail(f"{path.name}: {exc}")
    c, h, w = model.input_shape
    if any(l.type in ("local", "detection") for l in model.graph):
        pytest.skip("OpenCV does not run [local]/[detection]")
    if any(l.type == "convolutional" and l.attrs["share"] is not None for l in model.graph):
        pytest.skip("OpenCV's importer has no share_index: it reads weights for shared convs and misaligns")
    x = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)
    _compare(model, tmp_path, x)


@pytest.mark.parametrize("cfg_path, weights_path", real_model_pairs(), ids=lambda p: p.name)
def test_real_models_match_opencv(cfg_path, weights_path, tmp_path):
    model = dp.load(cfg_path, weights_path)
    c, h, w = model.input_shape
    x = np.random.default_rng(1).random((2, c, h, w), dtype=np.float32)
    _compare(model, tmp_path, x)
