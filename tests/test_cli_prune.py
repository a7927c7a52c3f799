"""The `ana`, `prune`, `transform` commands as a user meets them: one JSON object with --json, --config files
(key=value lines and Vitis AI pruner main cfgs), and refusals with one line naming the file or layer at fault,
exit code 1, nothing written and no input changed."""
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest

import darkprune as dp
from darkprune.cli import main
from darkprune.prune.analysis import Sensitivity, prunable_groups

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS, ROOT, asset

cv2 = pytest.importorskip("cv2")

KEEP = {3, 16, 33}            # groups analysed in these tests: conv4+5 (160x160), conv48+49, conv119
IMAGES = 4


@pytest.fixture(scope="module")
def model():
    return dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)


@pytest.fixture(scope="module")
def exclude(model):
    return ",".join(model.graph[g.members[0]].name for g in prunable_groups(model) if g.id not in KEEP)


def small_data(folder: Path, count: int = IMAGES) -> Path:
    """A .data over the first `count` bundled images (absolute paths; labels found by Darknet's rule)."""
    images = sorted((BUNDLED_DATA.parent / "images").glob("*.jpg"))[:count]
    (folder / "valid.txt").write_text("".join(f"{p}\n" for p in images))
    data = folder / "small.data"
    data.write_text(f"classes=80\nvalid={folder / 'valid.txt'}\nnames={ROOT / 'cfg' / 'coco.names'}\n")
    return data


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, exclude):
    """A workspace with a finished analysis (3 groups, 2 rates, 4 images)."""
    ws = tmp_path_factory.mktemp("analysed") / "ws"
    code = main(["ana", str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "--data", str(BUNDLED_DATA), "--limit", str(IMAGES),
                 "--rates", "0.3,0.7", "--exclude", exclude, "-w", str(ws), "-q"])
    assert code == 0
    return ws


