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

Every step checks its inputs before the workspace is created or written to, so a refused run leaves nothing behind;
the settings files are read back by workflow/settings.py.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import DarkpruneError
from ..util.files import atomic_write_bytes
from ..util.folder import Folder

# Settings whose values are paths: recorded absolute, so a config.STEP.txt reruns from any folder.
PATH_KEYS = ("cfg", "weights", "data", "workspace", "out", "ana_out_file", "prune_out_weights", "out_cfg")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_workspace_path(path) -> None:
    """Refuse, before any work, a workspace that cannot be created: a file, or a path under a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DarkpruneError(f"{path}: the workspace must be a folder, this is a file")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DarkpruneError(f"{path}: cannot create the workspace folder ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DarkpruneError(f"{path}: the workspace folder is not writable")


def absolute_settings(settings: dict, keys) -> dict:
    """The settings to record in the workspace, with absolute paths (so the file reruns from anywhere)."""
    out = {}
    for k in keys:
        v = settings.get(k)
        if v not in (None, "", False) and k in PATH_KEYS:
            v = os.path.abspath(str(v))
        out[k] = v
    return out


class Workspace(Folder):
    """`create=True`: make the folder if needed and check that it is writable; `create=False`: it must exist, and
    nothing is written until a step writes its results."""

    missing_hint = "no such workspace (run `darkprune ana` first)"

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


def _config_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


