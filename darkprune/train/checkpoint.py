"""Training checkpoints: FOLDER/checkpoint-NNNNNNN.npz and beside it a `.sha256` (sha256sum format).

The `.npz` holds every parameter array ("param/LAYER/NAME", rolling statistics included), the optimizer's buffers
("opt/..."), and "meta": JSON with the iteration, the format and version, and what the training loop and its hooks
put there (images seen, the loss history, the settings a resume must match, evaluations...). Both files are written
atomically, the `.sha256` after the `.npz`, so a checkpoint without one was cut off while being written; the last
CHECKPOINTS_KEPT are kept. A checkpoint whose checksum does not match is refused, never silently skipped.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np

from ..util.files import atomic_write_bytes
from ..darknet.model import Model
from ..errors import DarkpruneError
from .optimizer import DarknetSGD

CHECKPOINTS_KEPT = 2
FORMAT = "darkprune-finetune-checkpoint"
VERSION = 1


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("checkpoint-*.npz"))


def write_checkpoint(folder: Path, iteration: int, model: Model, opt: DarknetSGD, meta: dict) -> Path:
    arrays = {f"param/{i}/{name}": arr for i, p in model.params.items() for name, arr in p.items()}
    arrays.update({f"opt/{k}": v for k, v in opt.state_dict().items()})
    meta = dict(meta, format=FORMAT, version=VERSION, iteration=iteration)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    path = Path(folder) / f"checkpoint-{iteration:07d}.npz"
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".sha256"), f"{sha256_hex(data)}  {path.name}\n".encode())
    for old in checkpoint_paths(folder)[:-CHECKPOINTS_KEPT]:
        for f in (old, old.with_suffix(".sha256")):
            try:
                f.unlink()
            except OSError:
                pass
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a checkpoint whose checksum matches; DarkpruneError otherwise."""
    sha_path = path.with_suffix(".sha256")
    try:
        data = path.read_bytes()
        expected = sha_path.read_text().split()[0]
    except FileNotFoundError as exc:
        raise DarkpruneError(f"{exc.filename}: missing; the checkpoint {path.name} cannot be verified") from None
    except (OSError, IndexError) as exc:
        raise DarkpruneError(f"{sha_path}: unreadable checksum file ({exc})") from None
    if sha256_hex(data) != expected:
        raise DarkpruneError(f"{path}: checksum mismatch ({len(data)} bytes): the checkpoint is corrupt or truncated; "
                             f"delete it (and its .sha256) to resume from an earlier one, or start afresh (resume off)")
    try:
        with np.load(io.BytesIO(data)) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as exc:       # the checksum matched, so the writer itself was at fault
        raise DarkpruneError(f"{path}: not a readable darkprune checkpoint ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DarkpruneError(f"{path}: not a darkprune finetune checkpoint of version {VERSION}")
    return meta, arrays


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was completely written (its .sha256 exists: it is written after the .npz)."""
    for path in reversed(checkpoint_paths(folder)):
        if path.with_suffix(".sha256").exists():
            return path
        warnings.warn(f"{path}: no checksum file beside it (the run stopped while writing it); ignored",
                      stacklevel=3)
    return None


def load_parameters(path: Path, model: Model, arrays: dict[str, np.ndarray]) -> None:
    """Copies a checkpoint's "param/..." arrays into the model's (live) arrays; refuses ones that do not fit."""
    for key, arr in arrays.items():
        if key.startswith("param/"):
            _, index, name = key.split("/", 2)
            target = model.params.get(int(index), {}).get(name)
            if target is None or target.shape != arr.shape:
                raise DarkpruneError(f"{path}: array {key} does not fit this model")
            target[...] = arr


def remove_checkpoints(folder: Path) -> int:
    """Deletes every checkpoint (and checksum) in `folder`; returns how many there were."""
    stale = checkpoint_paths(folder)
    for old in stale:
        for f in (old, old.with_suffix(".sha256")):
            f.unlink(missing_ok=True)
    return len(stale)
