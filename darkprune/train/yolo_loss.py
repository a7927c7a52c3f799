"""Darknet's `[yolo]` training loss, as AlexeyAB's forward_yolo_layer / process_batch (src/yolo_layer.c) and
dx_box_iou (src/box.c, in box_iou.py) compute it. The `[region]` (YOLOv2) loss is region_loss.py's.

Input: the head's raw input x (N, A*(4+1+C), H, W) (A = len(mask)), per anchor a the channels a*(5+C) + (x, y, w, h,
objectness, classes...), and per image the ground truth as rows (class, cx, cy, w, h), normalised to the network
input (Darknet's label rows after augmentation). Output: Darknet's cost and the gradient w.r.t. x.

What Darknet does, step by step (per image, all of it reproduced here, in Darknet's order, since later steps
overwrite or accumulate into earlier deltas):
1. Activate: logistic on x, y, objectness, classes (not w, h); x, y <- x*scale_x_y - 0.5*(scale_x_y - 1). With
   new_coords=1 no logistic (the conv before already applied it), w = 4*anchor*x^2 instead of anchor*exp(x).
2. Every prediction (cell, anchor): objectness delta obj_normalizer*(0 - p_obj), except when its best IoU with a
   truth whose class "matches" (any class prob of the prediction > 0.25, whatever the truth's class: Darknet's
   compare_yolo_class) exceeds ignore_thresh: then 0 (or, with objectness_smooth, max(that, obj_norm*(iou - p))).
   If its best IoU with any truth exceeds truth_thresh: positive objectness, class and box deltas as in step 3.
3. Every truth: the best anchor over ALL `num` anchors by IoU of (w, h) shapes; if that anchor is in this layer's
   mask, the prediction at the truth's cell (i = int(cx*W), j = int(cy*H)) for that anchor gets: box deltas
   (accumulated: +=), objectness obj_norm*(1 - p) (times a class multiplier from counters_per_class), class deltas
   (y - p) with y = 1 or 0, label-smoothed to y(1-eps) + eps/2, or focal-loss deltas. cls_normalizer scales the
   true class's delta only when counters_per_class is set (Darknet's delta_yolo_class; otherwise it has no effect). With iou_thresh < 1 every
   other anchor of the mask whose shape IoU (kind iou_thresh_kind) with the truth exceeds iou_thresh gets the same.
4. With iou_thresh < 1 the box deltas of a prediction are divided by the number of its classes with a positive delta.
Box deltas (scale = 2 - w*h of the truth): mse: scale*iou_normalizer*(target - output) with targets
cx*W - i, cy*H - j (against the *activated, scaled* x, y), log(w*net_w/anchor_w) (or sqrt(w*net_w/(4*anchor_w)) for
new_coords) against the raw w, h; iou/giou/diou/ciou: iou_normalizer * dx_box_iou's derivatives (w, h ones times
exp(raw w/h) unless new_coords), NaN/inf set to 0, clipped to +-max_delta.

Gradient. Darknet's backward adds the delta to the previous layer's delta *without* the logistic's derivative
(backward_yolo_layer is a plain axpy; the GPU build also multiplies by delta_normalizer). Its delta is a negative
gradient, so we return grad = -delta_normalizer * delta, exactly what Darknet applies. This is the true gradient
of a defined loss where the deltas are (target - output) of a logistic output or of a raw value:
  x, y (mse): scale*iou_norm*(s*softplus(z) - (t + (s-1)/2)*z)  (binary cross-entropy on logits when s = 1);
  w, h (mse): scale*iou_norm*(z - t)^2 / 2;  objectness and classes: obj_norm*(softplus(z) - y*z), i.e. BCE;
  with new_coords=1 (no logistic here): squared errors (s*z - (s-1)/2 - t)^2/(2s), (z - t)^2/2.
It is NOT the gradient of any loss for:
  - iou/giou/diou/ciou box deltas: dx_box_iou gives d(IoU-ish)/d(box centre, size) in image units and Darknet
    applies it to the raw x, y as is (no logistic derivative, no scale_x_y, no 1/W), to w, h times exp(raw) only
    (no anchor/net_w); its w, h parts are twice the true dIoU/dw ("we do not divide by 2"); its DIoU/CIoU
    enclosing-box term has the wrong sign for x, y; CIoU treats alpha as a constant and drops 1/(w^2+h^2) (as the
    CIoU paper suggests); in the no-overlap case the IoU part is dropped and the union derivative still uses the
    (negative) intersection sides;
  - objectness_smooth (targets are the prediction's own IoU, treated as constants);
  - the ignore rule, truth_thresh, iou_thresh averaging, focal loss (its delta is not the focal loss's gradient)
    are piecewise rules, exact gradients only between their switch points.
These are reproduced as Darknet computes them, so a cfg trains here as it trains in Darknet.

Cost: Darknet's `*l.cost` (what get_network_cost averages over the yolo layers; see losses.train_loss for the
printed loss). With show_details=1 (the default): mse -> sum(delta^2); iou kinds -> iou_normalizer * mean(1 - IoU)
(mean(1 - GIoU) for giou) over the assigned truths + obj_normalizer * sum(delta^2 without the box deltas). With
show_details=0: sum(delta^2). Deltas here are before delta_normalizer.

Not reproduced: `map=` (YOLO9000 class maps), the bad-label rejection and equidistant-point options of [net]
(badlabels_rejection_percentage, num_sigmas_reject_badlabels, equidistant_point), adversarial training, track ids /
embeddings. A truth at cx = 1.0 exactly (cell index W in Darknet, an out-of-range write) is put in the last cell.
Like Darknet, the rows of an image are read until the first one with cx == 0 (Darknet's end-of-list marker; its
loader moves a real cx == 0 to 1/net_w), rows with a class outside 0..classes-1 are skipped, and at most
`max` rows are used.
"""
from __future__ import annotations
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .box_iou import (CIOU, DIOU, GIOU, IOU, IOU_KINDS, MSE, box_ciou, box_diou, box_giou,  # noqa: F401
                      box_iou, box_iou_kind, dx_box_iou)
