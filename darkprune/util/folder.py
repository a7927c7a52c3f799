"""An output folder: created (and checked writable) when asked, its files named, JSON in and out atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DarkpruneError
from .jsonio import write_json


class Folder:
    """`create=True`: make the folder if needed and check that it is writable; `create=False`: it must exist, and
    nothing is written until something writes its results."""

    missing_hint = "no such folder"

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise DarkpruneError(f"{self.path}: workspace must be a folder, this is a file")
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DarkpruneError(f"{self.path}: cannot create the workspace folder ({exc.strerror})") from None
            if not writable(self.path):
                raise DarkpruneError(f"{self.path}: the workspace folder is not writable")
        elif not self.path.is_dir():
            raise DarkpruneError(f"{self.path}: {self.missing_hint}")

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


def writable(folder: Path) -> bool:
    """Try to create a file (os.access says yes to root even on a read-only mount)."""
    probe = folder / f".darkprune-write-test-{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
        return True
    except OSError:
        return False
