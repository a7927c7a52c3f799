"""`darkprune finetune` on a workspace made by `prune` (tiny model, bundled coco128-val images), and the Darknet
hand-off against a fake `darknet` executable that checks the command line and files it is given the way Darknet
reads them, prints progress lines and writes weights into backup/ (changing every value, pruned ones included)."""
import json
import stat
import sys

import numpy as np
import pytest

from darkprune.cli import main
from darkprune.darknet import load
from darkprune.prune.masks import apply_masks
from darkprune.train.finetune import parameter_masks

from test_train_finetune import VAL_DATA, channel_masks, tiny_yolo


@pytest.fixture()
def pruned_workspace(tmp_path):
    """A workspace as `darkprune prune` leaves it: pruned.cfg/.weights (masked) and masks.json; plus the original."""
    model = tiny_yolo(5)
    model.save(tmp_path / "tiny.cfg", tmp_path / "tiny.weights")
    model = load(tmp_path / "tiny.cfg", tmp_path / "tiny.weights")
    masks = channel_masks(model)
    ws = tmp_path / "ws"
    ws.mkdir()
    masks.save(ws / "masks.json")
    apply_masks(model, masks).save(ws / "pruned.cfg", ws / "pruned.weights")
    return tmp_path, ws, model, masks


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_masks_hold(weights_path, cfg_path, model, masks):
    trained = load(cfg_path, weights_path)
    keep, _ = parameter_masks(model, masks)
    for (i, name), mask in keep.items():
        assert not trained.params[i][name][~mask].any(), f"layer {i} {name}: a pruned weight is not zero"
    return trained


def test_finetune_command_holds_the_workspace_masks(pruned_workspace, capsys):
    root, ws, model, masks = pruned_workspace
    code, out, err = run_cli(["finetune", "--data", str(VAL_DATA), "-w", str(ws), "--iters", "3", "--batch", "4",
                              "--limit", "8", "--checkpoint-every", "2", "--json"], capsys)
    assert code == 0, err
    payload = json.loads(out)                      # one JSON object, nothing else on stdout
    assert payload["masks_held"] and payload["pruned_still_zero"]
    assert payload["weights_in"] == str(ws / "pruned.weights")
    assert payload["iterations"] == 3 and payload["metric"] == "map50"
    assert payload["metric_before"] is not None and payload["metric_after"] is not None
    for name in ("finetuned.cfg", "finetuned.weights", "finetune_loss.png", "config.finetune.txt",
                 "finetune/checkpoint-0000002.npz", "finetune/checkpoint-0000003.sha256"):
        assert (ws / name).is_file(), name
    assert json.loads((ws / "summary.json").read_text())["finetune"]["iterations"] == 3
    assert_masks_hold(ws / "finetuned.weights", ws / "finetuned.cfg", model, masks)

    # --resume of a finished run changes nothing; a corrupt checkpoint is one clear line and exit code 1
    before = (ws / "finetuned.weights").read_bytes()
    code, out, err = run_cli(["finetune", "--data", str(VAL_DATA), "-w", str(ws), "--iters", "3", "--batch", "4",
                              "--limit", "8", "--checkpoint-every", "2", "--resume", "--json", "-q"], capsys)
    assert code == 0, err
    assert json.loads(out)["start_iteration"] == 3
    assert (ws / "finetuned.weights").read_bytes() == before
    ckpt = ws / "finetune" / "checkpoint-0000003.npz"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    code, out, err = run_cli(["finetune", "--data", str(VAL_DATA), "-w", str(ws), "--iters", "3", "--batch", "4",
                              "--resume", "-q"], capsys)
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "checksum mismatch" in lines[0] and "checkpoint-0000003.npz" in lines[0]