from .heads import (N_STATS, S_AVG_ANYOBJ, S_AVG_CAT, S_AVG_OBJ, S_CLASS_COUNT, S_COUNT, S_RECALL, S_RECALL75,
                    S_REWRITTEN, S_TOT_CIOU, S_TOT_DIOU, S_TOT_GIOU, S_TOT_GIOU_LOSS, S_TOT_IOU, S_TOT_IOU_LOSS,
                    S_TOTAL_BBOX, YoloLossResult, best_truth, focal_class_deltas, head_input,  # noqa: F401
                    pack_truths, read_truth)


# ---------------------------------------------------------------------------------------------------------------
# yolo_layer.c

@njit(cache=True, parallel=True, error_model="numpy")
def _activate(x, num, entries, scale, beta, new_coords, out):
    # x, out: (N * num * entries, H * W) rows; entry e of an anchor is row (b*num + a)*entries + e
    rows, hw = x.shape
    one = scale - scale + 1
    for r in prange(rows):
        e = r % entries
        act = (not new_coords) and e != 2 and e != 3
        if act:
            for k in range(hw):
                out[r, k] = one / (one + np.exp(-x[r, k]))
        else:
            for k in range(hw):
                out[r, k] = x[r, k]
        if e < 2:
            for k in range(hw):
                out[r, k] = out[r, k] * scale + beta


@njit(cache=True, error_model="numpy")
def _pred_box(out, b, base, j, i, anchor_w, anchor_h, lw, lh, net_w, net_h, new_coords):
    px = (i + out[b, base + 0, j, i]) / lw
    py = (j + out[b, base + 1, j, i]) / lh
    if new_coords:
        vw = out[b, base + 2, j, i]
        vh = out[b, base + 3, j, i]
        pw = vw * vw * 4 * anchor_w / net_w
        ph = vh * vh * 4 * anchor_h / net_h
    else:
        pw = np.exp(out[b, base + 2, j, i]) * anchor_w / net_w
        ph = np.exp(out[b, base + 3, j, i]) * anchor_h / net_h
    return px, py, pw, ph


