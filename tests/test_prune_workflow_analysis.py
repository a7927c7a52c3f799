"""The sensitivity analysis: the prefix cache changes no figure, the masked variants are exactly the masked models,
an interrupted analysis resumes without redoing finished groups, and shards merged equal an unsharded run.

References: the masked model built by apply_masks and run from its input (the prefix cache must give bit-for-bit
its outputs), evaluate() on that masked model (the analysis' figures must equal it), and an uninterrupted,
unsharded run for resume and merge."""
import json
import sys
import warnings

import numpy as np
import pytest

import darkprune as dp
from darkprune.cli import main
from darkprune.darknet import Model, parse_cfg_text
from darkprune.engine.network import Network
from darkprune.evaluate import evaluate, load_dataset
from darkprune.prune import parallel_variants, variants
from darkprune.prune.analysis import (Sensitivity, _zero_positions, analyze, divergence_layer,
                                      evaluation_outputs, masked_overrides, prunable_groups)
from darkprune.prune.criteria import channel_scores, channels_to_prune
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import apply_masks
from darkprune.prune.variants import zeroed as _zeroed

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS, asset, perturb_params
from test_prune_workflow_exactness import _shrunk

# Every layer kind the divergence rules know, and the ones they must stop at: a conv without batch norm followed by
# a standalone [batchnorm] and an [activation], a depthwise conv, a per-channel weighted shortcut, maxpool,
# upsample, route, avgpool, an SE block (logistic scale -> [scale_channels]), [sam], connected layers.
HAND = """[net]
width=16
height=16
channels=3
[convolutional]
filters=8
size=3
pad=1
activation=linear
[batchnorm]
[activation]
activation=leaky
[convolutional]
batch_normalize=1
filters=8
size=1
activation=leaky
[convolutional]
batch_normalize=1
filters=8
groups=8
size=3
pad=1
activation=leaky
[shortcut]
from=-3
weights_type=per_channel
activation=linear
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=16
size=1
activation=swish
[upsample]
stride=2
[route]
layers=-1,-4
[convolutional]
batch_normalize=1
filters=8
size=1
activation=leaky
[avgpool]
[convolutional]
filters=8
size=1
activation=logistic
[scale_channels]
from=-3
[convolutional]
batch_normalize=1
filters=8
size=1
activation=mish
[convolutional]
filters=8
size=1
activation=logistic
[sam]
from=-2
[convolutional]
filters=4
size=1
activation=leaky
[connected]
output=12
activation=leaky
[connected]
output=5
activation=linear
"""


def hand_model(seed=0):
    model = Model.from_cfg(parse_cfg_text(HAND, "hand.cfg"), seed=seed)
    rng = np.random.default_rng(seed)
    perturb_params(model, rng)
    for arrays in model.params.values():                 # the shortcut's per-channel weights: not all ones
        if "weights" in arrays and arrays["weights"].ndim == 2 and arrays["weights"].shape[0] == 2:
            arrays["weights"][:] = rng.uniform(0.5, 1.5, arrays["weights"].shape)
    return model


def check_prefix_path(model, rng, max_groups=None, rates=(0.3, 0.7)) -> int:
    """For each prunable group: the outputs of the masked model run from its input == those of the run that starts
    at the group's divergence layer from the original activations with the pruned channels zeroed (bit for bit);
    and the variant the analysis builds == apply_masks' model (bit for bit). Returns how many groups started past
    their first member."""
    graph = model.graph
    network = Network(model)
    grouping = build_grouping(graph)
    outs = evaluation_outputs(network)
    c, h, w = graph.input_shape
    x = rng.random((2, c, h, w), dtype=np.float32)
    groups = prunable_groups(model)
    if max_groups and len(groups) > max_groups:
        groups = [groups[i] for i in np.linspace(0, len(groups) - 1, max_groups).round().astype(int)]
    shifted = 0
    for group in groups:
        d, zeroed = divergence_layer(grouping, group)
        shifted += d > min(group.members)
        need = sorted(set(network.frontier(d)) | {o for o in outs if o < d})
        layers = [i for i in need if i >= 0]
        base = network.forward(x, outputs=layers) if layers else {}
        base[-1] = x
        scores = channel_scores(model, group)
        for rate in rates:
            chans = channels_to_prune(scores, rate)
            variant = network.variant(masked_overrides(model, group, chans))
            full = variant.forward(x, outputs=outs)
            reference = Network(apply_masks(model, {group.id: chans})).forward(x, outputs=outs)
            zero = _zero_positions(grouping, group, chans, need, zeroed)
            cached = {i: (_zeroed(base[i], zero[i]) if i in zero else base[i]) for i in need}
            later = [o for o in outs if o >= d]
            part = variant.forward(None, outputs=later, start=d, cached=cached) if later else {}
            part.update({o: cached[o] for o in outs if o < d})
            for o in outs:
                assert np.array_equal(full[o], reference[o]), (group.id, rate, o, "variant != apply_masks")
                assert np.array_equal(full[o], part[o]), (group.id, rate, o, f"divergence layer {d}")
    return shifted


