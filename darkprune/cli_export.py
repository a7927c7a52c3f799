"""`darkprune export` (registered into `darkprune.cli`): a Darknet cfg/weights pair to an ONNX file.

The graph computes what darkprune's engine computes (batch norm folded with Darknet's eps, Darknet's maxpool
padding, the [yolo]/[region] heads' activations), with a dynamic batch dimension; `--decode` appends the box
decoding (boxes, objectness, scores in input pixels, before threshold and NMS). Needs `pip install darkprune[onnx]`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import _EXTRA_PARSERS, _common, command, emit, log
from .errors import DarkpruneError, SettingError

FLAGS = {"opset": "--opset", "decode_boxes": "--decode"}


def _same_file(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


@command("export")
def cmd_export(args) -> int:
    from .darknet import load
    from .export import export_onnx
    if _same_file(args.out, args.cfg) or _same_file(args.out, args.weights):
        raise DarkpruneError(f"{args.out}: refusing to overwrite an input file; choose another output name")
    if Path(args.out).suffix.lower() != ".onnx":
        log(args, f"note: {args.out} does not end in .onnx")
    model = load(args.cfg, args.weights)
    try:
        result = export_onnx(model, args.out, decode_boxes=args.decode, opset=args.opset)
    except SettingError as exc:
        flag = FLAGS.get(exc.setting, exc.setting)
        raise DarkpruneError(f"{flag}: {exc}") from None
    lines = [f"{result['cfg']}: {result['layers']} layers -> {result['nodes']} ONNX nodes, opset {result['opset']}"]
    for kind, tensors in (("input", result["inputs"]), ("output", result["outputs"])):
        for tensor in tensors:
            shape = " x ".join(str(d) for d in tensor["shape"])
            lines.append(f"  {kind:6} {tensor['name']:<12} {shape}")
    lines.append(f"written: {result['path']} ({result['bytes']} B)")
    emit(args, result, "\n".join(lines))
    return 0


def _add_parsers(sub) -> None:
    from .export import DEFAULT_OPSET, MIN_OPSET
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
    _common(p)


_EXTRA_PARSERS.append(_add_parsers)