@njit(cache=True, error_model="numpy")
def _fix_nan_inf(v):
    if np.isnan(v) or np.isinf(v):
        return 0.0
    return v


@njit(cache=True, error_model="numpy")
def _clip(v, max_val):
    if v > max_val:
        return max_val
    if v < -max_val:
        return -max_val
    return v


@njit(cache=True, error_model="numpy")
def _delta_box(tx, ty, tw, th, out, delta, b, base, j, i, anchor_w, anchor_h, lw, lh, net_w, net_h, scale,
               iou_normalizer, iou_loss, max_delta, new_coords, stats):
    """delta_yolo_box (always with accumulate=1, as every caller in yolo_layer.c passes); updates the rewritten
    counter and returns (iou, giou, diou, ciou) of the prediction before the update."""
    if (delta[b, base + 0, j, i] != 0 or delta[b, base + 1, j, i] != 0 or delta[b, base + 2, j, i] != 0
            or delta[b, base + 3, j, i] != 0):
        stats[S_REWRITTEN] += 1
    px, py, pw, ph = _pred_box(out, b, base, j, i, anchor_w, anchor_h, lw, lh, net_w, net_h, new_coords)
    iou = box_iou(px, py, pw, ph, tx, ty, tw, th)
    giou = box_giou(px, py, pw, ph, tx, ty, tw, th)
    diou = box_diou(px, py, pw, ph, tx, ty, tw, th)
    ciou = box_ciou(px, py, pw, ph, tx, ty, tw, th)
    if pw == 0:
        pw = 1.0
    if ph == 0:
        ph = 1.0
    if iou_loss == MSE:
        t_x = tx * lw - i
        t_y = ty * lh - j
        if new_coords:
            t_w = np.sqrt(tw * net_w / (4 * anchor_w))
            t_h = np.sqrt(th * net_h / (4 * anchor_h))
        else:
            t_w = np.log(tw * net_w / anchor_w)
            t_h = np.log(th * net_h / anchor_h)
        delta[b, base + 0, j, i] += scale * (t_x - out[b, base + 0, j, i]) * iou_normalizer
        delta[b, base + 1, j, i] += scale * (t_y - out[b, base + 1, j, i]) * iou_normalizer
        delta[b, base + 2, j, i] += scale * (t_w - out[b, base + 2, j, i]) * iou_normalizer
        delta[b, base + 3, j, i] += scale * (t_h - out[b, base + 3, j, i]) * iou_normalizer
    else:
        dx, dy, dw, dh = dx_box_iou(px, py, pw, ph, tx, ty, tw, th, iou_loss)
        if not new_coords:
            dw *= np.exp(out[b, base + 2, j, i])
            dh *= np.exp(out[b, base + 3, j, i])
        dx = _fix_nan_inf(dx * iou_normalizer)
        dy = _fix_nan_inf(dy * iou_normalizer)
        dw = _fix_nan_inf(dw * iou_normalizer)
        dh = _fix_nan_inf(dh * iou_normalizer)
        if not np.isinf(max_delta):
            dx = _clip(dx, max_delta)
            dy = _clip(dy, max_delta)
            dw = _clip(dw, max_delta)
            dh = _clip(dh, max_delta)
        delta[b, base + 0, j, i] += dx
        delta[b, base + 1, j, i] += dy
        delta[b, base + 2, j, i] += dw
        delta[b, base + 3, j, i] += dh
    return iou, giou, diou, ciou


