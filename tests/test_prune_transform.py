"""transform() exactness, checked with OpenCV's Darknet importer as the independent reference: random channels of
every prunable group are masked, the masked pair and the transformed pair are written, OpenCV runs both on the same
random input, and their outputs must agree; the transformed pair's size and Darknet-rule BFLOPs must be what
live_stats predicted, and no channel feeding a detection head may have been removed."""
import math

import cv2
import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import read_cfg, write_cfg
from darkprune.darknet.weights import read_header
from darkprune.prune.groups import find_groups
from darkprune.prune.masks import Masks, apply_masks, live_stats
from darkprune.prune.transform import transform

from conftest import asset, perturb_params

# (asset path, weights or None = random, [net] width=height override, seeds). Classifiers lose their trailing
# softmax/cost in the test copy so that OpenCV's outputs are the raw logits (a softmax over random logits is flat and
# would hide differences); detectors are compared on the raw maps their heads decode (OpenCV's permute_N layers).
CASES = [
    ("cfg/yolov3-tiny.cfg", None, 160, (0, 1, 2)),
    ("cfg/yolov4-tiny.cfg", None, 160, (0, 1, 2)),
    ("cfg/yolov4-tiny-3l.cfg", None, 160, (0, 1)),
    ("cfg/yolov3-tiny-prn.cfg", None, 160, (0, 1)),
    ("cfg/yolov3-tiny_3l.cfg", None, 160, (0,)),
    ("models/yolo-fastest-1.1/yolo-fastest-1.1.cfg", "yolo-fastest-1.1.weights", None, (0, 1)),
    ("models/yolo-fastest-1.1/yolo-fastest-1.1.cfg", None, 160, (2,)),
    ("models/yoloface/yoloface-500k-v2.cfg", "yoloface-500k-v2.weights", None, (0, 1)),
    ("models/yoloface/yoloface-500k-v2.cfg", None, None, (2,)),
    ("models/yoloface/yoloface-50k.cfg", "yoloface-50k.weights", None, (0,)),
    ("models/mnist-lenet/mnist_lenet.cfg", "mnist_lenet.weights", None, (0, 1)),
    ("models/mnist-lenet/mnist_lenet.cfg", None, None, (2,)),
    ("models/cifar-small/cifar_small.cfg", "cifar_small.weights", None, (0, 1)),
    ("models/cifar-small/cifar_small.cfg", None, None, (2,)),
    ("cfg/efficientnet_b0.cfg", None, 64, (0, 1)),
    ("cfg/enet-coco.cfg", None, 96, (0,)),
    ("cfg/darknet53.cfg", None, 64, (0,)),
    ("cfg/densenet201.cfg", None, 64, (0,)),
    ("cfg/yolov4-csp-s-mish.cfg", None, 96, (0,)),
    ("cfg/yolov7-tiny.cfg", None, 96, (0,)),
    ("cfg/csresnext50-panet-spp.cfg", None, 64, (0,)),
]
HEADS = ("yolo", "region", "detection", "gaussian_yolo")


def _case_id(case):
    rel, weights, size, seeds = case
    return f"{rel.split('/')[-1][:-4]}-{'real' if weights else 'random'}-{size or 'native'}"


def _test_copy(rel: str, weights: str | None, size: int | None, tmp_path):
    """The cfg (trailing softmax/cost removed, input resized) written to tmp; the weights path beside the asset."""
    path = asset(*rel.split("/"))
    cfg = read_cfg(path)
    while cfg.sections[-1].type in ("softmax", "cost"):
        cfg.sections.pop()
    if size:
        cfg.net.set("width", size)
        cfg.net.set("height", size)
    out = tmp_path / "base.cfg"
    write_cfg(cfg, out)
    return out, (path.parent / weights if weights else None)


def random_masks(groups, rng, heavy=False) -> dict:
    """Random channels of every prunable group: up to 60% of them, or all but one when `heavy`."""
    masks = {}
    for g in groups:
        if not g.prunable:
            continue
        count = g.channels - 1 if heavy else int(rng.integers(1, max(2, math.ceil(0.6 * g.channels))))
        masks[g.id] = rng.choice(g.channels, size=min(count, g.channels - 1), replace=False)
    return masks


def with_readers_restored(masked, model):
    """apply_masks also clears the weights that *read* a pruned channel (they are dropped by transform anyway). Put
    them back, so that a comparison with the transformed model fails unless every pruned channel outputs zero."""
    reading = masked.copy()
    for i, arrays in reading.params.items():
        if model.graph[i].type in ("convolutional", "connected"):
            w = arrays["weights"]
            live_rows = np.abs(w.reshape(len(w), -1)).sum(axis=1) > 0
            w[live_rows] = model.params[i]["weights"][live_rows]
    return reading


def opencv_outputs(cfg, weights, x) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    names = [n for n in net.getLayerNames() if n.startswith("permute_")] or list(net.getUnconnectedOutLayersNames())
    net.setInput(x)
    return [np.array(o, copy=True) for o in net.forward(names)]