def test_finetune_text_summary_and_usage_errors(pruned_workspace, capsys):
    root, ws, model, masks = pruned_workspace
    code, out, err = run_cli([ "finetune", str(root / "tiny.cfg"), str(root / "tiny.weights"), "--data",
                               str(VAL_DATA), "-w", str(ws), "--iters", "2", "--batch", "2", "--limit", "4", "-q"],
                             capsys)
    assert code == 0, err
    assert "map50:" in out and "pruned weights still exactly zero: yes" in out and "finetuned.weights" in out
    code, out, err = run_cli(["finetune", "-w", str(ws), "--iters", "2"], capsys)
    assert code == 1 and "--data" in err


FAKE_DARKNET = """\
#!{python}
# A stand-in for Darknet's CLI: `darknet detector|classifier train DATA CFG WEIGHTS [flags]`.
import os, sys
import numpy as np
args = sys.argv[1:]
flags = [a for a in args if a.startswith("-")]
pos = [a for a in args if not a.startswith("-") and a not in ("0,1",)]
if len(pos) != 5 or pos[0] not in ("detector", "classifier") or pos[1] != "train":
    print("usage: darknet detector train DATA CFG WEIGHTS", file=sys.stderr); sys.exit(2)
kind, _, data, cfg, weights = pos
for f in (data, cfg, weights):
    if not os.path.isabs(f) or not os.path.isfile(f):
        print("Couldn't open file: " + f); sys.exit(1)
assert "-dont_show" in flags and "-clear" in flags, flags
options = dict(line.strip().split("=", 1) for line in open(data) if "=" in line)
for key in ("train", "valid", "names"):
    assert os.path.isabs(options[key]), (key, options[key])
first_image = open(options["train"]).readline().strip()
assert os.path.isabs(first_image) and os.path.isfile(first_image), first_image
backup = options["backup"]
assert os.path.isdir(backup), backup
net = {{}}
for line in open(cfg):
    if line.startswith("[") and net:
        break
    if "=" in line:
        k, v = line.strip().split("=", 1)
        net[k] = v
max_batches = int(net["max_batches"])
expect_gpus = os.environ.get("FAKE_EXPECT_GPUS")
if expect_gpus:
    assert args[args.index("-gpus") + 1] == expect_gpus
print(os.path.basename(cfg).rsplit(".", 1)[0])
print("Learning Rate: %s, Momentum: 0.9, Decay: 0.0005" % net["learning_rate"])
for i in range(1, max_batches + 1):
    sys.stdout.write("\\r %d: %f, %f avg loss, %s rate, 0.1 seconds, %d images"
                     % (i, 5.0 / i, 5.0 / i, net["learning_rate"], i * 64))
    sys.stdout.flush()
print()
if os.environ.get("FAKE_FAIL"):
    print("CUDA Error: out of memory"); sys.exit(3)
raw = open(weights, "rb").read()
values = np.frombuffer(raw[20:], "<f4") + np.float32(0.01)
base = os.path.basename(cfg).rsplit(".", 1)[0]
with open(os.path.join(backup, base + "_final.weights"), "wb") as fh:
    fh.write(raw[:20] + values.astype("<f4").tobytes())
print("Saving weights to " + os.path.join(backup, base + "_final.weights"))
"""


