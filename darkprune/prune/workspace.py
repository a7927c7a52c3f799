"""The pruning workspace: one folder holding everything one pruning run produces, so each step can be rerun or resumed.

    WORKSPACE/
      model.json            which model this workspace belongs to (structure fingerprint, files, their hashes)
      config.STEP.txt       the settings each step ran with (key=value, absolute paths; reusable with --config)
      sensitivity.json      per-group loss curves from `ana` (shard files sensitivity.shard-I-of-N.json before merge)
      sensitivity.png       the loss curves
      plan.json             the per-group rates `prune` chose
      masks.json            the pruned channels
      pruned.cfg/.weights   the masked model (same shapes, pruned channels output zero)
      finetune/             checkpoints of `finetune`
      finetuned.cfg/.weights
      transformed.cfg/.weights   the smaller model
      summary.json          the summary tables of each step

Config files (`--config FILE`) use the flags' names as `key=value` lines (one file may hold the settings of every
step; each step takes its own). A Vitis AI Darknet pruner main cfg (a `[pruning]` section with workspace, datacfg,
modelcfg, prunedcfg, ana_out_file, prune_out_weights, criteria, kernel_batch, ignore_layer, threshold) is read too,
and can be given in place of the CFG argument as vai_p_darknet takes it; keys we do not support (yolov3, gpus, ...)
are named in a warning. Paths in a config are taken relative to the current folder, as vai_p_darknet does.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from ..util.files import atomic_write_bytes
from ..errors import DarkpruneError
from ..util.jsonio import write_json

# Vitis AI's [pruning] keys -> our option names.
VITIS_KEYS = {
    "workspace": "workspace", "datacfg": "data", "modelcfg": "cfg", "prunedcfg": "out_cfg",
    "ana_out_file": "ana_out_file", "prune_out_weights": "prune_out_weights", "criteria": "criterion",
    "kernel_batch": "divisible", "ignore_layer": "exclude", "threshold": "threshold",
}
# Vitis' criteria codes (0 = filter L1 norm, 1 = batch-norm scale); names pass through.
VITIS_CRITERIA = {"0": "l1", "1": "bn"}


class ConfigValues(dict):
    """Settings read from a config file: {key: value text}, remembering where each came from."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.lines: dict[str, int] = {}
        self.vitis = False

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key]}" if key in self.lines else self.path


def read_config(path: str | os.PathLike) -> ConfigValues:
    """key=value lines (`#` comments), or a cfg with a [pruning] section (Vitis AI's main cfg)."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DarkpruneError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise DarkpruneError(f"{path}: is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DarkpruneError(f"{path}: cannot read config: {exc}") from None
    if any(line.strip().lower() == "[pruning]" for line in text.splitlines()):
        return _read_vitis(path, text)
    out = ConfigValues(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise DarkpruneError(f"{path}:{number}: expected key=value, got '{raw.strip()}'")
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.lstrip("-").replace("-", "_")
        if not key:
            raise DarkpruneError(f"{path}:{number}: expected key=value, got '{raw.strip()}'")
        if key in out:
            raise DarkpruneError(f"{path}:{number}: '{key}' is set twice")
        out[key] = value
        out.lines[key] = number
    return out


def _read_vitis(path: str, text: str) -> ConfigValues:
    # Darknet's cfg reader refuses unknown sections such as [pruning]: read the block by hand, keeping line numbers.
    out = ConfigValues(path)
    out.vitis = True
    inside = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            inside = line.lower() == "[pruning]"
            continue
        if not inside:
            continue
        if "=" not in line:
            raise DarkpruneError(f"{path}:{number}: expected key=value in [pruning], got '{raw.strip()}'")
        key, value = (part.strip() for part in line.split("=", 1))
        if key not in VITIS_KEYS:
            warnings.warn(f"{path}:{number}: [pruning] key '{key}' is not supported by darkprune and is ignored")
            continue
        ours = VITIS_KEYS[key]
        if ours in out:
            raise DarkpruneError(f"{path}:{number}: '{key}' is set twice")
        if ours == "criterion":
            value = VITIS_CRITERIA.get(value, value)
        out[ours] = value
        out.lines[ours] = number
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Workspace:
    """`create=True`: make the folder if needed and check that it is writable; `create=False`: it must exist, and
    nothing is written until a step writes its results."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise DarkpruneError(f"{self.path}: workspace must be a folder, this is a file")
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DarkpruneError(f"{self.path}: cannot create the workspace folder ({exc.strerror})") from None
            if not _writable(self.path):
                raise DarkpruneError(f"{self.path}: the workspace folder is not writable")
        elif not self.path.is_dir():
            raise DarkpruneError(f"{self.path}: no such workspace (run `darkprune ana` first)")

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_json(self, name: str, data) -> Path:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, data)
        return target

    def read_json(self, name: str):
        target = self.path / name
        try:
            return json.loads(target.read_text())
        except FileNotFoundError:
            raise DarkpruneError(f"{target}: not found in the workspace") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DarkpruneError(f"{target}: corrupt workspace file ({exc})") from None

    # -- which model this workspace belongs to ------------------------------------------------------------------
    def check_model(self, model, fingerprint: str) -> dict:
        """Refuse a workspace made for another model or other weights (reads only). Returns the record to keep."""
        record = {"fingerprint": fingerprint, "cfg": str(model.cfg_path), "weights": str(model.weights_path),
                  "weights_sha256": file_sha256(model.weights_path) if model.weights_path else None}
        if self.exists("model.json"):
            known = self.read_json("model.json")
            if known.get("fingerprint") != fingerprint:
                raise DarkpruneError(f"{self.path}: this workspace was made for another model ({known.get('cfg')}); "
                                     f"use a new workspace for {model.cfg_path}")
            if known.get("weights_sha256") and record["weights_sha256"] and \
                    known["weights_sha256"] != record["weights_sha256"]:
                raise DarkpruneError(f"{self.path}: this workspace was analysed with other weights "
                                     f"({known.get('weights')}); use a new workspace for {model.weights_path}")
        return record

    def bind_model(self, model, fingerprint: str) -> None:
        """Record the model on first use; refuse a different model afterwards."""
        record = self.check_model(model, fingerprint)
        if not self.exists("model.json"):
            self.write_json("model.json", record)

    def save_config(self, step: str, settings: dict) -> None:
        """WORKSPACE/config.STEP.txt: the settings a step ran with, as key=value lines `--config` reads back."""
        lines = [f"# darkprune {step}: the settings this step ran with (reusable with --config)"]
        lines += [f"{k}={_config_value(v)}" for k, v in settings.items() if v is not None]
        atomic_write_bytes(self.path / f"config.{step}.txt", ("\n".join(lines) + "\n").encode())

    def update_summary(self, step: str, data: dict) -> None:
        summary = self.read_json("summary.json") if self.exists("summary.json") else {}
        summary[step] = data
        self.write_json("summary.json", summary)


def _writable(folder: Path) -> bool:
    """Try to create a file (os.access says yes to root even on a read-only mount)."""
    probe = folder / f".darkprune-write-test-{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
        return True
    except OSError:
        return False


def _config_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