def head_producers(graph) -> set[int]:
    """Convolutions whose output reaches a detection head through layers that only move channels (walked back by
    hand from each head's inputs, independently of the groups code)."""
    found, stack = set(), [i for l in graph if l.type in HEADS for i in l.inputs]
    while stack:
        i = stack.pop()
        if i < 0:
            continue
        layer = graph[i]
        if layer.type == "convolutional":
            found.add(i)
        elif layer.type in ("route", "maxpool", "upsample", "dropout", "shortcut", "activation", "batchnorm"):
            stack.extend(layer.inputs)
    return found


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_transform_matches_masked_model_in_opencv(case, tmp_path):
    rel, weights, size, seeds = case
    cfg_path, weights_path = _test_copy(rel, weights, size, tmp_path)
    for seed in seeds:
        model = dp.load(cfg_path, weights_path, seed=seed)
        groups = find_groups(model.graph)
        rng = np.random.default_rng(seed)
        if weights_path is None:
            perturb_params(model, rng)
        masks = random_masks(groups, rng, heavy=(seed == 2))
        assert masks, "nothing prunable"
        masked = apply_masks(model, masks)
        small = transform(masked)
        masked.save(tmp_path / "masked.cfg", tmp_path / "masked.weights")
        small.save(tmp_path / "small.cfg", tmp_path / "small.weights")
        reading = with_readers_restored(masked, model)
        reading.save(tmp_path / "reading.cfg", tmp_path / "reading.weights")

        c, h, w = model.graph.input_shape
        x = rng.random((1, c, h, w), dtype=np.float32)
        want = opencv_outputs(tmp_path / "masked.cfg", tmp_path / "masked.weights", x)
        also = opencv_outputs(tmp_path / "reading.cfg", tmp_path / "reading.weights", x)
        got = opencv_outputs(tmp_path / "small.cfg", tmp_path / "small.weights", x)
        assert len(want) == len(got) == len(also)
        for a, a2, b in zip(want, also, got):
            scale = float(np.abs(a).max())
            assert scale > 0 and a.shape == b.shape
            assert float(np.abs(a - b).max()) <= 1e-4 * scale, (seed, float(np.abs(a - b).max()), scale)
            assert float(np.abs(a2 - b).max()) <= 1e-4 * scale, (seed, float(np.abs(a2 - b).max()), scale)

        # sizes: what live_stats promised is what the transformed pair holds, by Darknet's rules
        stats = live_stats(model, masked.masks)
        assert stats["total_params_before"] == model.graph.total_params
        assert stats["total_params"] == small.graph.total_params < model.graph.total_params
        data = (tmp_path / "small.weights").read_bytes()
        assert (len(data) - read_header("small", data).nbytes) // 4 == stats["total_params"]
        for row, layer in zip(stats["layers"], small.graph):
            assert row["params"] == layer.params and row["out_channels"] == layer.out_shape[0]
            assert row["bflops"] == pytest.approx(layer.bflops, rel=1e-12, abs=1e-15)
        assert stats["total_bflops"] == pytest.approx(small.graph.total_bflops, rel=1e-12)
        assert stats["total_bflops"] < model.graph.total_bflops

        # the head rule, checked on the result: every conv feeding a head kept all its filters
        for i in head_producers(model.graph):
            assert small.graph[i].out_shape == model.graph[i].out_shape, (rel, i)


def test_transform_without_masking_first_and_from_saved_masks_gives_the_same_bytes(tmp_path):
    model = dp.load(asset("models", "yolo-fastest-1.1", "yolo-fastest-1.1.cfg"),
                    asset("models", "yolo-fastest-1.1", "yolo-fastest-1.1.weights"))
    masks = random_masks(find_groups(model.graph), np.random.default_rng(5))
    masked = apply_masks(model, masks)
    reference = transform(masked)
    masked.masks.save(tmp_path / "masks.json")
    direct = transform(model, Masks.load(tmp_path / "masks.json", model))
    assert direct.weights_bytes() == reference.weights_bytes()
    assert direct.cfg.text() == reference.cfg.text()
    # only filters= and groups= change in the cfg; the cfg keeps its comments and every other line
    before, after = model.cfg.text().splitlines(), reference.cfg.text().splitlines()
    assert len(before) == len(after)
    changed = {a.split("=")[0] for a, b in zip(after, before) if a != b}
    assert changed == {"filters", "groups"}


def test_transform_with_no_pruned_channel_is_the_identity():
    model = dp.load(asset("cfg", "yolov4-tiny.cfg"), seed=3)
    same = transform(apply_masks(model, {}))
    assert same.cfg.text() == model.cfg.text()
    assert same.weights_bytes() == model.weights_bytes()


