"""JSON as darkprune writes it (the commands' --json output, workspace files, reports): numpy scalars and arrays
become plain numbers and lists, paths and anything else their text."""
from __future__ import annotations

import json
import os


def json_default(obj):
    """`default=` for json.dumps."""
    import numpy as np  # here, so that `darkprune --version` and --help do not load numpy
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json(path: str | os.PathLike, data, indent: int | None = 1) -> None:
    """`data` as JSON (one trailing newline) into `path`, atomically (a temp file beside it, then a rename)."""
    from .files import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(data, indent=indent, default=json_default) + "\n").encode("utf-8"))
