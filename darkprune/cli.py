"""The `darkprune` command line: one entry point, argparse sub-commands.

Results go to stdout (a table, or one JSON object with --json); progress and logs to stderr. Exit codes: 0 done,
1 user error (one line on stderr naming the file or layer at fault), 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from . import __version__
from .errors import DarkpruneError
from .jsonio import json_default

COMMANDS: dict[str, "callable"] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs on stderr")


# --------------------------------------------------------------------------------------------------------------
@command("info")
def cmd_info(args) -> int:
    from .darknet import load
    from .darknet.summary import info_dict, info_text
    model = load(args.cfg, args.weights, lenient=args.lenient)
    info = info_dict(model, with_weights=args.weights is not None)
    emit(args, info, info_text(info))
    return 0


@command("bench")
def cmd_bench(args) -> int:
    from .bench import bench, format_bench
    result = bench(args.cfg, args.weights, batch=args.batch, threads=args.threads, repeats=args.repeats,
                   memory=args.memory)
    emit(args, result, format_bench(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkprune",
        description="Make Darknet (YOLO) networks smaller and faster: analyse, prune, finetune, transform, compress.")
    parser.add_argument("--version", action="version", version=f"darkprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="Darknet-style layer table: shapes, params, BFLOPs, weight sparsity",
                       description="Print the layer table Darknet prints when it loads a cfg (type, filters, "
                                   "size/stride, input -> output, BFLOPs) plus parameter counts; with WEIGHTS also "
                                   "each layer's weight sparsity and mean |w|.")
    p.add_argument("cfg", help="Darknet .cfg file")
    p.add_argument("weights", nargs="?", help="Darknet .weights file (optional)")
    p.add_argument("--lenient", action="store_true",
                   help="accept a weights file that stops early (Darknet's partial load, e.g. backbone weights)")
    _common(p)

    p = sub.add_parser("bench", help="latency of our engine vs OpenCV's Darknet importer on the same input",
                       description="Run the same random batch through darkprune's engine and OpenCV's Darknet "
                                   "importer with the same thread count; warm-up excluded, median of repeated runs.")
    p.add_argument("cfg")
    p.add_argument("weights", nargs="?", help="(optional: seeded random weights otherwise)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--memory", action="store_true", help="also measure peak memory of each engine (child processes)")
    _common(p)

    for register in _EXTRA_PARSERS:
        register(sub)
    return parser


_EXTRA_PARSERS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "quiet", False):
        os.environ["DARKPRUNE_QUIET"] = "1"
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return COMMANDS[args.command](args) or 0
    except DarkpruneError as exc:
        print(f"darkprune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"darkprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


from . import cli_run  # noqa: E402,F401  (registers `run` and `eval`)
from . import cli_prune  # noqa: E402,F401  (registers `ana`, `prune`, `transform`, `sweep`)
from . import cli_train  # noqa: E402,F401  (registers `finetune`)
from . import cli_compress  # noqa: E402,F401  (registers `compress`, `decompress`)
from . import cli_export  # noqa: E402,F401  (registers `export`)


if __name__ == "__main__":
    sys.exit(main())
