"""The parallel variant path of the sensitivity analysis (prune/parallel_variants.py) measures what evaluate() measures
on the masked models.

Reference: for a few groups and rates, `apply_masks` on the model and `dp.evaluate` on the masked model from its input
(the standard decode_image, one batch after another, no prefix cache, no worker threads). The model is Yolo-Fastest's
graph at 160 x 160 with random weights (batch norms and biases perturbed), on four bundled images whose ground truth
is the unmasked model's own detections at 0.25, so that pruning moves the figure (mAP is over all 80 classes, so the baseline is some 0.06). Also: the
parallel and the sequential path give the same curves, and LeanDecoder gives decode_image's detections bit for bit.
"""
import dataclasses

import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet import Model, parse_cfg_text
from darkprune.engine.decode import decode_image
from darkprune.engine.network import Network
from darkprune.evaluate import MAP_NMS, MAP_THRESH, load_dataset
from darkprune.prune.analysis import analyze, prunable_groups
from darkprune.prune.criteria import channel_scores, channels_to_prune
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import apply_masks
from darkprune.prune.parallel_variants import LeanDecoder, fast_enabled
from darkprune.detect import detection_heads

from conftest import BUNDLED_CFG, BUNDLED_DATA, perturb_params

pytestmark = pytest.mark.usefixtures("quiet")

RATES = [0.3, 0.8]
# first conv, a depthwise pair, a shortcut chain, the group spanning both heads, the last head's inner groups
KEEP = {0, 5, 19, 24, 31, 33, 36}
CHECKED = (0, 19, 33, 36)


def small_random_model() -> Model:
    text = BUNDLED_CFG.read_text().replace("width=320", "width=160").replace("height=320", "height=160")
    model = Model.from_cfg(parse_cfg_text(text), seed=4)
    perturb_params(model, np.random.default_rng(4))
    # the random activations grow to thousands by the heads: scale the (linear) head convs to a spread of ~2, so
    # that boxes and probabilities are finite and varied
    heads = [model.graph[index].inputs[0] for index, _ in detection_heads(model.graph)]
    x = np.random.default_rng(4).random((1, 3, 160, 160), dtype=np.float32)
    spread = Network(model).forward(x, outputs=heads)
    for index in heads:
        for name in ("weights", "biases"):
            model.params[index][name] *= np.float32(2.0 / spread[index].std())
    return model


def self_labelled(model: Model, images: int = 4):
    """The first bundled images, their ground truth replaced by the model's own boxes above 0.25 (class = the most
    probable one), at most 12 per image."""
    data = load_dataset(BUNDLED_DATA, images)
    network = Network(model)
    heads = detection_heads(model.graph)
    net = model.graph.net
    width, height = int(net["width"]), int(net["height"])
    from darkprune.data import cached_inputs
    entry = cached_inputs(data, width, height, 3, "darknet", None, images, False)
    outputs = network.forward(np.ascontiguousarray(entry.inputs[:images]), outputs=[i for i, _ in heads])
    boxes = []
    for i in range(images):
        dets = decode_image([(outputs[index][i], p) for index, p in heads], width, height, thresh=0.25)
        best = np.argsort(-dets.probs.max(axis=1), kind="stable")[:12]
        boxes.append(np.array([[dets.probs[k].argmax(), *dets.boxes[k]] for k in best], np.float32).reshape(-1, 5))
    return dataclasses.replace(data, boxes=boxes)


@pytest.fixture(scope="module")
def model():
    return small_random_model()


@pytest.fixture(scope="module")
def data(model):
    return self_labelled(model)


def exclude_all_but(model, keep):
    return [model.graph[g.members[0]].name for g in prunable_groups(model) if g.id not in keep]


def test_parallel_curves_are_the_masked_models_figures(model, data, monkeypatch):
    monkeypatch.delenv("DARKPRUNE_ANA_FAST", raising=False)
    assert fast_enabled()
    sens = analyze(model, data, rates=RATES, exclude=exclude_all_but(model, KEEP), progress=False, batch=3)
    assert sorted(sens.curves) == sorted(KEEP)
    assert sens.baseline == dp.evaluate(model, data, progress=False)["map50"] > 0.02
    grouping = build_grouping(model.graph)
    for gid in CHECKED:
        for rate in RATES:
            chans = channels_to_prune(channel_scores(model, grouping.group(gid)), rate)
            reference = dp.evaluate(apply_masks(model, {gid: chans}), data, progress=False, batch=4)["map50"]
            assert sens.curves[gid][rate] == pytest.approx(reference, abs=1e-12), (gid, rate)
    # a real analysis: the figures move with the group and the rate
    assert len({v for c in sens.curves.values() for v in c.values()}) > 4

    monkeypatch.setenv("DARKPRUNE_ANA_FAST", "0")
    plain = analyze(model, data, rates=RATES, exclude=exclude_all_but(model, KEEP), progress=False, batch=3)
    assert plain.curves == sens.curves and plain.baseline == sens.baseline


def test_lean_decoder_gives_decode_image_detections(model, data):
    network = Network(model)
    heads = detection_heads(model.graph)
    raw = [model.graph[index].inputs[0] for index, _ in heads]
    net = model.graph.net
    width, height = int(net["width"]), int(net["height"])
    x = np.random.default_rng(5).random((2, 3, height, width), dtype=np.float32)
    outputs = network.forward(x, outputs=[i for i, _ in heads] + raw)
    for letterbox in (False, True):
        for graph in (None, model.graph):
            decoder = LeanDecoder(heads, width, height, letterbox, MAP_THRESH, MAP_NMS, graph)
            wanted = decoder.wanted(0)
            assert wanted == (raw if graph is not None else [i for i, _ in heads])
            for i in range(2):
                want = decode_image([(outputs[index][i], p) for index, p in heads], width, height, 640, 427,
                                    thresh=MAP_THRESH, nms_thresh=MAP_NMS, letterbox=letterbox)
                given = {k: outputs[k].copy() for k in wanted}      # raw inputs are activated in place
                boxes, probs = decoder(given, i, 640, 427)
                assert len(want) > 10
                assert np.array_equal(boxes, want.boxes) and np.array_equal(probs, want.probs)
    # a rerun starting after the first head's input reads that head's output from the prefix cache
    assert LeanDecoder(heads, width, height, False, MAP_THRESH, MAP_NMS, model.graph).wanted(raw[0] + 1) == \
        [heads[0][0], raw[1]]


def test_rates_pruning_the_same_channels_are_measured_once(model, data, monkeypatch):
    from darkprune.prune import parallel_variants
    monkeypatch.delenv("DARKPRUNE_ANA_FAST", raising=False)
    small = next(g for g in prunable_groups(model) if g.channels == 4)
    rates = [0.4, 0.5, 0.6]
    chans = [channels_to_prune(channel_scores(model, small), r) for r in rates]
    assert all(np.array_equal(c, chans[0]) for c in chans) and len(chans[0])
    submitted = []
    real = parallel_variants.ParallelMeasure.submit
    monkeypatch.setattr(parallel_variants.ParallelMeasure, "submit",
                        lambda self, *a, **k: submitted.append(1) or real(self, *a, **k))
    sens = analyze(model, data, rates=rates, exclude=exclude_all_but(model, {small.id}), progress=False)
    assert len(submitted) == 1
    reference = dp.evaluate(apply_masks(model, {small.id: chans[0]}), data, progress=False)["map50"]
    assert sens.curves[small.id] == {r: pytest.approx(reference, abs=1e-12) for r in rates}
