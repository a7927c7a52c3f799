"""The detection heads as ONNX nodes: the activations `[yolo]`/`[region]` leave in Darknet's l.output (what the
engine's network outputs for a head, see darkprune.engine.yolo), and optionally the box decoding
darkprune.engine.decode does before thresholds and NMS.

Raw head tensor: (N, anchors*(coords+1+classes), H, W), channel a*(entries) + e = entry e of anchor a.
[yolo]: logistic on x, y, objectness and classes (none with new_coords=1), then x, y = x*scale_x_y - 0.5*(scale_x_y-1).
[region]: logistic on x, y and objectness; softmax over each anchor's classes with softmax=1.

Decoded (all heads concatenated, Darknet's get_yolo_detections order: per head, cells row-major, anchors inner):
`boxes` (N, K, 4) centre x, centre y, width, height in input pixels; `objectness` (N, K); `scores` (N, K, classes)
= objectness * class probability. Thresholding and NMS are left to the caller (Darknet keeps a candidate when its
objectness > thresh and zeroes class scores <= thresh, then runs NMS).
"""
from __future__ import annotations

import numpy as np

from ..darknet.graph import Layer
from ..darknet.heads import DECODED_HEAD_TYPES as HEAD_TYPES   # the heads the engine runs (and so exports)


def _xy_affine(scale_x_y: float) -> tuple[float, float]:
    # the engine's (and Darknet's) float32 scale and its shift computed in double from that float
    s32 = np.float32(scale_x_y)
    return float(s32), float(np.float32(-0.5 * (float(s32) - 1.0)))


def head_geometry(layer: Layer) -> tuple[int, int, int]:
    """(anchors, entries per anchor, coords) of a head layer."""
    a = layer.attrs
    if layer.type == "yolo":
        return len(a["mask"]), 5 + a["classes"], 4
    return a["num"], a["coords"] + 1 + a["classes"], a["coords"]


def emit_head(b, layer: Layer, x: str) -> tuple[str, str]:
    """The head's activations on tensor x: returns (raw head tensor (N, C, H, W), the same as (N, A, E, H, W))."""
    a = layer.attrs
    c, h, w = layer.in_shape
    anchors, entries, coords = head_geometry(layer)
    stem = layer.name
    view = b.reshape(x, [0, anchors, entries, h, w], stem)

    def part(start, stop):
        return b.slice(view, 2, start, stop, stem)

    if layer.type == "yolo":
        if a["new_coords"]:
            xy, rest = part(0, 2), [part(2, entries)]
        else:
            xy = b.op("Sigmoid", [part(0, 2)], stem)
            rest = [part(2, 4), b.op("Sigmoid", [part(4, entries)], stem)]
        scale, shift = _xy_affine(a["scale_x_y"])
        parts = [b.affine(xy, scale, shift, stem)] + rest
    else:
        parts = [b.op("Sigmoid", [part(0, 2)], stem)]
        if coords > 2:
            parts.append(part(2, coords))
        parts.append(b.op("Sigmoid", [part(coords, coords + 1)], stem))
        if a["classes"]:
            classes = part(coords + 1, entries)
            parts.append(b.op("Softmax", [classes], stem, axis=2) if a["softmax"] else classes)
    activated = b.concat(parts, 2, stem)
    return b.reshape(activated, [0, c, h, w], stem), activated


def emit_decode(b, layer: Layer, activated: str, net_w: int, net_h: int) -> tuple[str, str, str]:
    """Boxes (N, K, 4), objectness (N, K, 1) and scores (N, K, classes) of one head, from its (N, A, E, H, W)
    activations, as darkprune.engine.decode computes them (in input pixels rather than relative to the image)."""
    a = layer.attrs
    _, h, w = layer.in_shape
    anchors, entries, coords = head_geometry(layer)
    stem = f"{layer.name}.decode"
    cells = b.reshape(b.transpose(activated, [0, 3, 4, 1, 2], stem), [0, h * w * anchors, entries], stem)
    k = h * w * anchors
    cell = np.arange(k) // anchors
    anchor = np.arange(k) % anchors
    col = b.const(f"{stem}.col", (cell % w).astype(np.float32).reshape(1, k, 1))
    row = b.const(f"{stem}.row", (cell // w).astype(np.float32).reshape(1, k, 1))
    biases = np.asarray(a["anchors"], np.float32)
    index = np.asarray(a["mask"] if layer.type == "yolo" else range(anchors), np.int64)[anchor]
    anchor_w, anchor_h = biases[2 * index], biases[2 * index + 1]

    def entry(start, stop):
        return b.slice(cells, 2, start, stop, stem)

    # centre: (cell + offset) / grid, relative to the input, then in pixels
    cx = b.mul(b.op("Div", [b.add(col, entry(0, 1), stem), b.scalar(w)], stem), b.scalar(net_w), stem)
    cy = b.mul(b.op("Div", [b.add(row, entry(1, 2), stem), b.scalar(h)], stem), b.scalar(net_h), stem)
    tw, th = entry(2, 3), entry(3, 4)
    if layer.type == "yolo":
        # anchors are in input pixels: exp(t) * anchor (or (2 t)^2 * anchor with new_coords)
        size_w, size_h = anchor_w, anchor_h
    else:
        # [region] anchors are in grid cells
        size_w, size_h = anchor_w / np.float32(w) * np.float32(net_w), anchor_h / np.float32(h) * np.float32(net_h)
    aw = b.const(f"{stem}.anchor_w", size_w.astype(np.float32).reshape(1, k, 1))
    ah = b.const(f"{stem}.anchor_h", size_h.astype(np.float32).reshape(1, k, 1))
    if layer.type == "yolo" and a["new_coords"]:
        bw = b.mul(b.mul(b.mul(tw, tw, stem), b.scalar(4.0), stem), aw, stem)
        bh = b.mul(b.mul(b.mul(th, th, stem), b.scalar(4.0), stem), ah, stem)
    else:
        bw = b.mul(b.op("Exp", [tw], stem), aw, stem)
        bh = b.mul(b.op("Exp", [th], stem), ah, stem)
    boxes = b.concat([cx, cy, bw, bh], 2, stem)
    objectness = entry(coords, coords + 1)
    scores = b.mul(objectness, entry(coords + 1, entries), stem)
    return boxes, objectness, scores