@njit(cache=True, error_model="numpy")
def _delta_class(out, delta, b, c0, j, i, class_id, classes, focal_loss, eps, cm, has_cm, cls_normalizer,
                 stats, count_avg):
    """delta_yolo_class; c0 = channel of the first class entry."""
    if delta[b, c0 + class_id, j, i] != 0:
        y = 1.0
        if eps != 0:
            y = y * (1 - eps) + 0.5 * eps
        r = y - out[b, c0 + class_id, j, i]
        if not (np.isnan(r) or np.isinf(r)):
            delta[b, c0 + class_id, j, i] = r
        if has_cm:
            delta[b, c0 + class_id, j, i] *= cm[class_id]
        if count_avg:
            stats[S_AVG_CAT] += out[b, c0 + class_id, j, i]
        return
    if focal_loss:
        focal_class_deltas(out, delta, b, c0, j, i, class_id, classes, 1.0)
        if count_avg:
            stats[S_AVG_CAT] += out[b, c0 + class_id, j, i]
    else:
        for n in range(classes):
            y = 1.0 if n == class_id else 0.0
            if eps != 0:
                y = y * (1 - eps) + 0.5 * eps
            r = y - out[b, c0 + n, j, i]
            if not (np.isnan(r) or np.isinf(r)):
                delta[b, c0 + n, j, i] = r
            if has_cm and n == class_id:
                delta[b, c0 + class_id, j, i] *= cm[class_id] * cls_normalizer
            if n == class_id and count_avg:
                stats[S_AVG_CAT] += out[b, c0 + n, j, i]


@njit(cache=True, error_model="numpy")
def _mask_index(mask, n):
    for k in range(mask.shape[0]):
        if mask[k] == n:
            return k
    return -1


@njit(cache=True, error_model="numpy")
def _assign_truth(out, delta, b, a, j, i, anchor_n, tx, ty, tw, th, class_id, classes, entries, anchors, lw, lh,
                  net_w, net_h, iou_normalizer, obj_normalizer, cls_normalizer, iou_loss, max_delta, new_coords,
                  objectness_smooth, focal_loss, eps, cm, has_cm, stats):
    # the body shared by the best-anchor and the iou_thresh assignments of process_batch
    base = a * entries
    cmult = cm[class_id] if has_cm else 1.0
    iou, giou, diou, ciou = _delta_box(tx, ty, tw, th, out, delta, b, base, j, i, anchors[2 * anchor_n],
                                       anchors[2 * anchor_n + 1], lw, lh, net_w, net_h, 2 - tw * th,
                                       iou_normalizer * cmult, iou_loss, max_delta, new_coords, stats)
    stats[S_TOTAL_BBOX] += 1
    stats[S_TOT_IOU] += iou
    stats[S_TOT_IOU_LOSS] += 1 - iou
    stats[S_TOT_GIOU] += giou
    stats[S_TOT_GIOU_LOSS] += 1 - giou
    stats[S_TOT_DIOU] += diou
    stats[S_TOT_CIOU] += ciou
    obj = base + 4
    stats[S_AVG_OBJ] += out[b, obj, j, i]
    if objectness_smooth:
        d = cmult * obj_normalizer * (1 - out[b, obj, j, i])
        if delta[b, obj, j, i] == 0:
            delta[b, obj, j, i] = d
    else:
        delta[b, obj, j, i] = cmult * obj_normalizer * (1 - out[b, obj, j, i])
    _delta_class(out, delta, b, base + 5, j, i, class_id, classes, focal_loss, eps, cm, has_cm, cls_normalizer,
                 stats, True)
    stats[S_COUNT] += 1
    stats[S_CLASS_COUNT] += 1
    if iou > 0.5:
        stats[S_RECALL] += 1
    if iou > 0.75:
        stats[S_RECALL75] += 1


