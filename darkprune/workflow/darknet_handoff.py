"""Finetuning on GPUs with Darknet itself (`darkprune finetune --engine darknet`): write what Darknet needs into the
workspace, run `darknet detector train` / `darknet classifier train`, stream its output, bring the weights back.

    WORKSPACE/darknet/
      finetune.cfg        the model's cfg with [net] max_batches / learning_rate / burn_in / steps set for the chosen
                          number of iterations (the same compressed schedule the numba engine runs, see finetune.py)
      start.weights       the weights to start from (seen = 0, so Darknet's schedule starts at iteration 1)
      finetune.data       the .data file with absolute paths: train/valid lists (written here, one absolute image
                          path a line, so Darknet finds images and labels from any working directory), names or
                          labels, backup=WORKSPACE/darknet/backup
      backup/             where Darknet writes finetune_last.weights, finetune_best.weights (-map), finetune_final...
    WORKSPACE/finetuned.cfg/.weights   the result, with the masks applied again

Which model Darknet trains:
- the masked pair (default): same shapes as the original. Darknet cannot hold masks: it updates every weight, so a
  pruned channel's batch-norm shift gets a gradient, the channel comes back to life and its consumers' zeroed inputs
  start learning again; fine-grained (unstructured) zeros fill in the same way. We apply the masks again to the
  weights Darknet returns, which cuts whatever the network learned to route through them: expect some loss there.
- the transformed pair (`transformed=True`): structured (channel) pruning makes a genuinely smaller dense model, and
  Darknet trains that exactly, with nothing to hold. This is the better choice for channel masks; the result is
  written as finetuned-transformed.cfg/.weights (the workspace's masked-shape files stay consistent for `transform`).
  Fine-grained masks cannot be expressed in a smaller dense model: they need the masked pair.

Darknet reads `-clear` to restart its iteration count; the start weights are written with seen = 0 as well, so both
AlexeyAB's and pjreddie's builds start the schedule from the beginning. stdin is closed: Darknet calls getchar() on
some errors and would otherwise wait for a key.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..util.files import atomic_write_bytes
from ..darknet.heads import is_detector
from ..darknet.model import Model
from ..errors import DarkpruneError, SettingError
from ..train.finetune import _hold, finetune_schedule, parameter_masks
from .workspace import Workspace

FOLDER = "darknet"
BASE = "finetune"


@dataclass
class HandoffResult:
    command: list[str]
    returncode: int
    weights_from: str                   # the backup file taken
    transformed: bool
    files: dict = field(default_factory=dict)
    revived: dict = field(default_factory=dict)    # masked entries Darknet made nonzero, cleared again

    def to_json(self) -> dict:
        return {"command": self.command, "returncode": self.returncode, "weights_from": self.weights_from,
                "transformed": self.transformed, "files": self.files, "revived": self.revived}


def find_darknet(darknet: str | os.PathLike | None) -> str:
    """The Darknet executable: a path, or a name looked up on PATH."""
    name = str(darknet or "darknet")
    if os.sep in name or (os.altsep and os.altsep in name):
        path = Path(name)
        if not path.is_file():
            raise SettingError("darknet", f"darknet {name}: no such file; give the path of a built darknet "
                                          f"executable")
        if not os.access(path, os.X_OK):
            raise SettingError("darknet", f"darknet {name}: not executable (chmod +x it, or give the built darknet "
                                          f"binary)")
        return str(path.resolve())
    found = shutil.which(name)
    if found is None:
        raise SettingError("darknet", f"darknet {name}: Darknet executable not found on PATH; build AlexeyAB's "
                                      f"darknet and give the path of its executable")
    return found


def adjusted_cfg(model: Model, iters: int, learning_rate: float | None = None, batch: int | None = None,
                 subdivisions: int | None = None):
    """A copy of the model's cfg whose [net] trains `iters` iterations with finetune.py's compressed schedule."""
    sched = finetune_schedule(model.graph, iters, learning_rate)
    cfg = model.cfg.copy()
    net = cfg.net
    net.set("max_batches", iters)
    net.set("learning_rate", sched.learning_rate)
    if net.get_int("burn_in", 0) or sched.burn_in:
        net.set("burn_in", sched.burn_in)
    if sched.policy in ("steps", "sgdr") and sched.steps:
        net.set("steps", list(sched.steps))
    if sched.policy in ("step", "sigmoid") and "step" in net:
        net.set("step", sched.step)
    if sched.policy == "sgdr" and "sgdr_cycle" in net:
        net.set("sgdr_cycle", sched.sgdr_cycle)
    if batch is not None:
        net.set("batch", int(batch))
    if subdivisions is not None:
        net.set("subdivisions", int(subdivisions))
    return cfg


def _data_file(data_path: Path, folder: Path, detector: bool) -> Path:
    """finetune.data with absolute paths, and the image lists it names."""
    from ..data import load_data
    from ..data.darknet_data import read_data_config, resolve_path
    options = read_data_config(data_path)
    base = [data_path.resolve().parent]
    kind = "detection" if detector else "classification"
    lines = []
    for split in ("train", "valid"):
        if split not in options:
            continue
        dataset = load_data(data_path, split=split, kind=kind)
        listing = folder / f"{split}.txt"
        atomic_write_bytes(listing, "".join(f"{p}\n" for p in dataset.image_paths).encode())
        lines.append(f"{split}={listing}")
    if not any(line.startswith("train=") for line in lines):
        raise DarkpruneError(f"{data_path}: no train= list for Darknet to train on")
    for key in ("names", "labels"):
        if key in options:
            found = resolve_path(options[key], base)
            if found is None:
                raise DarkpruneError(f"{data_path}: {key}={options[key]}: no such file")
            lines.append(f"{key}={found.resolve()}")
    for key, value in options.items():
        if key not in ("train", "valid", "names", "labels", "backup"):
            lines.append(f"{key}={value}")
    backup = folder / "backup"
    backup.mkdir(exist_ok=True)
    lines.append(f"backup={backup}")
    out = folder / f"{BASE}.data"
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


def _stream(cmd: list[str], cwd: Path, log) -> tuple[int, list[str]]:
    """Run cmd, passing each output line (\\n or \\r ended) to log; returns (exit code, the last lines)."""
    tail: deque[str] = deque(maxlen=15)
    try:
        proc = subprocess.Popen(cmd, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, bufsize=0)
    except OSError as exc:
        raise DarkpruneError(f"{cmd[0]}: cannot run: {exc.strerror or exc}") from None
    pending = b""
    try:
        while True:
            chunk = proc.stdout.read(4096)
            if not chunk:
                break
            pending += chunk
            while True:
                cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                line = pending[:cut].decode("utf-8", "replace").rstrip()
                pending = pending[cut + 1:]
                if line.strip():
                    tail.append(line)
                    log(line)
        if pending.strip():
            line = pending.decode("utf-8", "replace").rstrip()
            tail.append(line)
            log(line)
        proc.stdout.close()
        return proc.wait(), list(tail)
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stdout.close()
        raise


def _result_weights(backup: Path) -> Path:
    for name in (f"{BASE}_final.weights", f"{BASE}_last.weights"):
        if (backup / name).is_file():
            return backup / name
    others = sorted(backup.glob("*.weights"), key=lambda p: p.stat().st_mtime)
    if others:
        return others[-1]
    raise DarkpruneError(f"{backup}: Darknet finished without writing any weights ({BASE}_final.weights or "
                         f"{BASE}_last.weights expected)")


def darknet_finetune(model: Model, data, workspace, iters: int | None = None, darknet: str | None = None,
                     learning_rate: float | None = None, batch: int | None = None, subdivisions: int | None = None,
                     gpus: str | None = None, masks=None, transformed: bool = False, calc_metric: bool = True,
                     log=None, extra_args: tuple = ()) -> HandoffResult:
    """Train with Darknet (see the module doc). `model`: the (masked) model; `masks`: a Masks (default: the model's
    `.masks`); `data`: the .data path; `gpus`: "0,1"; `log(line)`: where Darknet's output goes (default stderr)."""
    from ..darknet import load
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    binary = find_darknet(darknet)
    if not isinstance(data, (str, os.PathLike)):
        data = getattr(data, "source", None)
        if not data:
            raise DarkpruneError("the Darknet hand-off needs the path of the .data file")
    data_path = Path(data)
    if not data_path.is_file():
        raise DarkpruneError(f"{data_path}: no such file")
    ws = Workspace(workspace)
    folder = ws.file(FOLDER)
    folder.mkdir(exist_ok=True)
    detector = is_detector(model.graph)
    iters = int(iters if iters is not None else model.graph.net["max_batches"])
    if iters <= 0:
        raise DarkpruneError("give the number of iterations (the cfg's max_batches is 0)")
    if masks is None:
        masks = getattr(model, "masks", None)
    trained, channel_masks = _model_to_train(model, masks, transformed, log)

    cfg = adjusted_cfg(trained, iters, learning_rate, batch, subdivisions)
    cfg_path = folder / f"{BASE}.cfg"
    atomic_write_bytes(cfg_path, cfg.text().encode("ascii"))
    start = trained.copy()
    start.header.seen = 0
    weights_path = folder / "start.weights"
    atomic_write_bytes(weights_path, start.weights_bytes())
    data_file = _data_file(data_path, folder, detector)
    backup = folder / "backup"
    for old in backup.glob(f"{BASE}_*.weights"):
        old.unlink()

    cmd = [binary, "detector" if detector else "classifier", "train", str(data_file), str(cfg_path),
           str(weights_path), "-dont_show", "-clear"]
    if calc_metric and any(line.startswith("valid=") for line in data_file.read_text().splitlines()):
        cmd.append("-map" if detector else "-topk")
    if gpus:
        cmd += ["-gpus", str(gpus)]
    cmd += [str(a) for a in extra_args]
    log("darkprune: running " + " ".join(cmd))
    code, tail = _stream(cmd, folder, log)
    if code != 0:
        raise DarkpruneError(f"darknet exited with code {code}" + (f" (last line: {tail[-1].strip()})" if tail
                                                                     else " without output"))
    result_path = _result_weights(backup)
    returned = load(cfg_path, result_path)
    files = {"darknet_folder": str(folder), "darknet_cfg": str(cfg_path), "darknet_data": str(data_file),
             "start_weights": str(weights_path)}
    out, revived, (cfg_out, w_out) = _returned_model(model, trained, returned, masks, channel_masks, transformed, ws)
    out.save(cfg_out, w_out)
    files.update({"cfg": str(cfg_out), "weights": str(w_out)})
    best = backup / f"{BASE}_best.weights"
    if best.is_file():
        files["darknet_best"] = str(best)
    return HandoffResult(cmd, code, str(result_path), transformed, files, revived)


