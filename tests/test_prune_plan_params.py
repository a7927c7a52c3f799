"""Planning by a share of the parameters (`plan_by_rate(..., cost="params")`, `prune --rate F --by params`), on a
hand-made conv + connected model whose parameter and BFLOPs counts are worked out by hand, and on the bundled LeNet
through the command line (its parameter count by the closed form of its cfg comment)."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import darkprune as dp
from darkprune.cli import main
from darkprune.darknet import Model, parse_cfg_text
from darkprune.prune.analysis import Sensitivity
from darkprune.prune.masks import live_stats, structure_fingerprint
from darkprune.prune.plan import masks_for_plan, plan_by_rate

from conftest import ROOT

CONV_FC = """[net]
width=8
height=8
channels=3
[convolutional]
filters=4
size=3
pad=1
activation=leaky
[connected]
output=16
activation=leaky
[connected]
output=2
activation=linear
"""
# conv: 4 * (27 + 1) = 112 params, 2*9*3*4*64 = 13824 FLOPs; fc1: reads 4*64 = 256: 256*16 + 16 = 4112 params;
# fc2: 16*2 + 2 = 34 params. Darknet's layer table counts no BFLOPs for connected layers (so a BFLOPs plan can
# never prune one: LeNet's ip1, 93% of its parameters, needs the parameter count).
PARAMS = 112 + 4112 + 34
FLOPS = 13824


def conv_fc():
    return Model.from_cfg(parse_cfg_text(CONV_FC, "convfc.cfg"), seed=0)


def kept_params(filters: int, neurons: int) -> int:
    return filters * 28 + neurons * (filters * 64 + 1) + neurons * 2 + 2


def kept_flops(filters: int) -> int:
    return 2 * 27 * filters * 64


def sensitivity(model, curves, baseline=0.9):
    sens = Sensitivity(structure_fingerprint(model.graph), "top1", baseline, sorted({r for c in curves.values()
                                                                                       for r in c}),
                       "l1", 1, 10, "hand.data")
    sens.curves = {g: dict(c) for g, c in curves.items()}
    sens.groups = {g: {"members": [], "channels": 0} for g in curves}
    sens.assigned = sorted(curves)
    sens.bind(model)
    return sens


def test_params_and_bflops_plans_take_different_groups_first():
    model = conv_fc()
    assert model.graph.total_params == PARAMS and model.graph.total_bflops == pytest.approx(FLOPS / 1e9)
    groups = {model.graph[g.members[0]].type: g.id for g in dp.prune.groups.find_groups(model.graph) if g.prunable}
    conv, fc = groups["convolutional"], groups["connected"]
    # rate 0.25: one of the 4 filters (saves 28 + 64*16 = 1052 params, 3456 FLOPs, loss 0.02) or
    # 4 of the 16 neurons (saves 4 * (257 + 2) = 1036 params, no FLOPs by Darknet's count, loss 0.01).
    sens = sensitivity(model, {conv: {0.25: 0.88, 0.5: 0.80}, fc: {0.25: 0.89, 0.5: 0.85}})
    # per parameter, the neurons are cheaper (0.01 / 1036 < 0.02 / 1052); per FLOP, only the filter saves any
    by_params = plan_by_rate(model, sens, 0.1, cost="params")
    assert by_params.rates == {fc: 0.25} and by_params.predicted_loss == pytest.approx(0.01)
    assert by_params.details["cost"] == "params" and by_params.details["params_total"] == PARAMS
    assert by_params.details["params_removed"] == PARAMS - kept_params(4, 12)
    by_flops = plan_by_rate(model, sens, 0.1)
    assert by_flops.rates == {conv: 0.25}
    assert by_flops.details["bflops_removed"] * 1e9 == pytest.approx(FLOPS - kept_flops(3))
    assert sens.plan(rate=0.1, by="params").rates == by_params.rates
    # 40% of the parameters (1703.2): the neurons first (1036), then the filter (both: 4258 - 2698 = 1560 left)
    plan = plan_by_rate(model, sens, 0.4, cost="params")
    assert plan.rates == {fc: 0.25, conv: 0.25}
    stats = live_stats(model, masks_for_plan(model, plan))
    assert stats["total_params"] == kept_params(3, 12) <= 0.6 * PARAMS
    with pytest.raises(dp.DarkpruneError, match="share of parameters"):
        plan_by_rate(model, sens, 1.2, cost="params")
    with pytest.raises(dp.DarkpruneError, match="by flops: expected one of bflops, params"):
        plan_by_rate(model, sens, 0.1, cost="flops")


def test_the_plan_steps_back_from_a_hull_step_that_overshoots():
    model = conv_fc()
    groups = {model.graph[g.members[0]].type: g.id for g in dp.prune.groups.find_groups(model.graph) if g.prunable}
    conv, fc = groups["convolutional"], groups["connected"]
    # fc at 0.5 (8 neurons, 2072 params, loss 0.011) lies below the chord to 0.25 (1036, 0.01): the hull skips 0.25
    sens = sensitivity(model, {conv: {0.25: 0.88, 0.5: 0.80}, fc: {0.25: 0.89, 0.5: 0.889}})
    # 20% = 851.6 params: the walk's first step (fc to 0.5) overshoots; fc at 0.25 reaches it for less loss
    plan = plan_by_rate(model, sens, 0.2, cost="params")
    assert plan.rates == {fc: 0.25} and plan.predicted_loss == pytest.approx(0.01)
    assert plan.details["params_removed"] == PARAMS - kept_params(4, 12) >= 0.2 * PARAMS
    # 30% = 1277.4: fc at 0.25 alone is not enough, so the walk's plan stays
    plan = plan_by_rate(model, sens, 0.3, cost="params")
    assert plan.rates == {fc: 0.5} and plan.details["params_removed"] == PARAMS - kept_params(4, 8)


def lenet_params(c1: int, c2: int, n: int) -> int:
    """cfg/lenet.cfg with c1 / c2 conv filters and n ip1 neurons: 5x5 convs, 4x4 after the second pool."""
    return c1 * 26 + c2 * (25 * c1 + 1) + n * (16 * c2 + 1) + 10 * n + 10


def test_cli_prune_by_params_on_the_bundled_lenet(tmp_path, capsys):
    cfg, weights = ROOT / "cfg" / "lenet.cfg", ROOT / "weights" / "lenet.weights"
    assert lenet_params(20, 50, 500) == 431080 == dp.load(cfg, weights).graph.total_params
    # a few images (the plan's parameter count does not depend on what they show)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(6):
        path = tmp_path / f"img{k}_c{k % 10}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (28, 28), dtype=np.uint8))
        lines.append(str(path))
    (tmp_path / "valid.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.txt").write_text("".join(f"c{d}\n" for d in range(10)))
    data = tmp_path / "digits.data"
    data.write_text(f"classes=10\nvalid={tmp_path / 'valid.txt'}\nlabels={tmp_path / 'labels.txt'}\n")
    ws = tmp_path / "ws"
    assert main(["ana", str(cfg), str(weights), "--data", str(data), "--rates", "0.5,0.8", "-w", str(ws), "-q"]) == 0
    capsys.readouterr()
    assert main(["prune", str(cfg), str(weights), "-w", str(ws), "--rate", "0.7", "--by", "params", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    counts = {row["name"]: row["out_channels"] for row in summary["layers"]}
    expected = lenet_params(counts.get("conv0", 20), counts.get("conv2", 50), counts.get("connected4", 500))
    assert summary["params_after"] == expected <= 0.3 * 431080
    assert summary["target"] == 0.7 and summary["mode"] == "rate"
    # the same from a config file
    (tmp_path / "prune.conf").write_text(f"workspace={ws}\nrate=0.7\nby=params\n")
    assert main(["prune", str(cfg), str(weights), "--config", str(tmp_path / "prune.conf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_after"] == expected
    # and the transformed pair loads in OpenCV with the parameters the closed form gives
    assert main(["transform", str(cfg), "-w", str(ws), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    cv2.dnn.readNetFromDarknet(files["cfg"], files["weights"])
    floats = (Path(files["weights"]).stat().st_size - 20) // 4       # header: major 0, minor 2, int64 seen
    assert floats == expected
    # an unknown unit is refused, on the command line (usage error) and in a config (one line naming it)
    with pytest.raises(SystemExit) as usage:
        main(["prune", str(cfg), str(weights), "-w", str(ws), "--rate", "0.7", "--by", "flops"])
    assert usage.value.code == 2
    (tmp_path / "bad.conf").write_text(f"workspace={ws}\nrate=0.7\nby=flops\n")
    capsys.readouterr()
    assert main(["prune", str(cfg), str(weights), "--config", str(tmp_path / "bad.conf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "flops" in err and "bflops, params" in err and "\n" not in err
