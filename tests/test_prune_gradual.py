"""Gradual pruning (darkprune.prune.gradual): K nested cuts, each recovered, saved and resumable."""
import numpy as np
import pytest

from darkprune.darknet import Model, parse_cfg_text
from darkprune.engine.network import Network
from darkprune.errors import SettingError
from darkprune.prune import gradual
from darkprune.prune.analysis import Sensitivity
from darkprune.prune.groups import build_grouping
from darkprune.prune.masks import Masks, kept_channels, live_stats, structure_fingerprint
from darkprune.prune.plan import Plan
from darkprune.prune.transform import transform

from conftest import BUNDLED_DATA

TINY = """[net]
width=32
height=32
channels=3
batch=4
subdivisions=1
momentum=0.9
decay=0.0005
learning_rate=0.0005
max_batches=4
policy=constant

[convolutional]
filters=16
size=3
stride=2
pad=1
batch_normalize=1
activation=leaky

[convolutional]
filters=16
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=16
size=1
stride=1
pad=1
batch_normalize=1
activation=leaky

[convolutional]
filters=255
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=80
num=3
"""


def tiny(seed=0) -> Model:
    model = Model.from_cfg(parse_cfg_text(TINY, "tiny.cfg"), seed=seed)
    model.cfg_path = None
    return model


def hand_sensitivity(model: Model) -> Sensitivity:
    """Linear loss curves, steepest for the first group (whose cut also empties much of the next conv): the
    rate plans then take several groups, step after step."""
    grouping = build_grouping(model.graph)
    gids = [g.id for g in grouping.groups if g.prunable and g.channels > 1]
    rates = [0.25, 0.5, 0.75]
    sens = Sensitivity(structure_fingerprint(model.graph), "map50", 0.5, rates, "l1", 1, 10, "hand.data")
    sens.curves = {g: {r: 0.5 - r * 0.05 * (len(gids) - k) ** 2 for r in rates} for k, g in enumerate(gids)}
    sens.groups = {g: {"members": grouping.groups[g].members, "channels": grouping.groups[g].channels}
                   for g in gids}
    sens.assigned = sorted(gids)
    sens.bind(model)
    return sens


def test_steps_must_be_a_whole_number_of_at_least_one():
    for bad in (0, -1, 1.5, "two", None):
        with pytest.raises(SettingError, match="steps"):
            gradual.check_steps(bad)
    assert gradual.check_steps("3") == 3


def test_plans_grow_per_group_and_reach_each_steps_share():
    model = tiny()
    sens = hand_sensitivity(model)
    plans = gradual.gradual_plans(model, sens, 3, rate=0.5)
    grouping = build_grouping(model.graph)
    total = model.graph.total_bflops
    for i, plan in enumerate(plans, 1):
        masks = gradual.grow_masks(model, plan, None, grouping)
        removed = total - live_stats(model, masks, grouping)["total_bflops"]
        assert removed >= 0.5 * i / 3 * total - 1e-12
    for earlier, later in zip(plans, plans[1:]):
        assert all(later.rates.get(g, 0.0) >= r for g, r in earlier.rates.items())


def test_grown_masks_keep_the_previous_ones_and_add_the_weakest_live_filters():
    model = tiny(1)
    grouping = build_grouping(model.graph)
    gid = next(g.id for g in grouping.groups if g.prunable and g.members == [1])
    previous = Masks.for_model(model, {gid: np.array([0, 5, 9])}, (), grouping)   # not the weakest ones
    grown = gradual.grow_masks(model, Plan({gid: 0.5}, "rate", 0.5), previous, grouping)
    chans = grown.pruned[gid]
    assert len(chans) == 8 and {0, 5, 9} <= set(chans.tolist())
    # reference: the L1 norms of layer 1's filters (its only member), the five weakest of the thirteen live ones
    l1 = np.abs(model.params[1]["weights"].astype(np.float64)).reshape(16, -1).sum(axis=1)
    live = [c for c in range(16) if c not in (0, 5, 9)]
    weakest = sorted(sorted(live, key=lambda c: l1[c])[:5])
    assert sorted(set(chans.tolist()) - {0, 5, 9}) == weakest


