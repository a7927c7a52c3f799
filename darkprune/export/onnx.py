"""Export a darkprune Model (any cfg/weights pair darkprune runs, pruned and transformed ones included) to ONNX.

Public API
----------
``export_onnx(model, path, *, decode_boxes=False, opset=DEFAULT_OPSET, bn_eps=DARKNET_BN_EPS) -> dict``
    write the ONNX file atomically; returns ``{"path", "opset", "inputs", "outputs", "layers", "bytes", "cfg"}``.
``build_onnx(model, *, decode_boxes=False, opset=DEFAULT_OPSET, bn_eps=DARKNET_BN_EPS) -> onnx.ModelProto``
``onnx_refusal(model) -> str | None``   the one-line reason the exporter refuses a model, or None.

The graph: input ``input`` float32 (batch, C, H, W), the batch dimension dynamic, holding what the engine takes (RGB
scaled to 0..1, resized as ``darkprune run`` resizes); outputs the tensors our engine's network outputs: each
``[yolo]``/``[region]`` head's activations (named after the layer, e.g. ``yolo16``), or a classifier's last layer.
With ``decode_boxes`` three more outputs follow: ``boxes`` (batch, K, 4: cx, cy, w, h in input pixels),
``objectness`` (batch, K), ``scores`` (batch, K, classes), K the candidates of all heads (see
darkprune.export.onnx_heads). Batch norm is folded with Darknet's eps 1e-5 (the engine's default). The opset is in
the file's opset_import; metadata_props hold the cfg's name, darkprune's version and the output layout.

The ``onnx`` package is optional (``pip install darkprune[onnx]``) and imported only when exporting.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..util.files import atomic_write_bytes
from ..darknet.model import Model
from ..engine.network import DARKNET_BN_EPS
from ..errors import DarkpruneError, SettingError
from . import DEFAULT_OPSET, MIN_OPSET
from .graph_builder import GraphBuilder
from .onnx_heads import HEAD_TYPES, emit_decode, emit_head
from .onnx_layers import EMITTERS, refusal

INPUT_NAME = "input"
BATCH = "batch"
# protobuf refuses to serialise a message over 2 GiB; keep a margin for the graph itself
MAX_BYTES = 2 ** 31 - 2 ** 24


def require_onnx():
    """The onnx module, or a DarkpruneError telling how to install it."""
    try:
        import onnx
    except ImportError:
        raise DarkpruneError("ONNX export needs the onnx package: pip install darkprune[onnx] "
                             "(or pip install onnx)") from None
    return onnx


def onnx_refusal(model: Model) -> str | None:
    """The one-line reason the exporter cannot write `model` (naming the first layer it does not cover), or None."""
    for layer in model.graph:
        reason = refusal(layer, model.graph)
        if reason is not None:
            return f"{layer.where()}: ONNX export does not cover {reason}"
    return None


def _check_opset(onnx, opset: Any) -> int:
    try:
        value = int(opset)
    except (TypeError, ValueError):
        raise SettingError("opset", f"opset {opset!r}: expected a whole number") from None
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= value <= latest:
        raise SettingError("opset", f"opset {value}: the exporter writes opsets {MIN_OPSET} to {latest} (the "
                                    f"installed onnx {onnx.__version__}'s newest)")
    return value


def _output_layers(model: Model) -> list[int]:
    return list(model.graph.output_layers())


def build_onnx(model: Model, *, decode_boxes: bool = False, opset: int = DEFAULT_OPSET,
               bn_eps: float = DARKNET_BN_EPS, outputs: list[int] | None = None):
    """The ONNX ModelProto of `model` (see the module docstring); refuses uncovered layers with one line.
    `outputs`: the layers whose outputs the graph returns (default: those the engine's network returns)."""
    onnx = require_onnx()
    opset = _check_opset(onnx, opset)
    outputs, heads = _checked_outputs(model, outputs, decode_boxes)
    graph = model.graph
    b = GraphBuilder(onnx)
    # the graph's output names first, so no inner tensor takes them
    for reserved in [graph[i].name for i in outputs] + ["boxes", "objectness", "scores", INPUT_NAME]:
        b.fresh(reserved)
    tensors, activated = _emit_layers(b, model, max(outputs), bn_eps)
    graph_outputs, described = _layer_outputs(b, graph, outputs, tensors)
    if decode_boxes:
        decoded, decoded_described = _decode_outputs(b, graph, heads, activated)
        graph_outputs += decoded
        described += decoded_described
    return _model_proto(b, model, graph_outputs, described, opset, bn_eps, heads, decode_boxes)


def _checked_outputs(model: Model, outputs, decode_boxes: bool) -> tuple[list[int], list]:
    """The sorted output layers (the heads added when their boxes are decoded) and the graph's heads; refuses a
    model with an uncovered layer, unknown output layers, or boxes asked of a model without (compatible) heads."""
    reason = onnx_refusal(model)
    if reason is not None:
        raise DarkpruneError(reason)
    graph = model.graph
    outputs = _output_layers(model) if outputs is None else sorted({int(i) for i in outputs})
    if not outputs:
        raise SettingError("outputs", "no output layers asked for")
    for index in outputs:
        if not 0 <= index < len(graph):
            raise SettingError("outputs", f"layer {index} is not in {_cfg_name(model)} (0..{len(graph) - 1})")
    heads = [layer for layer in graph if layer.type in HEAD_TYPES]
    if decode_boxes:
        missing = [layer.index for layer in heads if layer.index > max(outputs)]
        if missing:
            outputs = sorted(set(outputs) | set(missing))
        if not heads:
            raise SettingError("decode_boxes", f"{_cfg_name(model)} has no [yolo] or [region] head: there are no "
                                               f"boxes to decode")
        classes = {layer.attrs["classes"] for layer in heads}
        if len(classes) > 1:
            raise DarkpruneError(f"{_cfg_name(model)}: the heads predict different numbers of classes "
                                 f"({sorted(classes)}): their scores cannot be concatenated")
    return outputs, heads


def _emit_layers(b: GraphBuilder, model: Model, last_needed: int, bn_eps: float) -> tuple[dict, dict]:
    """Every layer up to `last_needed` as ONNX nodes: ({layer: its output tensor}, {head: its activated tensor})."""
    graph = model.graph
    b.shapes[-1] = tuple(graph.input_shape)
    tensors: dict[int, str] = {-1: INPUT_NAME}
    activated: dict[int, str] = {}
    for layer in graph.layers[:last_needed + 1]:
        ins = [tensors[i] for i in layer.inputs]
        if layer.type in HEAD_TYPES:
            out, activated[layer.index] = emit_head(b, layer, ins[0])
        else:
            out = EMITTERS[layer.type](b, layer, ins, model.params.get(layer.index, {}), model.params, bn_eps)
        tensors[layer.index] = out
        b.shapes[layer.index] = layer.out_shape
    return tensors, activated


def _layer_outputs(b: GraphBuilder, graph, outputs: list[int], tensors: dict) -> tuple[list, list[dict]]:
    """The graph outputs named after their layers (value infos, and their description for the metadata)."""
    helper = b.onnx.helper
    graph_outputs, described = [], []
    for index in outputs:
        layer = graph[index]
        name = layer.name
        b.nodes.append(helper.make_node("Identity", [tensors[index]], [name], name=f"{name}.output"))
        shape = [BATCH, *layer.out_shape]
        graph_outputs.append(helper.make_tensor_value_info(name, b.onnx.TensorProto.FLOAT, shape))
        described.append({"name": name, "shape": shape, "layer": index, "type": layer.type})
    return graph_outputs, described


def _decode_outputs(b: GraphBuilder, graph, heads: list, activated: dict) -> tuple[list, list[dict]]:
    """`boxes`, `objectness` and `scores` over every head's candidates, in Darknet's candidate order."""
    helper = b.onnx.helper
    net_w, net_h = int(graph.net["width"]), int(graph.net["height"])
    parts = [emit_decode(b, layer, activated[layer.index], net_w, net_h) for layer in heads]
    boxes = b.concat([p[0] for p in parts], 1, "boxes.concat")
    objectness = b.concat([p[1] for p in parts], 1, "objectness.concat")
    scores = b.concat([p[2] for p in parts], 1, "scores.concat")
    k = sum(layer.in_shape[1] * layer.in_shape[2] * _anchors(layer) for layer in heads)
    classes = heads[0].attrs["classes"]
    b.nodes.append(helper.make_node("Identity", [boxes], ["boxes"], name="boxes.output"))
    b.nodes.append(helper.make_node("Squeeze", [objectness, b.ints([2])], ["objectness"], name="objectness.output"))
    b.nodes.append(helper.make_node("Identity", [scores], ["scores"], name="scores.output"))
    graph_outputs, described = [], []
    for name, shape in (("boxes", [BATCH, k, 4]), ("objectness", [BATCH, k]), ("scores", [BATCH, k, classes])):
        graph_outputs.append(helper.make_tensor_value_info(name, b.onnx.TensorProto.FLOAT, shape))
        described.append({"name": name, "shape": shape})
    return graph_outputs, described


def _model_proto(b: GraphBuilder, model: Model, graph_outputs: list, described: list[dict], opset: int,
                 bn_eps: float, heads: list, decode_boxes: bool):
    """The ModelProto around the built nodes: input, outputs, opset, the oldest IR version for it, metadata."""
    from .. import __version__
    helper = b.onnx.helper
    c, h, w = model.graph.input_shape
    inputs = [helper.make_tensor_value_info(INPUT_NAME, b.onnx.TensorProto.FLOAT, [BATCH, c, h, w])]
    name = _cfg_name(model)
    onnx_graph = helper.make_graph(b.nodes, Path(name).stem or "darknet", inputs, graph_outputs,
                                   initializer=b.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="darkprune",
                              producer_version=__version__,
                              doc_string=f"{name} exported by darkprune {__version__} (opset {opset})")
    # the oldest IR version that carries this opset, so older runtimes read the file too
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    metadata = {
        "cfg": name,
        "weights": Path(model.weights_path).name if model.weights_path else "",
        "darkprune_version": __version__,
        "opset": str(opset),
        "input": f"{INPUT_NAME}: float32 ({BATCH}, {c}, {h}, {w}), RGB scaled to 0..1 as darkprune's engine takes it",
        "outputs": json.dumps(described),
        "batchnorm_eps": repr(float(bn_eps)),
    }
    if heads:
        metadata["boxes"] = ("boxes: cx, cy, w, h in input pixels; scores = objectness * class probability; "
                             "no threshold or NMS applied" if decode_boxes else "raw head activations only")
    helper.set_model_props(proto, metadata)
    return proto


def _anchors(layer) -> int:
    return len(layer.attrs["mask"]) if layer.type == "yolo" else layer.attrs["num"]


def _cfg_name(model: Model) -> str:
    path = model.cfg_path or getattr(model.graph.cfg, "path", None)
    return Path(str(path)).name if path else "in-memory model"


def export_onnx(model: Model, path: str | os.PathLike, *, decode_boxes: bool = False, opset: int = DEFAULT_OPSET,
                bn_eps: float = DARKNET_BN_EPS, check: bool = True, outputs: list[int] | None = None) -> dict:
    """Write `model` as an ONNX file at `path` (temp file + rename; never over the model's cfg or weights).
    `check` runs onnx.checker on the result first; `outputs` as in build_onnx. Returns what was written (path,
    opset, inputs, outputs...)."""
    onnx = require_onnx()
    proto = build_onnx(model, decode_boxes=decode_boxes, opset=opset, bn_eps=bn_eps, outputs=outputs)
    size = proto.ByteSize()
    if size > MAX_BYTES:
        raise DarkpruneError(f"{_cfg_name(model)}: the ONNX file would hold {size / 2 ** 30:.1f} GiB, over "
                             f"protobuf's 2 GiB limit for one file")
    if check:
        onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write_bytes(path, data, [p for p in (model.cfg_path, model.weights_path) if p])
    return {
        "path": str(path),
        "opset": int(proto.opset_import[0].version),
        "ir_version": int(proto.ir_version),
        "cfg": _cfg_name(model),
        "inputs": [{"name": INPUT_NAME, "shape": [BATCH, *model.graph.input_shape]}],
        "outputs": json.loads(next(p.value for p in proto.metadata_props if p.key == "outputs")),
        "decode_boxes": bool(decode_boxes),
        "layers": len(model.graph),
        "nodes": len(proto.graph.node),
        "bytes": len(data),
    }


__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "build_onnx", "export_onnx", "onnx_refusal", "require_onnx"]
