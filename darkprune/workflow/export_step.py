"""`darkprune export`: a Darknet cfg/weights pair to an ONNX file, and the summary the command prints.

The graph computes what darkprune's engine computes (batch norm folded with Darknet's eps, Darknet's maxpool padding,
the [yolo]/[region] heads' activations), with a dynamic batch dimension; `decode_boxes` appends the box decoding
(boxes, objectness, scores in input pixels, before threshold and NMS). Needs `pip install darkprune[onnx]`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DarkpruneError
from ..export import DEFAULT_OPSET, MIN_OPSET  # noqa: F401 (the command line's defaults; the exporter loads lazily)


def _same_file(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def run_export(cfg: str, weights: str | None, out: str, decode_boxes: bool = False, opset: int | None = None,
               log=lambda message: None) -> tuple[dict, str]:
    """Export CFG/WEIGHTS to `out` (atomically, never over an input); returns (JSON payload, printed summary)."""
    from ..darknet import load
    from ..export import export_onnx
    if _same_file(out, cfg) or _same_file(out, weights):
        raise DarkpruneError(f"{out}: refusing to overwrite an input file; choose another output name")
    if Path(out).suffix.lower() != ".onnx":
        log(f"note: {out} does not end in .onnx")
    model = load(cfg, weights)
    result = export_onnx(model, out, decode_boxes=decode_boxes, opset=DEFAULT_OPSET if opset is None else opset)
    lines = [f"{result['cfg']}: {result['layers']} layers -> {result['nodes']} ONNX nodes, opset {result['opset']}"]
    for kind, tensors in (("input", result["inputs"]), ("output", result["outputs"])):
        for tensor in tensors:
            shape = " x ".join(str(d) for d in tensor["shape"])
            lines.append(f"  {kind:6} {tensor['name']:<12} {shape}")
    lines.append(f"written: {result['path']} ({result['bytes']} B)")
    return result, "\n".join(lines)
