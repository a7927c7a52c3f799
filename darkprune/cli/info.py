"""`darkprune info` (the layer table) and `darkprune bench` (our engine against OpenCV's Darknet importer)."""
from __future__ import annotations

from .common import add_common, command, parsers


@command("info")
def cmd_info(args) -> tuple[dict, str]:
    from ..workflow.inspect import describe
    return describe(args.cfg, args.weights, lenient=args.lenient)


@command("bench")
def cmd_bench(args) -> tuple[dict, str]:
    from ..workflow.timing import bench, format_bench
    result = bench(args.cfg, args.weights, batch=args.batch, threads=args.threads, repeats=args.repeats,
                   memory=args.memory)
    return result, format_bench(result)


@parsers
def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="Darknet-style layer table: shapes, params, BFLOPs, weight sparsity",
                       description="Print the layer table Darknet prints when it loads a cfg (type, filters, "
                                   "size/stride, input -> output, BFLOPs) plus parameter counts; with WEIGHTS also "
                                   "each layer's weight sparsity and mean |w|.")
    p.add_argument("cfg", help="Darknet .cfg file")
    p.add_argument("weights", nargs="?", help="Darknet .weights file (optional)")
    p.add_argument("--lenient", action="store_true",
                   help="accept a weights file that stops early (Darknet's partial load, e.g. backbone weights)")
    add_common(p)

    p = sub.add_parser("bench", help="latency of our engine vs OpenCV's Darknet importer on the same input",
                       description="Run the same random batch through darkprune's engine and OpenCV's Darknet "
                                   "importer with the same thread count; warm-up excluded, median of repeated runs.")
    p.add_argument("cfg")
    p.add_argument("weights", nargs="?", help="(optional: seeded random weights otherwise)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--memory", action="store_true", help="also measure peak memory of each engine (child processes)")
    add_common(p)
