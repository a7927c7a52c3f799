"""The workflow on the bundled real detector (Yolo-Fastest 1.1) and real labeled images (coco128 val2017):
a threshold sweep from the command line, and the Python API of DESIGN.md. OpenCV's Darknet importer is the
reference for what the written pairs compute.

The promise of a threshold, as checked here (see darkprune/sweep.py): every pruned group, pruned alone, cost at most
the threshold on the analysed images; the pruned model as a whole, with n groups pruned, loses at most
n x (threshold + noise), where noise is the measurement noise of the analysis (the largest metric gain any group
showed when pruned alone: pruning never truly helps, so that is the size of chance swings on these images)."""
import json

import numpy as np
import pytest

import darkprune as dp
from darkprune.cli import main
from darkprune.prune.analysis import Sensitivity, prunable_groups
from darkprune.prune.masks import live_stats
from darkprune.prune.plan import masks_for_plan, plan_by_threshold

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS

cv2 = pytest.importorskip("cv2")

THRESHOLDS = [0.005, 0.01, 0.02, 0.05]
IMAGES = 16


def opencv_outputs(cfg, weights, x) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setInput(x)
    return [np.array(o, copy=True) for o in net.forward(net.getUnconnectedOutLayersNames())]


def assert_same_in_opencv(a_pair, b_pair, x):
    for a, b in zip(opencv_outputs(*a_pair, x), opencv_outputs(*b_pair, x)):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(a).max())


def test_threshold_sweep_from_the_command_line(tmp_path, capsys):
    ws = tmp_path / "ws"
    code = main(["sweep", str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--data", str(BUNDLED_DATA), "-w", str(ws),
                 "--limit", str(IMAGES), "--rates", "0.3,0.6", "--thresholds", ",".join(map(str, THRESHOLDS)),
                 "--timing-repeats", "3", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") == 1
    result = json.loads(out)
    assert result == json.loads((ws / "sweep.json").read_text())
    assert (ws / "sweep.png").stat().st_size > 0 and (ws / "sensitivity.png").stat().st_size > 0
    original, *rows = result["rows"]
    assert [r["threshold"] for r in rows] == THRESHOLDS
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    assert original["bflops"] == pytest.approx(model.graph.total_bflops, abs=1e-6)
    sens = Sensitivity.load(ws / "sensitivity.json", model)
    assert sens.images == IMAGES and sens.complete and len(sens.curves) == len(prunable_groups(model))
    for row in rows:
        # the written pair loads in OpenCV and is as small as the plan said
        assert row["opencv_loads"]
        small = dp.load(row["cfg"], row["weights"])
        assert small.graph.total_params == row["params"] == row["params_live_stats"] < original["params"]
        assert row["bflops"] == pytest.approx(row["bflops_live_stats"]) and row["bflops"] < original["bflops"]
        assert row["ours_ms"] > 0 and row["opencv_ms"] > 0
    # more threshold, more pruned
    assert [r["bflops"] for r in rows] == sorted((r["bflops"] for r in rows), reverse=True)

    # The smallest threshold: each pruned group cost at most the threshold on its own, and the whole model's loss
    # stays within n x (threshold + noise).
    smallest = rows[0]
    plan = plan_by_threshold(sens, THRESHOLDS[0])
    assert {int(g): r for g, r in smallest["group_rates"].items()} == plan.rates
    for gid, rate in plan.rates.items():
        assert sens.loss(gid, rate) <= THRESHOLDS[0] + 1e-12
    print(f"\nsmallest threshold {THRESHOLDS[0]}: {smallest['groups_pruned']} groups, measured loss "
          f"{smallest['loss']:+.4f}, predicted {smallest['predicted_loss']:.4f}, noise {result['noise']:.4f}, "
          f"groups x threshold {smallest['loss_bound']:.4f}, promise {smallest['promise']:.4f}")
    n = smallest["groups_pruned"]
    assert smallest["promise"] == pytest.approx(n * (THRESHOLDS[0] + result["noise"]))
    assert result["noise"] == max([0.0] + [v - sens.baseline for c in sens.curves.values() for v in c.values()])
    assert smallest["loss"] <= smallest["promise"] + 1e-12
    assert smallest["within_promise"]
    assert smallest["loss"] == pytest.approx(sens.baseline - smallest["map50"])

    # what the smallest threshold's pair computes is what the masked model computes (in OpenCV)
    masked = dp.prune(model, plan)
    masked.save(tmp_path / "masked.cfg", tmp_path / "masked.weights")
    x = np.random.default_rng(0).random((1, *model.input_shape), dtype=np.float32)
    assert_same_in_opencv((tmp_path / "masked.cfg", tmp_path / "masked.weights"),
                          (smallest["cfg"], smallest["weights"]), x)
    assert live_stats(model, masks_for_plan(model, plan))["total_params"] == smallest["params"]


def test_python_api_of_the_design(tmp_path):
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    data = dp.load_data(BUNDLED_DATA, split="valid", limit=4)
    keep = {3, 16, 24, 33}
    exclude = [model.graph[g.members[0]].name for g in prunable_groups(model) if g.id not in keep]
    sens = dp.analyze(model, data, rates=[0.25, 0.5, 0.75], exclude=exclude, progress=False)
    assert sorted(sens.curves) == sorted(keep) and sens.metric == "map50"
    sens.save(tmp_path / "sens.json")
    assert Sensitivity.load(tmp_path / "sens.json", model).curves == sens.curves

    plan = sens.plan(threshold=sens.baseline / 2)
    assert plan.rates and all(sens.loss(g, r) <= sens.baseline / 2 for g, r in plan.rates.items())
    by_rate = sens.plan(rate=0.02)
    assert by_rate.details["bflops_removed"] >= 0.02 * model.graph.total_bflops

    masked = dp.prune(model, plan)
    assert masked.graph.total_params == model.graph.total_params          # same shapes
    for gid, chans in masked.masks.pruned.items():
        for part in dp.prune.groups.build_grouping(model.graph).group(gid).parts:
            assert not masked.params[part.layer]["weights"][part.channels[chans]].any()
    small = dp.transform(masked)
    small.save(tmp_path / "small.cfg", tmp_path / "small.weights")
    masked.save(tmp_path / "masked.cfg", tmp_path / "masked.weights")
    assert dp.load(tmp_path / "small.cfg", tmp_path / "small.weights").graph.total_params < model.graph.total_params
    x = np.random.default_rng(1).random((1, *model.input_shape), dtype=np.float32)
    assert_same_in_opencv((tmp_path / "masked.cfg", tmp_path / "masked.weights"),
                          (tmp_path / "small.cfg", tmp_path / "small.weights"), x)
