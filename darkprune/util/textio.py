"""Reading an input file with one-line errors: every reader of cfg, weights, .data/.names lists and images says
the same three things the same way (missing, a folder, unreadable), naming the file and what kind it was meant to be.
"""

from __future__ import annotations

import os
from pathlib import Path

from darkprune.errors import DarkpruneError


def read_input_bytes(path: str | os.PathLike, kind: str = "", folder_note: str = "not a file") -> bytes:
    """The file's bytes; a DarkpruneError "<path>: no such <kind> file", "<path>: is a folder, <folder_note>" or
    "<path>: cannot read <kind>: <reason>" otherwise. `kind` ("cfg", "image", ...) may be empty."""
    label = f" {kind}" if kind else ""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DarkpruneError(f"{path}: no such{label} file") from None
    except IsADirectoryError:
        raise DarkpruneError(f"{path}: is a folder, {folder_note}") from None
    except OSError as exc:
        raise DarkpruneError(f"{path}: cannot read{label}: {exc.strerror or exc}") from None