def copy_ws(analysed, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(analysed, ws)
    return ws


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        # as on a terminal: warnings printed to stderr (pytest would otherwise collect them)
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------------------------
def test_each_step_prints_one_json_object(analysed, tmp_path, capsys, exclude):
    ws = copy_ws(analysed, tmp_path)
    code, out, err = run(capsys, "ana", BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", BUNDLED_DATA, "--limit", IMAGES,
                         "--rates", "0.3,0.7", "--exclude", exclude, "-w", ws, "--json")
    assert code == 0 and out.count("\n") == 1
    ana = json.loads(out)
    assert ana["format"] == "darkprune-sensitivity" and sorted(g["id"] for g in ana["groups"]) == sorted(KEEP)
    baseline = ana["baseline"]
    assert baseline > 0

    code, out, err = run(capsys, "prune", BUNDLED_CFG, BUNDLED_WEIGHTS, "-w", ws, "--threshold", baseline / 2,
                         "--json")
    assert code == 0 and out.count("\n") == 1
    pruned = json.loads(out)
    assert pruned["metric"] == "map50" and pruned["metric_before"] == baseline
    assert pruned["groups_pruned"] >= 1 and pruned["bflops_after"] < pruned["bflops_before"]
    assert Path(pruned["files"]["weights"]).exists() and Path(pruned["files"]["masks"]).exists()

    code, out, err = run(capsys, "transform", BUNDLED_CFG, "-w", ws, "--json")
    assert code == 0 and out.count("\n") == 1
    small = json.loads(out)
    assert small["params_after"] == pruned["params_after"] and small["bflops_after"] == pruned["bflops_after"]
    # what transform wrote loads in OpenCV, with the params the summary states
    cfg, weights = small["files"]["cfg"], small["files"]["weights"]
    cv2.dnn.readNetFromDarknet(cfg, weights)
    assert dp.load(cfg, weights).graph.total_params == small["params_after"]
    # and the text form of the same steps goes to stdout, progress and logs to stderr
    code, out, err = run(capsys, "transform", BUNDLED_CFG, "-w", ws)
    assert code == 0 and "transform:" in out and "written:" in out and not out.lstrip().startswith("{")


def test_key_value_config_runs_a_step_and_the_workspace_keeps_it(tmp_path, capsys, exclude):
    data = small_data(tmp_path)
    config = tmp_path / "run.conf"
    config.write_text(f"# one file for the whole run\ncfg={BUNDLED_CFG}\nweights={BUNDLED_WEIGHTS}\ndata={data}\n"
                      f"workspace={tmp_path / 'ws'}\nrates=0.5\nexclude={exclude}\nthreshold=0.01\n"
                      f"iters=100\nthreshhold=0.02\n")
    code, out, err = run(capsys, "ana", "--config", config, "--json")
    assert code == 0, err
    assert "threshhold" in err and "not darkprune options" in err       # a typo is named, not silently dropped
    assert "iters" not in err                                          # another step's setting is not a typo
    sens = Sensitivity.load(tmp_path / "ws" / "sensitivity.json")
    assert sens.rates == [0.5] and sens.images == IMAGES and sorted(sens.curves) == sorted(KEEP)
    kept = (tmp_path / "ws" / "config.ana.txt").read_text()
    assert f"data={data}" in kept and "rates=0.5" in kept
    # the kept config reruns the step from anywhere: the finished analysis is found, nothing is redone
    code, out, err = run(capsys, "ana", "--config", tmp_path / "ws" / "config.ana.txt", "-w", tmp_path / "ws",
                         "--json")
    assert code == 0 and json.loads(out)["groups"] == json.loads(json.dumps(sens.to_json()))["groups"]
    # a flag overrides the file; a bad value names the file and line
    bad = tmp_path / "bad.conf"
    bad.write_text(f"cfg={BUNDLED_CFG}\nweights={BUNDLED_WEIGHTS}\nworkspace={tmp_path / 'ws'}\nthreshold=abc\n")
    code, out, err = run(capsys, "prune", "--config", bad)
    assert code == 1 and f"{bad}:4: threshold=abc" in err and err.count("\n") == 1
    code, out, err = run(capsys, "prune", "--config", bad, "--threshold", "0.01", "--json")
    assert code == 0, err


def test_vitis_ai_main_cfg_as_vai_p_darknet_takes_it(tmp_path, capsys, model):
    data = small_data(tmp_path)
    keep = [g for g in prunable_groups(model) if g.id in KEEP]
    ignore = sorted(g.members[0] for g in prunable_groups(model) if g.id not in KEEP) + [120, 129]   # + head convs
    main_cfg = tmp_path / "pruning.cfg"
    main_cfg.write_text(
        "[pruning]\n"
        f"workspace={tmp_path / 'pruning'}\n"
        f"datacfg={data}\n"
        f"modelcfg={BUNDLED_CFG}\n"
        f"prunedcfg={tmp_path / 'pruning' / 'fastest-prune.cfg'}\n"
        f"ana_out_file={tmp_path / 'ana.out'}\n"
        f"prune_out_weights={tmp_path / 'weights.prune'}\n"
        "criteria=0\n"
        "kernel_batch=2\n"
        f"ignore_layer={','.join(map(str, ignore))}\n"
        "yolov3=1\n"
        "threshold=0.9\n")
    code, out, err = run(capsys, "ana", main_cfg, BUNDLED_WEIGHTS, "--rates", "0.5,0.75")
    assert code == 0, err
    assert "'yolov3' is not supported" in err and f"{main_cfg}:11" in err
    assert "never pruned anyway" in err                                   # the head convs in ignore_layer
    sens = Sensitivity.load(tmp_path / "pruning" / "sensitivity.json")
    assert sorted(sens.curves) == sorted(KEEP) and sens.criterion == "l1" and sens.divisible == 2
    assert "sensitivity:" in (tmp_path / "ana.out").read_text()
    # threshold=0.9 is not below the model's mAP: refused, nothing written
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "prune", main_cfg, BUNDLED_WEIGHTS)
    assert code == 1 and [l for l in err.splitlines() if not l.startswith("warning:")] == \
        [l for l in err.splitlines() if "--threshold 0.9 is not below" in l]
    assert snapshot(tmp_path) == before
    main_cfg.write_text(main_cfg.read_text().replace("threshold=0.9", f"threshold={sens.baseline / 2}"))
    code, out, err = run(capsys, "prune", main_cfg, BUNDLED_WEIGHTS, "--json")
    assert code == 0, err
    assert json.loads(out)["files"]["weights"] == str(tmp_path / "weights.prune")
    code, out, err = run(capsys, "transform", main_cfg, tmp_path / "weights.prune", "--json")
    assert code == 0, err
    cfg, weights = tmp_path / "pruning" / "fastest-prune.cfg", tmp_path / "pruning" / "fastest-prune.weights"
    assert json.loads(out)["files"] == {"cfg": str(cfg), "weights": str(weights)}
    cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    small = dp.load(cfg, weights)
    for g in keep:                          # kernel_batch=2: every pruned member keeps an even number of filters
        for m in g.members:
            assert small.graph[m].out_shape[0] % 2 == 0
    assert small.graph.total_params < model.graph.total_params


# ---------------------------------------------------------------------------------------------------------------
# Refusals: exit 1, one line on stderr naming what is wrong, no output written, no input changed.