@pytest.fixture()
def fake_darknet(tmp_path):
    path = tmp_path / "bin" / "darknet"
    path.parent.mkdir()
    path.write_text(FAKE_DARKNET.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_darknet_handoff_masked_pair(pruned_workspace, fake_darknet, capsys, monkeypatch):
    root, ws, model, masks = pruned_workspace
    monkeypatch.setenv("FAKE_EXPECT_GPUS", "0,1")
    code, out, err = run_cli(["finetune", "--data", str(VAL_DATA), "-w", str(ws), "--iters", "7", "--lr", "0.0002",
                              "--limit", "4", "--engine", "darknet", "--darknet", str(fake_darknet), "--gpus", "0,1",
                              "--json"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    cmd = payload["command"]
    assert cmd[1:3] == ["detector", "train"] and "-map" in cmd and cmd[cmd.index("-gpus") + 1] == "0,1"
    assert " 7: 0.714286, 0.714286 avg loss" in err            # Darknet's progress streamed to stderr
    assert "cannot hold masks" in err
    darknet_cfg = (ws / "darknet" / "finetune.cfg").read_text()
    assert "max_batches=7" in darknet_cfg and "learning_rate=0.0002" in darknet_cfg
    assert payload["weights_from"].endswith("backup/finetune_final.weights")
    # Darknet revived every pruned weight (the fake adds 0.01 everywhere); they were cleared again
    assert payload["revived"]["weights"] > 0 and payload["revived"]["max_abs"] == pytest.approx(0.01)
    trained = assert_masks_hold(ws / "finetuned.weights", ws / "finetuned.cfg", model, masks)
    start = load(ws / "darknet" / "finetune.cfg", ws / "darknet" / "start.weights")
    assert start.header.seen == 0
    keep, _ = parameter_masks(model, masks)
    w_start, w_out, mask = start.params[4]["weights"], trained.params[4]["weights"], keep[(4, "weights")]
    np.testing.assert_allclose(w_out[mask], w_start[mask] + np.float32(0.01), rtol=0, atol=1e-6)


def test_darknet_handoff_transformed_pair(pruned_workspace, fake_darknet, capsys):
    root, ws, model, masks = pruned_workspace
    code, out, err = run_cli(["finetune", "--data", str(VAL_DATA), "-w", str(ws), "--iters", "3", "--limit", "4",
                              "--engine", "darknet", "--darknet", str(fake_darknet), "--transformed", "-q",
                              "--json"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["transformed"] and not payload["revived"]
    small = load(ws / "finetuned-transformed.cfg", ws / "finetuned-transformed.weights")
    assert small.graph.total_params < model.graph.total_params
    assert not (ws / "finetuned.weights").exists()


def test_darknet_handoff_errors(pruned_workspace, fake_darknet, capsys, monkeypatch, tmp_path):
    root, ws, model, masks = pruned_workspace
    base = ["finetune", "--data", str(VAL_DATA), "-w", str(ws), "--iters", "2", "--limit", "2", "--engine",
            "darknet", "-q"]
    code, out, err = run_cli(base + ["--darknet", str(tmp_path / "nowhere" / "darknet")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no such file" in err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = run_cli(base, capsys)
    assert code == 1 and "Darknet executable not found" in err
    monkeypatch.setenv("FAKE_FAIL", "1")
    code, out, err = run_cli(base + ["--darknet", str(fake_darknet)], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].endswith("darknet exited with code 3 (last line: CUDA Error: out of memory)")


def test_killed_run_resumes_to_the_same_weights(pruned_workspace, tmp_path):
    """SIGKILL a `darkprune finetune` process after its third checkpoint; --resume finishes it with exactly the
    weights of an uninterrupted run."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    root, ws, model, masks = pruned_workspace
    other = tmp_path / "ws-straight"
    shutil.copytree(ws, other)
    env = dict(os.environ, DARKPRUNE_QUIET="1")

    iters = 60  # long enough that the kill lands mid-run: the engine gets through a tiny model's iteration fast

    def command(workspace, *extra):
        return [sys.executable, "-m", "darkprune", "finetune", "--data", str(VAL_DATA), "-w", str(workspace),
                "--iters", str(iters), "--batch", "2", "--checkpoint-every", "1", "--limit", "2", "-q", *extra]

    def checkpoints_written():
        # a checkpoint replaces the one before it, so poll for any number from 3 on, not for the third itself
        return max((int(f.stem.split("-")[1]) for f in (ws / "finetune").glob("checkpoint-*.sha256")), default=0)

    straight = subprocess.run(command(other), env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(command(ws), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while checkpoints_written() < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its 3rd checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / "finetuned.weights").exists()
    resumed = subprocess.run(command(ws, "--resume", "--json"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert 3 <= json.loads(resumed.stdout)["start_iteration"] < iters
    assert (ws / "finetuned.weights").read_bytes() == (other / "finetuned.weights").read_bytes()