def _model_to_train(model: Model, masks, transformed: bool, log):
    """(the model Darknet trains, the channel masks or None): the transformed model, or the masked pair."""
    from ..prune.masks import Masks, apply_masks
    channel_masks = masks if isinstance(masks, Masks) else None
    fine_grained = masks is not None and channel_masks is None
    if transformed:
        if fine_grained:
            raise DarkpruneError("fine-grained (unstructured) masks cannot be expressed in a transformed model; "
                                 "hand Darknet the masked pair instead")
        if channel_masks is None:
            raise DarkpruneError("transformed=True needs channel masks (a workspace with masks.json)")
        from ..prune.transform import transform
        log("darkprune: Darknet trains the transformed (smaller, dense) model: the pruned channels are gone, nothing "
            "needs holding")
        return transform(apply_masks(model, channel_masks), channel_masks), channel_masks
    trained = apply_masks(model, channel_masks) if channel_masks is not None else model.copy()
    if masks is not None:
        keep, _ = parameter_masks(model, masks)
        if fine_grained:
            for (index, name), mask in keep.items():
                trained.params[index][name][~mask] = 0
        log("darkprune: Darknet cannot hold masks (it updates every weight, so pruned channels and zeroed "
            "weights come back to life); they are applied again to the weights it returns"
            + ("; for channel pruning, the transformed model (smaller and dense) can be trained instead"
               if channel_masks is not None else ""))
    return trained, channel_masks


def _returned_model(model: Model, trained: Model, returned: Model, masks, channel_masks, transformed: bool, ws):
    """The model Darknet returned, with the masks applied again: (model, what Darknet revived, (cfg, weights) out)."""
    if transformed:
        out = Model(trained.cfg, returned.graph, returned.params, returned.header)
        return out, {}, (ws.file("finetuned-transformed.cfg"), ws.file("finetuned-transformed.weights"))
    out = Model(model.cfg, model.graph, returned.params, returned.header)
    revived = {}
    if masks is not None:
        keep, stats = parameter_masks(model, masks)
        count, largest = 0, 0.0
        for (index, name), mask in keep.items():      # what Darknet revived, before it is cleared again
            dead = out.params[index][name][~mask]
            count += int(np.count_nonzero(dead))
            largest = max(largest, float(np.abs(dead).max()) if dead.size else 0.0)
        _hold(out, keep, stats)
        revived = {"weights": count, "max_abs": largest}
        if channel_masks is not None:
            out.masks = channel_masks
    return out, revived, (ws.file("finetuned.cfg"), ws.file("finetuned.weights"))