def test_se_block_with_logistic_scale_is_exact_in_opencv(tmp_path):
    """yoloface-500k-v2's SE blocks: the logistic scale conv outputs 0.5 for a pruned channel, which must be
    multiplied by the pruned (zero) feature channel. Prune exactly the SE groups and compare."""
    cfg = asset("models", "yoloface", "yoloface-500k-v2.cfg")
    model = dp.load(cfg, cfg.with_suffix(".weights"))
    groups = find_groups(model.graph)
    se_members = {l.index - 1 for l in model.graph if l.type == "scale_channels"}
    se_groups = [g for g in groups if se_members & set(g.members)]
    assert len(se_groups) == 3 and all(g.prunable for g in se_groups)
    masked = apply_masks(model, {g.id: np.arange(0, g.channels, 2) for g in se_groups})
    small = transform(masked)
    masked.save(tmp_path / "m.cfg", tmp_path / "m.weights")
    small.save(tmp_path / "s.cfg", tmp_path / "s.weights")
    x = np.random.default_rng(0).random((1, 3, 288, 352), dtype=np.float32)
    for a, b in zip(opencv_outputs(tmp_path / "m.cfg", tmp_path / "m.weights", x),
                    opencv_outputs(tmp_path / "s.cfg", tmp_path / "s.weights", x)):
        assert float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(a).max())


# OpenCV's importer knows neither a standalone [batchnorm] nor shortcut weights, so these two layers are checked with
# a small numpy forward written here from Darknet's definitions (conv + batch norm + leaky, shortcut
# out = w0[c] * prev + w1[c] * from for per_channel, batchnorm (x - mean) / sqrt(var + eps) * scale + bias).
def _numpy_forward(model, x):
    outs = {-1: x}
    eps = 1e-5
    for layer in model.graph:
        a, p = layer.attrs, model.params.get(layer.index, {})
        inp = outs[layer.inputs[0]]
        if layer.type == "convolutional":
            k, pad = a["size"], a["pad"]
            xp = np.pad(inp, ((0, 0), (pad, pad), (pad, pad)))
            _, h, w = layer.out_shape
            cols = np.stack([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=1)   # c, k*k, h, w
            wts = p["weights"].reshape(len(p["weights"]), -1, k * k)
            y = np.einsum("nck,ckhw->nhw", wts.astype(np.float64), cols.astype(np.float64))
            if a["batch_normalize"]:
                y = (y - p["rolling_mean"][:, None, None]) / np.sqrt(p["rolling_variance"][:, None, None] + eps)
                y = y * p["scales"][:, None, None]
            y = y + p["biases"][:, None, None]
        elif layer.type == "batchnorm":
            y = (inp - p["rolling_mean"][:, None, None]) / np.sqrt(p["rolling_variance"][:, None, None] + eps)
            y = y * p["scales"][:, None, None] + p["biases"][:, None, None]
        elif layer.type == "shortcut":
            y = inp * p["weights"][0][:, None, None] + outs[layer.inputs[1]] * p["weights"][1][:, None, None]
        elif layer.type == "activation":
            y = inp
        else:
            raise AssertionError(layer.type)
        act = a.get("activation", "linear")
        outs[layer.index] = np.where(y > 0, y, 0.1 * y) if act == "leaky" else y
    return outs[len(model.graph) - 1]


@pytest.mark.parametrize("body", [
    "[convolutional]\nfilters=8\nsize=3\npad=1\nactivation=linear\n[batchnorm]\n[activation]\nactivation=leaky\n",
    "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
    "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
    "[shortcut]\nfrom=-2\nweights_type=per_channel\nactivation=linear\n",
], ids=["batchnorm", "shortcut-per-channel"])
def test_standalone_batchnorm_and_per_channel_shortcut_are_sliced(body):
    from darkprune.darknet import Model, parse_cfg_text
    text = "[net]\nwidth=8\nheight=8\nchannels=3\n" + body + "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n"
    model = Model.from_cfg(parse_cfg_text(text, "hand.cfg"), seed=0)
    rng = np.random.default_rng(0)
    perturb_params(model, rng)
    for arrays in model.params.values():
        if "weights" in arrays and arrays["weights"].ndim == 2:            # the shortcut's fusion weights
            arrays["weights"][:] = rng.uniform(0.5, 1.5, arrays["weights"].shape)
    (group, _) = find_groups(model.graph)
    assert group.prunable
    masked = apply_masks(model, {group.id: [1, 3, 6]})
    small = transform(masked)
    x = rng.random((3, 8, 8)).astype(np.float32)
    assert np.abs(_numpy_forward(masked, x) - _numpy_forward(small, x)).max() < 1e-9
    assert np.abs(_numpy_forward(with_readers_restored(masked, model), x) - _numpy_forward(small, x)).max() < 1e-9
    assert not np.allclose(_numpy_forward(masked, x), _numpy_forward(model, x))
    stats = live_stats(model, masked.masks)
    assert stats["total_params"] == small.graph.total_params
    assert len(small.weights_bytes()) == 20 + 4 * stats["total_params"]
