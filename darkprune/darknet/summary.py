"""The Darknet-style layer table that `darkprune info` prints, as rows (for --json) and as text."""
from __future__ import annotations

import numpy as np

from .graph import Layer
from .model import Model


def _detail(layer: Layer) -> tuple[str, str]:
    a = layer.attrs
    t = layer.type
    if t == "convolutional":
        filters = f"{a['filters']}" + (f"/{a['groups']}" if a["groups"] > 1 else "")
        size = f"{a['size']}x{a['size']}/{a['stride_x']}" + (f"x{a['stride_y']}" if a["stride_y"] != a["stride_x"] else "")
        if a["dilation"] > 1:
            size += f"({a['dilation']})"
        return filters, size
    if t in ("maxpool", "local_avgpool"):
        return "", f"{a['size']}x{a['size']}/{a['stride_x']}"
    if t == "connected":
        return f"{a['output']}", ""
    if t == "route":
        text = ",".join(str(i) for i in a["layers"])
        if a["groups"] > 1:
            text += f" {a['group_id']}/{a['groups']}"
        return "", text
    if t == "shortcut":
        text = "from " + ",".join(str(i) for i in a["from_layers"])
        if a["weights_type"] != "none":
            text += f" ({a['weights_type']})"
        return "", text
    if t in ("scale_channels", "sam"):
        return "", f"from {a['from_layer']}"
    if t == "upsample":
        return "", f"x{a['stride']}" if a["stride"] > 0 else f"/{-a['stride']}"
    if t in ("reorg", "reorg3d"):
        return "", f"/{a['stride']}"
    return "", ""


def layer_rows(model: Model) -> list[dict]:
    rows = []
    for layer in model.graph:
        filters, size = _detail(layer)
        row = {
            "index": layer.index, "name": layer.name, "type": layer.type, "filters": filters, "size": size,
            "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
            "params": int(layer.params), "bflops": round(float(layer.bflops), 6),
        }
        arrays = model.params.get(layer.index)
        if arrays and "weights" in arrays and layer.type in ("convolutional", "connected", "local"):
            w = arrays["weights"]
            row["sparsity"] = float(np.mean(w == 0)) if w.size else 0.0
            row["mean_abs_weight"] = float(np.mean(np.abs(w))) if w.size else 0.0
        rows.append(row)
    return rows


def darknet_total_bflops(graph) -> float:
    """The `Total BFLOPS` Darknet prints (parser.c): each positive layer figure stored as a float32 and added, in
    layer order, into a float32 total. graph.total_bflops is the exact (float64) sum, for computing with; this
    differs from it in the last printed digit on some big cfgs (yolov3-voc: 65.442, not 65.443)."""
    total = np.float32(0.0)
    for layer in graph.layers:
        if layer.bflops > 0:
            total = np.float32(total + np.float32(layer.bflops))
    return float(total)


def info_dict(model: Model, with_weights: bool) -> dict:
    rows = layer_rows(model)
    if not with_weights:
        for row in rows:
            row.pop("sparsity", None)
            row.pop("mean_abs_weight", None)
    out = {
        "cfg": model.cfg_path, "weights": model.weights_path if with_weights else None,
        "input_shape": list(model.input_shape),
        "total_bflops": round(darknet_total_bflops(model.graph), 6), "total_params": model.graph.total_params,
        "layers": rows,
    }
    if with_weights:
        w = [model.params[l.index]["weights"] for l in model.graph
             if l.type in ("convolutional", "connected", "local") and l.index in model.params]
        total = sum(x.size for x in w)
        out["weight_sparsity"] = float(sum(int((x == 0).sum()) for x in w) / total) if total else 0.0
        out["header"] = {"version": model.header.version, "seen": model.header.seen}
    return out


def _wh(shape) -> str:
    c, h, w = shape
    return f"{w:4d} x{h:4d} x{c:5d}"


def info_text(info: dict) -> str:
    with_weights = info.get("weights") is not None
    head = f"{'layer':>5} {'type':<15}{'filters':>9} {'size/strd(dil)':<15}{'input':>20} -> {'output':<20}" \
           f"{'params':>10} {'BFLOPs':>8}"
    if with_weights:
        head += f" {'sparsity':>9} {'mean|w|':>9}"
    lines = [head]
    for r in info["layers"]:
        line = (f"{r['index']:5d} {r['type']:<15}{r['filters']:>9} {r['size']:<15}{_wh(r['in_shape']):>20} -> "
                f"{_wh(r['out_shape']):<20}{r['params']:>10} {r['bflops']:8.3f}")
        if with_weights and "sparsity" in r:
            line += f" {100 * r['sparsity']:8.1f}% {r['mean_abs_weight']:9.4f}"
        lines.append(line)
    lines.append(f"Total BFLOPS {info['total_bflops']:5.3f}")
    lines.append(f"Total params {info['total_params']:,}")
    if with_weights:
        lines.append(f"Weights: version {info['header']['version']}, seen {info['header']['seen']:,}, "
                     f"weight sparsity {100 * info['weight_sparsity']:.2f}%")
    return "\n".join(lines)
