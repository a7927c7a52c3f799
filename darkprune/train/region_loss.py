"""Darknet's [region] (YOLOv2) training loss, as AlexeyAB's forward_region_layer (src/region_layer.c).

Same input layout as the engine's region head (per anchor a the channels a*(5+C) + (x, y, w, h, obj, classes)).
Darknet's region deltas are chain-ruled through the logistic for x, y and objectness (its delta_region_box and the
objectness deltas multiply by p(1-p)), and classes get class_scale*(onehot - p) with p the softmax output (or the
raw value when softmax=0), so every delta is the true negative gradient of a defined loss:
  x, y: coord_scale*(t - sigmoid(z))^2 / 2;  w, h: coord_scale*(t - z)^2 / 2 (t = log(w*W/anchor_w), anchors in
  grid cells);  objectness: object_scale*(1 - p)^2/2 at assigned cells, noobject_scale*p^2/2 at the others unless
  their best IoU > thresh;  classes: class_scale*cross-entropy of the softmax (softmax=1) or class_scale*(t-z)^2/2.
rescore=1 (target = the prediction's IoU, a constant to Darknet) and the first-12800-images prior matching (a
0.01-scaled pull of every box toward its anchor at the cell centre, depending on `seen`) are reproduced too.
The best anchor of a truth is chosen by the IoU of the *predicted* box shape (anchor shapes with bias_match=1).
Not supported: softmax_tree/map (YOLO9000), coords != 4. Darknet's cost: sum(delta^2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..engine.yolo import region_forward
from .box_iou import box_iou
from .heads import (N_STATS, S_AVG_ANYOBJ, S_AVG_CAT, S_AVG_OBJ, S_CLASS_COUNT, S_COUNT, S_RECALL, S_TOT_IOU,
                    YoloLossResult, best_truth, focal_class_deltas, head_input, logistic, read_truth)


@njit(cache=True, error_model="numpy")
def _region_box(raw, b, base, j, i, anchors, n, lw, lh):
    px = (i + logistic(raw[b, base + 0, j, i])) / lw
    py = (j + logistic(raw[b, base + 1, j, i])) / lh
    pw = np.exp(raw[b, base + 2, j, i]) * anchors[2 * n] / lw
    ph = np.exp(raw[b, base + 3, j, i]) * anchors[2 * n + 1] / lh
    return px, py, pw, ph


@njit(cache=True, error_model="numpy")
def _delta_region_box(tx, ty, tw, th, raw, delta, b, base, j, i, anchors, n, lw, lh, scale):
    px, py, pw, ph = _region_box(raw, b, base, j, i, anchors, n, lw, lh)
    iou = box_iou(px, py, pw, ph, tx, ty, tw, th)
    t_x = tx * lw - i
    t_y = ty * lh - j
    t_w = np.log(tw * lw / anchors[2 * n])
    t_h = np.log(th * lh / anchors[2 * n + 1])
    sx = logistic(raw[b, base + 0, j, i])
    sy = logistic(raw[b, base + 1, j, i])
    delta[b, base + 0, j, i] = scale * (t_x - sx) * ((1 - sx) * sx)
    delta[b, base + 1, j, i] = scale * (t_y - sy) * ((1 - sy) * sy)
    delta[b, base + 2, j, i] = scale * (t_w - raw[b, base + 2, j, i])
    delta[b, base + 3, j, i] = scale * (t_h - raw[b, base + 3, j, i])
    return iou


@njit(cache=True, error_model="numpy")
def _delta_region_class(out, delta, b, c0, j, i, class_id, classes, scale, focal_loss, stats):
    if focal_loss:
        focal_class_deltas(out, delta, b, c0, j, i, class_id, classes, scale)
    else:
        for n in range(classes):
            t = 1.0 if n == class_id else 0.0
            delta[b, c0 + n, j, i] = scale * (t - out[b, c0 + n, j, i])
    stats[S_AVG_CAT] += out[b, c0 + class_id, j, i]


@njit(cache=True, parallel=True, error_model="numpy")
def _region_delta_kernel(raw, out, truths, ntruth, anchors, classes, thresh, bias_match, rescore, coord_scale,
                         object_scale, noobject_scale, class_scale, classfix, focal_loss, prior_warmup, delta, stats):
    n_batch, _, lh, lw = raw.shape
    num = anchors.shape[0] // 2
    size = 5 + classes
    for b in prange(n_batch):
        st = stats[b]
        nt = ntruth[b]
        for j in range(lh):
            for i in range(lw):
                for n in range(num):
                    base = n * size
                    px, py, pw, ph = _region_box(raw, b, base, j, i, anchors, n, lw, lh)
                    best_iou, best_t, _ = best_truth(px, py, pw, ph, truths, b, nt, classes)
                    best_class = int(truths[b, best_t, 0]) if best_iou > 0 else -1
                    p = out[b, base + 4, j, i]
                    st[S_AVG_ANYOBJ] += p
                    delta[b, base + 4, j, i] = noobject_scale * ((0 - p) * ((1 - p) * p))
                    if classfix == -1:
                        delta[b, base + 4, j, i] = noobject_scale * ((best_iou - p) * ((1 - p) * p))
                    elif best_iou > thresh:
                        delta[b, base + 4, j, i] = 0
                        if classfix > 0:
                            scale = class_scale * (p if classfix == 2 else 1.0)
                            _delta_region_class(out, delta, b, base + 5, j, i, best_class, classes, scale,
                                                focal_loss, st)
                            st[S_CLASS_COUNT] += 1
                    if prior_warmup:
                        _delta_region_box((i + 0.5) / lw, (j + 0.5) / lh, anchors[2 * n] / lw,
                                          anchors[2 * n + 1] / lh, raw, delta, b, base, j, i, anchors, n, lw, lh,
                                          0.01)
        for t in range(nt):
            class_id, tx, ty, tw, th, i, j = read_truth(truths, b, t, classes, lw, lh)
            if class_id < 0:
                continue
            best_iou = 0.0
            best_n = 0
            for n in range(num):
                px, py, pw, ph = _region_box(raw, b, n * size, j, i, anchors, n, lw, lh)
                if bias_match:
                    pw = anchors[2 * n] / lw
                    ph = anchors[2 * n + 1] / lh
                iou = box_iou(0.0, 0.0, pw, ph, 0.0, 0.0, tw, th)
                if iou > best_iou:
                    best_iou = iou
                    best_n = n
            base = best_n * size
            iou = _delta_region_box(tx, ty, tw, th, raw, delta, b, base, j, i, anchors, best_n, lw, lh,
                                    coord_scale)
            if iou > 0.5:
                st[S_RECALL] += 1
            st[S_TOT_IOU] += iou
            p = out[b, base + 4, j, i]
            st[S_AVG_OBJ] += p
            target = iou if rescore else 1.0
            delta[b, base + 4, j, i] = object_scale * (target - p) * ((1 - p) * p)
            _delta_region_class(out, delta, b, base + 5, j, i, class_id, classes, class_scale, focal_loss, st)
            st[S_COUNT] += 1
            st[S_CLASS_COUNT] += 1


@dataclass
class RegionOptions:
    """A [region] layer's training options (Darknet's parse_region defaults)."""
    classes: int
    anchors: tuple[float, ...]          # 2 * num values, in grid cells
    softmax: int = 0
    thresh: float = 0.5
    bias_match: int = 0
    rescore: int = 0
    coord_scale: float = 1.0
    object_scale: float = 1.0
    noobject_scale: float = 1.0
    class_scale: float = 1.0
    classfix: int = 0
    focal_loss: int = 0
    max_boxes: int = 200

    @property
    def num(self) -> int:
        return len(self.anchors) // 2

    @classmethod
    def from_layer(cls, layer) -> "RegionOptions":
        if layer.type != "region":
            raise ValueError(f"layer {layer.index} is a [{layer.type}], not a [region]")
        a = layer.attrs
        s = layer.section
        if a["coords"] != 4:
            raise ValueError(f"{layer.where()}: coords={a['coords']} is not supported by the region loss")
        if s.get_str("tree") or s.get_str("map"):
            raise ValueError(f"{layer.where()}: tree=/map= (YOLO9000) is not supported by the region loss")
        return cls(classes=a["classes"], anchors=tuple(a["anchors"]), softmax=a["softmax"], thresh=a["thresh"],
                   bias_match=a["bias_match"], rescore=a["rescore"], coord_scale=a["coord_scale"],
                   object_scale=a["object_scale"], noobject_scale=a["noobject_scale"], class_scale=a["class_scale"],
                   classfix=s.get_int("classfix", 0), focal_loss=s.get_int("focal_loss", 0),
                   max_boxes=a["max_boxes"])


def region_loss(x: np.ndarray, truths, options, seen: int) -> YoloLossResult:
    """Darknet's [region] training loss for one head. x: raw input (N, num*(5+classes), H, W); truths as for
    yolo_loss; options: RegionOptions or the darkprune Layer; seen: images trained on before this batch (Darknet's
    *net.seen, already counting this mini-batch): below 12800 the prior-matching warm-up applies.
    The returned `output` holds the objectness logistic and class softmax (x, y, w, h stay raw, as Darknet's)."""
    opts = options if isinstance(options, RegionOptions) else RegionOptions.from_layer(options)
    size = 5 + opts.classes
    x, packed, counts = head_input(x, truths, opts.num * size, opts.max_boxes, "region loss",
                                   f"{opts.num} anchors x (5 + {opts.classes})")
    n = x.shape[0]
    # the inference activations (logistic objectness, softmax classes), with x, y left raw as Darknet's output
    out = region_forward(x, opts.num, opts.classes, 4, bool(opts.softmax))
    xy = out.reshape(n, opts.num, size, -1)[:, :, :2]
    xy[...] = x.reshape(n, opts.num, size, -1)[:, :, :2]
    delta = np.zeros_like(x)
    stats = np.zeros((n, N_STATS), np.float64)
    _region_delta_kernel(x, out, packed, counts, np.asarray(opts.anchors, np.float64), opts.classes,
                         float(opts.thresh), bool(opts.bias_match), bool(opts.rescore), float(opts.coord_scale),
                         float(opts.object_scale), float(opts.noobject_scale), float(opts.class_scale),
                         int(opts.classfix), bool(opts.focal_loss), int(seen) < 12800, delta, stats)
    tot = stats.sum(axis=0)
    count = max(int(tot[S_COUNT]), 1)
    d64 = delta.astype(np.float64)
    h, w = x.shape[2:]
    info = dict(avg_iou=tot[S_TOT_IOU] / count, count=int(tot[S_COUNT]), class_count=int(tot[S_CLASS_COUNT]),
                recall=tot[S_RECALL] / count, avg_obj=tot[S_AVG_OBJ] / count,
                avg_cat=tot[S_AVG_CAT] / max(int(tot[S_CLASS_COUNT]), 1),
                avg_anyobj=tot[S_AVG_ANYOBJ] / (w * h * opts.num * n))
    return YoloLossResult((-delta).astype(x.dtype), float((d64 * d64).sum()), out, delta, info)