@njit(cache=True, parallel=True, error_model="numpy")
def _yolo_delta_kernel(out, truths, ntruth, anchors, mask, classes, net_w, net_h, ignore_thresh, truth_thresh,
                       iou_thresh, iou_thresh_kind, iou_loss, iou_normalizer, obj_normalizer, cls_normalizer, eps,
                       max_delta, objectness_smooth, focal_loss, new_coords, cm, has_cm, delta, stats):
    n_batch, _, lh, lw = out.shape
    num = mask.shape[0]
    total = anchors.shape[0] // 2
    entries = 5 + classes
    for b in prange(n_batch):
        st = stats[b]
        nt = ntruth[b]
        # 1. every prediction: objectness (ignore rule), and truth_thresh positives
        for j in range(lh):
            for i in range(lw):
                for a in range(num):
                    base = a * entries
                    obj = base + 4
                    c0 = base + 5
                    an = mask[a]
                    px, py, pw, ph = _pred_box(out, b, base, j, i, anchors[2 * an], anchors[2 * an + 1], lw, lh,
                                               net_w, net_h, new_coords)
                    # compare_yolo_class: any class probability > 0.25 (the same for every truth), so the best
                    # IoU among the truths of a matching class is the best IoU, or none
                    class_match = False
                    for k in range(classes):
                        if out[b, c0 + k, j, i] > 0.25:
                            class_match = True
                            break
                    best_iou, best_t, any_truth = best_truth(px, py, pw, ph, truths, b, nt, classes)
                    best_match_iou = best_iou if class_match else 0.0
                    if any_truth and (np.isnan(out[b, obj, j, i]) or np.isinf(out[b, obj, j, i])):
                        out[b, obj, j, i] = 0
                    st[S_AVG_ANYOBJ] += out[b, obj, j, i]
                    delta[b, obj, j, i] = obj_normalizer * (0 - out[b, obj, j, i])
                    if best_match_iou > ignore_thresh:
                        if objectness_smooth:
                            d = obj_normalizer * (best_match_iou - out[b, obj, j, i])
                            if d > delta[b, obj, j, i]:
                                delta[b, obj, j, i] = d
                        else:
                            delta[b, obj, j, i] = 0
                    if best_iou > truth_thresh:
                        iou_mult = best_iou * best_iou
                        if objectness_smooth:
                            delta[b, obj, j, i] = obj_normalizer * (iou_mult - out[b, obj, j, i])
                        else:
                            delta[b, obj, j, i] = obj_normalizer * (1 - out[b, obj, j, i])
                        class_id = int(truths[b, best_t, 0])
                        _delta_class(out, delta, b, c0, j, i, class_id, classes, focal_loss, eps, cm, has_cm,
                                     cls_normalizer, st, False)
                        cmult = cm[class_id] if has_cm else 1.0
                        if objectness_smooth:
                            delta[b, c0 + class_id, j, i] = cmult * (iou_mult - out[b, c0 + class_id, j, i])
                        tw = truths[b, best_t, 3]
                        th = truths[b, best_t, 4]
                        _delta_box(truths[b, best_t, 1], truths[b, best_t, 2], tw, th, out, delta, b, base, j, i,
                                   anchors[2 * an], anchors[2 * an + 1], lw, lh, net_w, net_h, 2 - tw * th,
                                   iou_normalizer * cmult, iou_loss, max_delta, new_coords, st)
                        st[S_TOTAL_BBOX] += 1
        # 2. every truth: its best anchor over all anchors, plus the iou_thresh extras
        for t in range(nt):
            class_id, tx, ty, tw, th, i, j = read_truth(truths, b, t, classes, lw, lh)
            if class_id < 0:
                continue
            best_iou = 0.0
            best_n = 0
            for n in range(total):
                iou = box_iou(0.0, 0.0, anchors[2 * n] / net_w, anchors[2 * n + 1] / net_h, 0.0, 0.0, tw, th)
                if iou > best_iou:
                    best_iou = iou
                    best_n = n
            a = _mask_index(mask, best_n)
            if a >= 0:
                _assign_truth(out, delta, b, a, j, i, best_n, tx, ty, tw, th, class_id, classes, entries, anchors,
                              lw, lh, net_w, net_h, iou_normalizer, obj_normalizer, cls_normalizer, iou_loss,
                              max_delta, new_coords, objectness_smooth, focal_loss, eps, cm, has_cm, st)
            if iou_thresh < 1.0:
                for n in range(total):
                    a2 = _mask_index(mask, n)
                    if a2 >= 0 and n != best_n:
                        iou = box_iou_kind(0.0, 0.0, anchors[2 * n] / net_w, anchors[2 * n + 1] / net_h, 0.0, 0.0,
                                           tw, th, iou_thresh_kind)
                        if iou > iou_thresh:
                            _assign_truth(out, delta, b, a2, j, i, n, tx, ty, tw, th, class_id, classes, entries,
                                          anchors, lw, lh, net_w, net_h, iou_normalizer, obj_normalizer,
                                          cls_normalizer, iou_loss, max_delta, new_coords, objectness_smooth,
                                          focal_loss, eps, cm, has_cm, st)
        # 3. iou_thresh: average the accumulated box deltas over the classes with a positive delta
        if iou_thresh < 1.0:
            for j in range(lh):
                for i in range(lw):
                    for a in range(num):
                        base = a * entries
                        if delta[b, base + 4, j, i] != 0:
                            positive = 0
                            for k in range(classes):
                                if delta[b, base + 5 + k, j, i] > 0:
                                    positive += 1
                            if positive > 0:
                                for e in range(4):
                                    delta[b, base + e, j, i] /= positive