def refusal_cases(tmp: Path, ws: Path, exclude: str):
    cfg, weights, data = BUNDLED_CFG, BUNDLED_WEIGHTS, BUNDLED_DATA
    nothing = tmp / "nothing.data"
    nothing.write_text(f"classes=80\nvalid={tmp / 'no-such-list.txt'}\nnames={ROOT / 'cfg' / 'coco.names'}\n")
    (tmp / "a-file").write_text("x")
    other_cfg = asset("models", "yoloface", "yoloface-500k-v2.cfg")
    fresh = tmp / "fresh-ws"
    empty = tmp / "empty-ws"
    empty.mkdir(exist_ok=True)
    ana = ["ana", cfg, weights, "--data", data, "--limit", IMAGES, "--rates", "0.3,0.7", "--exclude", exclude]
    return {
        "data-missing": (["ana", cfg, weights, "--data", tmp / "missing.data", "-w", fresh], "missing.data"),
        "data-points-at-nothing": (["ana", cfg, weights, "--data", nothing, "-w", fresh], "no-such-list.txt"),
        "rate-of-one": (["ana", cfg, weights, "--data", data, "--rates", "0.5,1", "-w", fresh], "--rates 1"),
        "unknown-exclude": (["ana", cfg, weights, "--data", data, "--exclude", "conv5,conv999", "-w", fresh],
                            "conv999"),
        "exclude-out-of-range": (["ana", cfg, weights, "--data", data, "--exclude", "500", "-w", fresh],
                                 "--exclude 500"),
        "weights-for-another-cfg": (["ana", asset("cfg", "yolov4-tiny.cfg"), weights, "--data", data, "-w", fresh],
                                    "yolo-fastest-1.1.weights"),
        "workspace-of-another-model": (["ana", other_cfg, other_cfg.with_suffix(".weights"), "--data", data,
                                        "-w", ws], "made for another model"),
        "data-for-another-model": (["ana", other_cfg, other_cfg.with_suffix(".weights"), "--data", data, "--limit",
                                    "2", "-w", fresh], "classes=80"),
        "resume-with-other-settings": ([*ana[:-4], "--rates", "0.5", "--exclude", exclude, "-w", ws],
                                       "other settings is already here (rates"),
        "workspace-under-a-file": ([*ana, "-w", tmp / "a-file" / "ws"], "cannot create the workspace folder"),
        "workspace-is-a-file": ([*ana, "-w", tmp / "a-file"], "must be a folder"),
        "prune-without-workspace": (["prune", cfg, weights, "-w", fresh, "--threshold", "0.01"],
                                    "no such workspace"),
        "prune-before-ana": (["prune", cfg, weights, "-w", empty, "--threshold", "0.01"], "run `darkprune ana`"),
        "negative-threshold": (["prune", cfg, weights, "-w", ws, "--threshold", "-0.01"], "--threshold -0.01"),
        "threshold-empties-layers": (["prune", cfg, weights, "-w", ws, "--threshold", "0.99"],
                                     "--threshold 0.99 is not below"),
        "rate-zero": (["prune", cfg, weights, "-w", ws, "--rate", "0"], "--rate 0"),
        "rate-above-one": (["prune", cfg, weights, "-w", ws, "--rate", "1.5"], "--rate 1.5"),
        "prune-unknown-exclude": (["prune", cfg, weights, "-w", ws, "--threshold", "0.01", "--exclude", "convX"],
                                  "convX"),
        "prune-other-weights": (["prune", cfg, tmp / "other.weights", "-w", ws, "--threshold", "0.01"],
                                "analysed with other weights"),
        "transform-before-prune": (["transform", cfg, weights, "-w", ws], "run `darkprune prune` first"),
        "transform-over-input": (["transform", cfg, weights, "-w", tmp / "pruned-ws", "-o", Path(cfg).with_suffix("")],
                                 "overwrite an input"),
        "config-missing": (["prune", "--config", tmp / "none.conf"], "none.conf"),
    }


CASES = ["data-missing", "data-points-at-nothing", "rate-of-one", "unknown-exclude", "exclude-out-of-range",
         "weights-for-another-cfg", "workspace-of-another-model", "data-for-another-model",
         "resume-with-other-settings", "workspace-under-a-file", "workspace-is-a-file",
         "prune-without-workspace", "prune-before-ana", "negative-threshold", "threshold-empties-layers",
         "rate-zero", "rate-above-one", "prune-unknown-exclude", "prune-other-weights", "transform-before-prune",
         "transform-over-input", "config-missing"]


@pytest.fixture(scope="module")
def refusal_dir(analysed, tmp_path_factory, model):
    """A scratch folder: the analysed workspace, one with masks, and weights that differ in one value."""
    tmp = tmp_path_factory.mktemp("refusals")
    shutil.copytree(analysed, tmp / "ws")
    shutil.copytree(analysed, tmp / "pruned-ws")
    other = model.copy()
    other.params[0]["biases"][0] += 0.5
    other.save(tmp / "other.cfg", tmp / "other.weights")
    sens = Sensitivity.load(tmp / "ws" / "sensitivity.json")
    assert main(["prune", str(BUNDLED_CFG), str(BUNDLED_WEIGHTS), "-w", str(tmp / "pruned-ws"), "-q",
                 "--threshold", str(sens.baseline / 2)]) == 0
    return tmp


@pytest.mark.parametrize("case", CASES)
def test_refusals_are_one_line_and_leave_everything_as_it_was(case, refusal_dir, capsys, exclude):
    tmp = refusal_dir
    argv, needle = refusal_cases(tmp, tmp / "ws", exclude)[case]
    inputs = [a for a in argv if isinstance(a, Path) and a.is_file()]
    hashes = {p: sha(p) for p in inputs + [BUNDLED_CFG, BUNDLED_WEIGHTS, BUNDLED_DATA]}
    before = snapshot(tmp)
    code, out, err = run(capsys, *argv)
    assert code == 1, err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert out == ""
    assert snapshot(tmp) == before                       # nothing created, written or touched
    assert {p: sha(p) for p in hashes} == hashes         # inputs unchanged
