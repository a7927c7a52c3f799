"""`darkprune export`: a Darknet model (pruned and transformed ones included) to an ONNX graph."""
from __future__ import annotations

import argparse

from .common import add_common, command, logger, parsers


@command("export")
def cmd_export(args) -> tuple[dict, str]:
    from ..workflow.export_step import run_export
    return run_export(args.cfg, args.weights, args.out, decode_boxes=args.decode, opset=args.opset,
                      log=logger(args))


@parsers
def add_parsers(sub) -> None:
    from ..workflow.export_step import DEFAULT_OPSET, MIN_OPSET
    p = sub.add_parser(
        "export", help="a Darknet model to ONNX (ONNX Runtime, OpenCV 5, TensorRT, OpenVINO, ncnn)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write CFG/WEIGHTS (pruned and transformed models included) as an ONNX graph that computes\n"
                    "what darkprune's engine computes: input `input` float32 (batch, C, H, W), RGB scaled to 0..1,\n"
                    "batch dynamic; outputs each [yolo]/[region] head's activations (logistic and scale_x_y\n"
                    "applied as Darknet applies them), or a classifier's scores. --decode adds `boxes` (batch, K, 4:\n"
                    "cx, cy, w, h in input pixels), `objectness` (batch, K) and `scores` (batch, K, classes) =\n"
                    "objectness x class probability, before threshold and NMS. Needs: pip install darkprune[onnx].",
        epilog="example:\n  darkprune export cfg/yolo-fastest-1.1.cfg weights/yolo-fastest-1.1.weights -o "
               "yolo-fastest.onnx --decode")
    p.add_argument("cfg", help="Darknet .cfg")
    p.add_argument("weights", nargs="?", help="Darknet .weights (optional: seeded random weights otherwise)")
    p.add_argument("-o", "--out", required=True, help="the .onnx file to write (atomically; never over an input)")
    p.add_argument("--decode", action="store_true", help="append the box decoding (boxes, objectness, scores)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset to write (default {DEFAULT_OPSET}; {MIN_OPSET} or newer)")
    add_common(p)