# ---------------------------------------------------------------------------------------------------------------
# Python API

@dataclass
class YoloOptions:
    """A [yolo] layer's training options (Darknet's parse_yolo defaults)."""
    classes: int
    mask: tuple[int, ...]
    anchors: tuple[float, ...]          # 2 * num values (w, h in network pixels)
    scale_x_y: float = 1.0
    new_coords: int = 0
    iou_loss: str = "mse"
    iou_normalizer: float = 0.75
    obj_normalizer: float = 1.0
    cls_normalizer: float = 1.0
    delta_normalizer: float = 1.0
    ignore_thresh: float = 0.5
    truth_thresh: float = 1.0
    iou_thresh: float = 1.0
    iou_thresh_kind: str = "iou"
    label_smooth_eps: float = 0.0
    max_delta: float = math.inf
    objectness_smooth: int = 0
    focal_loss: int = 0
    max_boxes: int = 200
    show_details: int = 1
    counters_per_class: tuple[int, ...] | None = None

    def __post_init__(self):
        # Darknet: any iou_loss other than mse/giou/diou/ciou is plain iou; iou_thresh_kind must be one of the four
        if self.iou_loss not in IOU_KINDS:
            self.iou_loss = "iou"
        if self.iou_thresh_kind not in ("iou", "giou", "diou", "ciou"):
            self.iou_thresh_kind = "iou"
        if len(self.anchors) % 2:
            raise ValueError("anchors must hold (w, h) pairs")
        if self.counters_per_class is not None and len(self.counters_per_class) != self.classes:
            raise ValueError(f"counters_per_class has {len(self.counters_per_class)} values, classes={self.classes}")

    @property
    def num(self) -> int:
        return len(self.anchors) // 2

    @property
    def class_multipliers(self) -> np.ndarray | None:
        """get_classes_multipliers: max(count) / count per class (counts < 1 taken as 1), capped at max_delta."""
        if self.counters_per_class is None:
            return None
        counts = np.maximum(np.asarray(self.counters_per_class, np.float64), 1.0)
        return np.minimum(counts.max() / counts, self.max_delta)

    @classmethod
    def from_layer(cls, layer) -> "YoloOptions":
        """From a darkprune Layer of type yolo (its resolved attrs, plus show_details, delta_normalizer,
        iou_thresh_kind and counters_per_class read from its section)."""
        if layer.type != "yolo":
            raise ValueError(f"layer {layer.index} is a [{layer.type}], not a [yolo]")
        a = layer.attrs
        s = layer.section
        cpc = s.get_list("counters_per_class", int)
        return cls(classes=a["classes"], mask=tuple(a["mask"]), anchors=tuple(a["anchors"]),
                   scale_x_y=a["scale_x_y"], new_coords=a["new_coords"], iou_loss=a["iou_loss"],
                   iou_normalizer=a["iou_normalizer"], obj_normalizer=a["obj_normalizer"],
                   cls_normalizer=a["cls_normalizer"], delta_normalizer=s.get_float("delta_normalizer", 1.0),
                   ignore_thresh=a["ignore_thresh"], truth_thresh=a["truth_thresh"], iou_thresh=a["iou_thresh"],
                   iou_thresh_kind=s.get_str("iou_thresh_kind", "iou"), label_smooth_eps=a["label_smooth_eps"],
                   max_delta=a["max_delta"], objectness_smooth=a["objectness_smooth"], focal_loss=a["focal_loss"],
                   max_boxes=a["max_boxes"], show_details=s.get_int("show_details", 1),
                   counters_per_class=tuple(cpc) if cpc else None)