def test_prefix_path_is_exact_on_every_layer_kind():
    model = hand_model()
    grouping = build_grouping(model.graph)
    groups = prunable_groups(model)
    starts = {tuple(g.members): divergence_layer(grouping, g)[0] for g in groups}
    # Worked out by hand. conv0, conv3 and the depthwise conv4 are one group (the shortcut adds conv4 to conv0's
    # map): its pruned channels stay zero through [batchnorm] and [activation], and conv3 (1x1) reads them: 3.
    # conv7's channels stay zero through upsample and route; conv10 reads them: 10. conv10 and the SE scale conv12
    # are tied by [scale_channels]; avgpool keeps zeros; conv12 is logistic (0.5, not 0, for a pruned channel): 12.
    # conv17 is read by a connected layer: 18; connected18 by connected19: 19.
    assert starts == {(0, 3, 4): 3, (7,): 10, (10, 12): 12, (17,): 18, (18,): 19}
    assert check_prefix_path(model, np.random.default_rng(0)) == 5


CFGS = ["yolov4-tiny.cfg", "yolov3-tiny-prn.cfg", "efficientnet_b0.cfg", "enet-coco.cfg", "csresnext50-panet-spp.cfg",
        "yolov4-sam-mish-csp-reorg-bfm.cfg", "densenet201.cfg", "yolov7-tiny.cfg", "resnet50.cfg", "yolov4-p5.cfg"]


@pytest.mark.parametrize("name", CFGS)
def test_prefix_path_is_exact_on_asset_cfgs(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Model.from_cfg(_shrunk(asset("cfg", name)), seed=1)
    perturb_params(model, np.random.default_rng(1))
    check_prefix_path(model, np.random.default_rng(2), max_groups=12, rates=(0.5,))


@pytest.mark.parametrize("folder, stem", [("yolo-fastest-1.1", "yolo-fastest-1.1"), ("yoloface", "yoloface-500k-v2")])
def test_prefix_path_is_exact_on_real_models(folder, stem):
    cfg = asset("models", folder, f"{stem}.cfg")
    model = dp.load(cfg, cfg.with_suffix(".weights"))
    assert check_prefix_path(model, np.random.default_rng(3), rates=(0.5,)) > len(prunable_groups(model)) // 2


# ---------------------------------------------------------------------------------------------------------------
# On the bundled real model and images: a few groups of each kind (first conv, depthwise pairs, shortcut chains,
# the group spanning both heads, the last ones), a few images.
KEEP = {0, 3, 5, 19, 24, 31, 36}
IMAGES = 4
RATES = [0.3, 0.7]


@pytest.fixture(scope="module")
def fastest():
    return dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)


@pytest.fixture(scope="module")
def images():
    return load_dataset(BUNDLED_DATA, IMAGES)


def exclude_all_but(model, keep):
    return [model.graph[g.members[0]].name for g in prunable_groups(model) if g.id not in keep]


@pytest.fixture(scope="module")
def full_run(fastest, images):
    return analyze(fastest, images, rates=RATES, exclude=exclude_all_but(fastest, KEEP), progress=False)


def test_analysis_figures_are_evaluate_figures_of_the_masked_models(fastest, images, full_run):
    assert sorted(full_run.curves) == sorted(KEEP)
    assert full_run.baseline == evaluate(fastest, images, progress=False)["map50"]
    for gid in (0, 5, 31):
        group = build_grouping(fastest.graph).group(gid)
        for rate in RATES:
            chans = channels_to_prune(channel_scores(fastest, group), rate)
            masked = apply_masks(fastest, {gid: chans})
            assert full_run.curves[gid][rate] == evaluate(masked, images, progress=False)["map50"], (gid, rate)


def test_prefix_cache_changes_no_figure(fastest, images, full_run):
    plain = analyze(fastest, images, rates=RATES, exclude=exclude_all_but(fastest, KEEP), progress=False,
                    prefix_cache=False)
    assert plain.curves == full_run.curves and plain.baseline == full_run.baseline
    # and the figures move: a real analysis, not a constant
    assert len({v for c in full_run.curves.values() for v in c.values()}) > 3


