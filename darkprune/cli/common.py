"""What every command module shares: the command registry, the common flags, printing results and logs, and how a
library error about a setting is shown under the command line's own flag name."""
from __future__ import annotations

import argparse
import json
import re
import sys

from ..util.jsonio import json_default

COMMANDS: dict[str, "callable"] = {}
PARSERS: list = []          # functions that add a command module's sub-parsers


def command(name: str):
    """Register `fn(args) -> (payload, text)`: the dispatcher prints the payload as JSON (--json) or the text."""
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def parsers(add):
    PARSERS.append(add)
    return add


def emit(args, payload: dict, text: str) -> None:
    """Print the result: JSON for scripts, the table for people."""
    if args.json:
        sys.stdout.write(json.dumps(payload, default=json_default) + "\n")
    elif text:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def logger(args):
    """log(message) for the library's callbacks (silent with --quiet)."""
    return lambda message: log(args, message)


def progress(args) -> bool:
    return not getattr(args, "quiet", False) and not getattr(args, "json", False)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs on stderr")


def flag_name(setting: str) -> str:
    """The command-line flag of a setting key: `checkpoint_every` -> `--checkpoint-every`."""
    return "--" + setting.replace("_", "-")


def setting_message(setting: str, message: str) -> str:
    """A SettingError's message with the flag in place of the key ("exclude 12: ..." -> "--exclude 12: ..."), or the
    flag put in front when the message does not start with the key."""
    if re.match(re.escape(setting) + r"(?![A-Za-z0-9_-])", message):
        return flag_name(setting) + message[len(setting):]
    return f"{flag_name(setting)}: {message}"


def given(args, keys) -> dict:
    """The values set on the command line for these keys (None where a flag was not given)."""
    return {key: getattr(args, key, None) for key in keys}


def check_positive(value, flag: str) -> None:
    if value is not None and value <= 0:
        from .. import DarkpruneError
        raise DarkpruneError(f"{flag} must be a positive number, not {value}")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="darkprune",
        description="Make Darknet (YOLO) networks smaller and faster: analyse, prune, finetune, transform, compress.")
    parser.add_argument("--version", action="version", version=f"darkprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def option_keys() -> set[str]:
    """The setting keys of every darkprune command (a shared config file may hold any of them)."""
    names: set[str] = set()
    for action in build_parser()._actions:
        for sub_parser in (getattr(action, "choices", None) or {}).values():
            if isinstance(sub_parser, argparse.ArgumentParser):
                names |= {a.dest for a in sub_parser._actions}
    return names