def yolo_loss(x: np.ndarray, truths, options, net_w: int, net_h: int) -> YoloLossResult:
    """Darknet's [yolo] training loss for one head.

    x: the head's raw input (N, len(mask)*(5+classes), H, W), float32 (or float64 for gradient checks).
    truths: per image an array (k, 5) of class, cx, cy, w, h (normalised), or a padded (N, T, 5) array.
    options: a YoloOptions or the darkprune Layer of the [yolo]. net_w, net_h: the network input size.
    Returns grad (dL/dx, same shape and dtype as x), Darknet's cost, the activated output and statistics."""
    opts = options if isinstance(options, YoloOptions) else YoloOptions.from_layer(options)
    entries = 5 + opts.classes
    x, packed, counts = head_input(x, truths, len(opts.mask) * entries, opts.max_boxes, "yolo loss",
                                   f"{len(opts.mask)} anchors x (5 + {opts.classes})")
    if any(m < 0 or m >= opts.num for m in opts.mask):
        raise ValueError(f"yolo loss: mask {opts.mask} refers to anchors beyond the {opts.num} given")
    n = x.shape[0]
    out = np.empty_like(x)
    dt = x.dtype.type
    _activate(x.reshape(-1, x.shape[2] * x.shape[3]), len(opts.mask), entries, dt(opts.scale_x_y),
              dt(-0.5 * (opts.scale_x_y - 1)), bool(opts.new_coords), out.reshape(-1, x.shape[2] * x.shape[3]))
    delta = np.zeros_like(x)
    stats = np.zeros((n, N_STATS), np.float64)
    cm = opts.class_multipliers
    has_cm = cm is not None
    cm_arr = np.asarray(cm if has_cm else np.zeros(1), np.float64)
    _yolo_delta_kernel(out, packed, counts, np.asarray(opts.anchors, np.float64), np.asarray(opts.mask, np.int64),
                       opts.classes, float(net_w), float(net_h), float(opts.ignore_thresh),
                       float(opts.truth_thresh), float(opts.iou_thresh), IOU_KINDS[opts.iou_thresh_kind],
                       IOU_KINDS[opts.iou_loss], float(opts.iou_normalizer), float(opts.obj_normalizer),
                       float(opts.cls_normalizer), float(opts.label_smooth_eps), float(opts.max_delta),
                       bool(opts.objectness_smooth), bool(opts.focal_loss), bool(opts.new_coords), cm_arr, has_cm,
                       delta, stats)
    tot = stats.sum(axis=0)
    count = max(int(tot[S_COUNT]), 1)
    class_count = max(int(tot[S_CLASS_COUNT]), 1)
    flat = delta.reshape(-1)
    total_sq = float(np.dot(flat, flat))
    if opts.show_details == 0 or opts.iou_loss == "mse":
        cost = total_sq
    else:
        box = np.ascontiguousarray(delta.reshape(n, len(opts.mask), entries, -1)[:, :, :4]).reshape(-1)
        class_loss = opts.obj_normalizer * (total_sq - float(np.dot(box, box)))
        key = S_TOT_GIOU_LOSS if opts.iou_loss == "giou" else S_TOT_IOU_LOSS
        cost = opts.iou_normalizer * tot[key] / count + class_loss
    grad = np.multiply(delta, x.dtype.type(-opts.delta_normalizer))
    h, w = x.shape[2:]
    info = dict(avg_iou=tot[S_TOT_IOU] / count, avg_giou=tot[S_TOT_GIOU] / count, count=int(tot[S_COUNT]),
                class_count=int(tot[S_CLASS_COUNT]), recall=tot[S_RECALL] / count, recall75=tot[S_RECALL75] / count,
                avg_obj=tot[S_AVG_OBJ] / count, avg_cat=tot[S_AVG_CAT] / class_count,
                avg_anyobj=tot[S_AVG_ANYOBJ] / (w * h * len(opts.mask) * n),
                rewritten_bbox=int(tot[S_REWRITTEN]), total_bbox=int(tot[S_TOTAL_BBOX]))
    return YoloLossResult(grad, float(cost), out, delta, info)


# The [region] loss lives in region_loss.py; importable from here as before.
from .region_loss import RegionOptions, region_loss  # noqa: E402,F401