def test_gradual_run_prunes_in_nested_steps_keeps_zeros_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKPRUNE_QUIET", "1")
    monkeypatch.setenv("DARKPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny(2)
    original = {i: {k: v.copy() for k, v in p.items()} for i, p in model.params.items()}
    sens = hand_sensitivity(model)
    ws = tmp_path / "gradual"
    result = gradual.prune_gradually(model, sens, 2, BUNDLED_DATA, 2, rate=0.4, workspace=ws, progress=False,
                                     finetune_options={"batch": 4, "subdivisions": 1})
    assert all(np.array_equal(original[i][k], model.params[i][k]) for i in original for k in original[i])
    first = Masks.load(ws / "step1" / "masks.json", model)
    last = result.masks
    assert all(set(first.pruned[g].tolist()) <= set(last.pruned.get(g, np.zeros(0)).tolist()) for g in first.pruned)
    assert last.total_pruned > first.total_pruned
    assert [s.step for s in result.steps] == [1, 2]
    assert result.steps[1].bflops <= (1 - 0.4) * model.graph.total_bflops + 1e-12
    # every pruned filter is still exactly zero after two finetunes, so transform keeps the outputs
    kept = kept_channels(model, last)
    for layer in model.graph:
        dead = np.flatnonzero(~kept.out[layer.index])
        if layer.type == "convolutional" and len(dead):
            assert not result.model.params[layer.index]["weights"][dead].any()
    small = transform(result.model, last)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    a, b = Network(result.model).forward(x), Network(small).forward(x)
    assert all(np.allclose(a[k], b[k], atol=1e-4 * max(1.0, float(np.abs(a[k]).max()))) for k in a)
    assert small.graph.total_bflops == pytest.approx(result.steps[1].bflops, rel=1e-9)

    # a finished run resumes without training again; a run stopped after step 1 redoes only step 2
    def no_training(*args, **kwargs):
        raise AssertionError("a finished step was trained again")
    monkeypatch.setattr("darkprune.train.finetune.finetune", no_training)
    again = gradual.prune_gradually(model, sens, 2, BUNDLED_DATA, 2, rate=0.4, workspace=ws, resume=True,
                                    progress=False, finetune_options={"batch": 4, "subdivisions": 1})
    assert all(np.array_equal(again.model.params[i][k], result.model.params[i][k]) for i in model.params
               for k in model.params[i])
    (ws / "step2" / "step.json").unlink()
    with pytest.raises(AssertionError, match="trained again"):
        gradual.prune_gradually(model, sens, 2, BUNDLED_DATA, 2, rate=0.4, workspace=ws, resume=True, progress=False)


def test_prune_steps_on_the_command_line_writes_the_last_step_and_resumes(tmp_path, capsys, monkeypatch):
    import json

    import cv2

    from conftest import run_cli
    monkeypatch.setenv("DARKPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny(3)
    cfg, weights = tmp_path / "tiny.cfg", tmp_path / "tiny.weights"
    model.save(cfg, weights)
    images = sorted((BUNDLED_DATA.parent / "images").glob("*.jpg"))
    (tmp_path / "train.txt").write_text("".join(f"{p}\n" for p in images[4:12]))
    (tmp_path / "valid.txt").write_text("".join(f"{p}\n" for p in images[:4]))
    data = tmp_path / "tiny.data"
    data.write_text(f"classes=80\ntrain={tmp_path / 'train.txt'}\nvalid={tmp_path / 'valid.txt'}\n")
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, "ana", cfg, weights, "--data", data, "--rates", "0.25,0.5,0.75", "-w", ws, "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "prune", cfg, weights, "-w", ws, "--rate", "0.3", "--steps", "2", "-q")
    assert code == 1 and "--step-iters is required" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "prune", cfg, weights, "-w", ws, "--rate", "0.3", "--teacher", "original", "-q")
    assert code == 1 and "steps > 1" in err and len(err.strip().splitlines()) == 1
    argv = ["prune", cfg, weights, "-w", ws, "--rate", "0.3", "--steps", "2", "--step-iters", "2", "--reconstruct",
            "--calib-images", "4", "--teacher", "original", "--json", "-q"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    summary = json.loads(out)
    assert [s["step"] for s in summary["gradual"]] == [1, 2] and summary["steps"] == 2
    assert summary["compensated"] and summary["reconstructed"] and summary["calib_images"] == 4
    assert summary["bflops_after"] <= 0.7 * summary["bflops_before"] + 1e-12
    assert summary["gradual"][-1]["bflops"] == pytest.approx(summary["bflops_after"], rel=1e-3)
    assert (ws / "gradual" / "step1" / "step.json").is_file() and (ws / "gradual" / "step2" / "step.json").is_file()
    stamp = (ws / "gradual" / "step2" / "step.weights").stat().st_mtime_ns
    code, out2, err = run_cli(capsys, *argv)                       # the same command: both steps are reused
    assert code == 0 and json.loads(out2)["gradual"] == summary["gradual"]
    assert (ws / "gradual" / "step2" / "step.weights").stat().st_mtime_ns == stamp
    code, out, err = run_cli(capsys, "transform", cfg, "-w", ws, "--json", "-q")
    assert code == 0, err
    small = json.loads(out)
    assert small["bflops_after"] == summary["bflops_after"]
    cv2.dnn.readNetFromDarknet(small["files"]["cfg"], small["files"]["weights"])
