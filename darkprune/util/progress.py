"""The one progress on/off switch. Progress bars (tqdm, on stderr) show unless a call passes ``progress=False`` or the
process was switched quiet: the command line does so for ``--quiet``, and ``DARKPRUNE_QUIET=1`` in the environment
does it for scripts and child processes (which inherit it)."""
from __future__ import annotations

import os

QUIET_VARIABLE = "DARKPRUNE_QUIET"


def progress_enabled(progress: bool = True) -> bool:
    """Whether to show a progress bar: asked for here and not switched off for the whole process."""
    return bool(progress) and os.environ.get(QUIET_VARIABLE, "") not in ("1", "true", "yes")


def switch_off_progress() -> None:
    """No progress bars anywhere in this process (and the processes it starts)."""
    os.environ[QUIET_VARIABLE] = "1"
