"""The `darkprune` command line: one entry point, argparse sub-commands, one module per command family (info and
bench, run and eval, the pruning workflow, finetune, compress and decompress). Each is a parser and a `main` over the
public API and darkprune.workflow; nothing in the package imports this one.

Results go to stdout (a table, or one JSON object with --json); progress and logs to stderr. Exit codes: 0 done,
1 user error (one line on stderr naming the file or layer at fault), 2 usage error.
"""
from __future__ import annotations

import sys
import warnings

from .. import DarkpruneError, SettingError
from ..util.progress import switch_off_progress
# Each module registers its commands and parsers; this order is the order of `darkprune --help`.
from . import info, run, prune, finetune, compress, export  # noqa: E402,F401,I001
from .common import COMMANDS, build_parser, emit, setting_message

__all__ = ["COMMANDS", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "quiet", False):
        switch_off_progress()
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        payload, text = COMMANDS[args.command](args)    # each command returns what it prints
        emit(args, payload, text)
        return 0
    except SettingError as exc:
        print(f"darkprune {args.command}: error: {setting_message(exc.setting, str(exc))}", file=sys.stderr)
        return 1
    except DarkpruneError as exc:
        print(f"darkprune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"darkprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0

