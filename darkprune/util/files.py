"""Writing files safely: a temp file beside the target, then a rename, so a crash never leaves half a file, and
never over one of the files the result was computed from."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import DarkpruneError


def atomic_write_bytes(path: str | os.PathLike, data: bytes, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write to a temp file beside `path`, then rename, so a crash never leaves half a file. Refuses to overwrite
    any of `inputs` (the files the result was computed from)."""
    target = Path(path)
    for src in inputs:
        try:
            if src and target.exists() and os.path.samefile(target, src):
                raise DarkpruneError(f"{target}: refusing to overwrite an input file; choose another output name")
        except FileNotFoundError:
            pass
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise DarkpruneError(f"{target}: output folder {folder} does not exist")
    tmp = folder / f".{target.name}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except PermissionError:
        _silent_unlink(tmp)
        raise DarkpruneError(f"{target}: cannot write here (permission denied)") from None
    except OSError as exc:
        _silent_unlink(tmp)
        raise DarkpruneError(f"{target}: cannot write: {exc.strerror}") from None


def _silent_unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """`text` as UTF-8 into `path`, atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"), inputs)


def refuse_overwrite(target, inputs, what: str) -> None:
    """Refuse, before any work, an output path that is one of the inputs (`what` names the output in the message)."""
    for src in inputs:
        try:
            if src and Path(target).exists() and os.path.samefile(target, src):
                raise DarkpruneError(f"{target}: {what} would overwrite an input file; choose another name")
        except FileNotFoundError:
            pass