class Killed(Exception):
    pass


def test_killed_analysis_resumes_without_redoing_finished_groups(fastest, images, full_run, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "sensitivity.json"
    exclude = exclude_all_but(fastest, KEEP)
    done = []

    def kill_after_three(gid, curve):
        done.append(gid)
        if len(done) == 3:
            raise Killed

    with pytest.raises(Killed):
        analyze(fastest, images, rates=RATES, exclude=exclude, out_path=out, progress=False,
                callback=kill_after_three)
    saved = json.loads(out.read_text())
    assert sorted(g["id"] for g in saved["groups"]) == sorted(done)

    measured, evaluated, resumed = [], [], []
    evaluate_module = sys.modules["darkprune.evaluate"]
    real_measure, real_evaluate = variants.Measure.submit, evaluate_module.evaluate
    monkeypatch.setattr(variants.Measure, "submit",
                        lambda self, *a, **k: measured.append(1) or real_measure(self, *a, **k))
    real_parallel = parallel_variants.ParallelMeasure.submit      # the default path (its fallback is not counted)
    monkeypatch.setattr(parallel_variants.ParallelMeasure, "submit",
                        lambda self, *a, **k: measured.append(1) or real_parallel(self, *a, **k))
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    sens = analyze(fastest, images, rates=RATES, exclude=exclude, out_path=out, progress=False,
                   callback=lambda gid, curve: resumed.append(gid))
    assert sorted(resumed) == sorted(KEEP - set(done))
    assert len(measured) == len(resumed) * len(RATES)
    assert not evaluated                      # the baseline is not measured again
    assert sens.curves == full_run.curves and sens.baseline == full_run.baseline and sens.complete
    # a finished analysis rerun does nothing at all
    measured.clear()
    analyze(fastest, images, rates=RATES, exclude=exclude, out_path=out, progress=False)
    assert not measured and not evaluated


def test_resume_refuses_other_settings_weights_or_images(fastest, images, tmp_path):
    out = tmp_path / "sensitivity.json"
    exclude = exclude_all_but(fastest, {36})
    analyze(fastest, images, rates=RATES, exclude=exclude, out_path=out, progress=False)
    with pytest.raises(dp.DarkpruneError, match="other settings.*rates"):
        analyze(fastest, images, rates=[0.5], exclude=exclude, out_path=out, progress=False)
    other = fastest.copy()
    other.params[0]["weights"][0, 0, 0, 0] += 1
    with pytest.raises(dp.DarkpruneError, match="other weights"):
        analyze(other, images, rates=RATES, exclude=exclude, out_path=out, progress=False)
    fewer = load_dataset(BUNDLED_DATA, IMAGES - 1)
    with pytest.raises(dp.DarkpruneError, match="other settings.*images"):
        analyze(fastest, fewer, rates=RATES, exclude=exclude, out_path=out, progress=False)
    assert Sensitivity.load(out, fastest).complete


def test_shards_merged_equal_an_unsharded_run(fastest, full_run, tmp_path, capsys):
    common = [str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--data", str(BUNDLED_DATA), "--limit", str(IMAGES),
              "--rates", ",".join(map(str, RATES)), "--exclude", ",".join(exclude_all_but(fastest, KEEP)), "-q",
              "-w", str(tmp_path / "ws")]
    assert main(["ana", *common, "--shard", "1/2"]) == 0
    assert main(["ana", "--merge", *common]) == 1          # shard 2 missing
    assert "every shard 1..2 must be present" in capsys.readouterr().err
    assert main(["ana", *common, "--shard", "2/2"]) == 0
    one = Sensitivity.load(tmp_path / "ws" / "sensitivity.shard-1-of-2.json")
    two = Sensitivity.load(tmp_path / "ws" / "sensitivity.shard-2-of-2.json")
    assert set(one.curves) | set(two.curves) == KEEP and not set(one.curves) & set(two.curves)
    capsys.readouterr()
    assert main(["ana", "--merge", "--json", *common]) == 0
    payload = json.loads(capsys.readouterr().out)
    merged = Sensitivity.load(tmp_path / "ws" / "sensitivity.json", fastest)
    assert merged.curves == full_run.curves and merged.baseline == full_run.baseline
    assert merged.shard is None and merged.complete and payload["baseline"] == full_run.baseline
