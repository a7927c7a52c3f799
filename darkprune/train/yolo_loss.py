"""Darknet's `[yolo]` training loss, as AlexeyAB's forward_yolo_layer / process_batch (src/yolo_layer.c) and
dx_box_iou (src/box.c) compute it, and the `[region]` (YOLOv2) loss of forward_region_layer (src/region_layer.c).

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

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

IOU_KINDS = {"mse": 0, "iou": 1, "giou": 2, "diou": 3, "ciou": 4}
MSE, IOU, GIOU, DIOU, CIOU = 0, 1, 2, 3, 4

# per-image statistics, columns of the stats array
(S_TOT_IOU, S_TOT_GIOU, S_TOT_DIOU, S_TOT_CIOU, S_TOT_IOU_LOSS, S_TOT_GIOU_LOSS, S_COUNT, S_CLASS_COUNT, S_RECALL,
 S_RECALL75, S_AVG_OBJ, S_AVG_CAT, S_AVG_ANYOBJ, S_REWRITTEN, S_TOTAL_BBOX) = range(15)
N_STATS = 15


# ---------------------------------------------------------------------------------------------------------------
# box.c

@njit(cache=True, error_model="numpy")
def _overlap(x1, w1, x2, w2):
    l1 = x1 - w1 / 2
    l2 = x2 - w2 / 2
    left = l1 if l1 > l2 else l2
    r1 = x1 + w1 / 2
    r2 = x2 + w2 / 2
    right = r1 if r1 < r2 else r2
    return right - left


@njit(cache=True, error_model="numpy")
def box_iou(ax, ay, aw, ah, bx, by, bw, bh):
    """Darknet's box_iou of two (cx, cy, w, h) boxes (0 when they do not overlap)."""
    w = _overlap(ax, aw, bx, bw)
    h = _overlap(ay, ah, by, bh)
    inter = 0.0 if (w < 0 or h < 0) else w * h
    union = aw * ah + bw * bh - inter
    if inter == 0 or union == 0:
        return 0.0
    return inter / union


@njit(cache=True, error_model="numpy")
def _enclosing(ax, ay, aw, ah, bx, by, bw, bh):
    top = min(ay - ah / 2, by - bh / 2)
    bot = max(ay + ah / 2, by + bh / 2)
    left = min(ax - aw / 2, bx - bw / 2)
    right = max(ax + aw / 2, bx + bw / 2)
    return right - left, bot - top


@njit(cache=True, error_model="numpy")
def box_giou(ax, ay, aw, ah, bx, by, bw, bh):
    cw, ch = _enclosing(ax, ay, aw, ah, bx, by, bw, bh)
    c = cw * ch
    iou = box_iou(ax, ay, aw, ah, bx, by, bw, bh)
    if c == 0:
        return iou
    w = _overlap(ax, aw, bx, bw)
    h = _overlap(ay, ah, by, bh)
    inter = 0.0 if (w < 0 or h < 0) else w * h
    u = aw * ah + bw * bh - inter
    return iou - (c - u) / c


@njit(cache=True, error_model="numpy")
def box_diou(ax, ay, aw, ah, bx, by, bw, bh):
    """Darknet's box_diou value: IoU - (d^2/c^2)^0.6 (the 0.6 power is Darknet's; its gradient ignores it)."""
    cw, ch = _enclosing(ax, ay, aw, ah, bx, by, bw, bh)
    c = cw * cw + ch * ch
    iou = box_iou(ax, ay, aw, ah, bx, by, bw, bh)
    if c == 0:
        return iou
    d = (ax - bx) * (ax - bx) + (ay - by) * (ay - by)
    return iou - (d / c) ** 0.6


@njit(cache=True, error_model="numpy")
def box_ciou(ax, ay, aw, ah, bx, by, bw, bh):
    cw, ch = _enclosing(ax, ay, aw, ah, bx, by, bw, bh)
    c = cw * cw + ch * ch
    iou = box_iou(ax, ay, aw, ah, bx, by, bw, bh)
    if c == 0:
        return iou
    u = (ax - bx) * (ax - bx) + (ay - by) * (ay - by)
    d = u / c
    ar = math.atan(bw / bh) - math.atan(aw / ah)
    ar_loss = 4 / (math.pi * math.pi) * ar * ar
    alpha = ar_loss / (1 - iou + ar_loss + 0.000001)
    return iou - (d + alpha * ar_loss)


@njit(cache=True, error_model="numpy")
def box_iou_kind(ax, ay, aw, ah, bx, by, bw, bh, kind):
    if kind == GIOU:
        return box_giou(ax, ay, aw, ah, bx, by, bw, bh)
    if kind == DIOU:
        return box_diou(ax, ay, aw, ah, bx, by, bw, bh)
    if kind == CIOU:
        return box_ciou(ax, ay, aw, ah, bx, by, bw, bh)
    return box_iou(ax, ay, aw, ah, bx, by, bw, bh)


@njit(cache=True, error_model="numpy")
def dx_box_iou(px, py, pw, ph, tx, ty, tw, th, kind):
    """Darknet's dx_box_iou: its (dx, dy, dw, dh) for prediction (px, py, pw, ph) vs truth, kind iou/giou/diou/ciou.
    These are the *increase* directions (derivatives of the IoU-like score, as Darknet uses them for its deltas)."""
    p_top = py - ph / 2
    p_bot = py + ph / 2
    p_left = px - pw / 2
    p_right = px + pw / 2
    pred_t = min(p_top, p_bot)
    pred_b = max(p_top, p_bot)
    pred_l = min(p_left, p_right)
    pred_r = max(p_left, p_right)
    t_top = ty - th / 2
    t_bot = ty + th / 2
    t_left = tx - tw / 2
    t_right = tx + tw / 2

    X = (pred_b - pred_t) * (pred_r - pred_l)
    Xhat = (t_bot - t_top) * (t_right - t_left)
    Ih = min(pred_b, t_bot) - max(pred_t, t_top)
    Iw = min(pred_r, t_right) - max(pred_l, t_left)
    I = Iw * Ih
    U = X + Xhat - I
    S = (px - tx) * (px - tx) + (py - ty) * (py - ty)
    giou_Cw = max(pred_r, t_right) - min(pred_l, t_left)
    giou_Ch = max(pred_b, t_bot) - min(pred_t, t_top)
    giou_C = giou_Cw * giou_Ch

    dX_t = -1 * (pred_r - pred_l)
    dX_b = pred_r - pred_l
    dX_l = -1 * (pred_b - pred_t)
    dX_r = pred_b - pred_t

    dI_t = (-1 * Iw) if pred_t > t_top else 0.0
    dI_b = Iw if pred_b < t_bot else 0.0
    dI_l = (-1 * Ih) if pred_l > t_left else 0.0
    dI_r = Ih if pred_r < t_right else 0.0
    dU_t = dX_t - dI_t
    dU_b = dX_b - dI_b
    dU_l = dX_l - dI_l
    dU_r = dX_r - dI_r
    dC_t = (-1 * giou_Cw) if pred_t < t_top else 0.0
    dC_b = giou_Cw if pred_b > t_bot else 0.0
    dC_l = (-1 * giou_Ch) if pred_l < t_left else 0.0
    dC_r = giou_Ch if pred_r > t_right else 0.0

    p_dt = 0.0
    p_db = 0.0
    p_dl = 0.0
    p_dr = 0.0
    if U > 0:
        p_dt = ((U * dI_t) - (I * dU_t)) / (U * U)
        p_db = ((U * dI_b) - (I * dU_b)) / (U * U)
        p_dl = ((U * dI_l) - (I * dU_l)) / (U * U)
        p_dr = ((U * dI_r) - (I * dU_r)) / (U * U)
    # Darknet's corner-selection lines, in its order (the second of each pair reads the already-updated first)
    p_dt = p_dt if p_top < p_bot else p_db
    p_db = p_db if p_top < p_bot else p_dt
    p_dl = p_dl if p_left < p_right else p_dr
    p_dr = p_dr if p_left < p_right else p_dl

    if kind == GIOU:
        if giou_C > 0:
            p_dt += ((giou_C * dU_t) - (U * dC_t)) / (giou_C * giou_C)
            p_db += ((giou_C * dU_b) - (U * dC_b)) / (giou_C * giou_C)
            p_dl += ((giou_C * dU_l) - (U * dC_l)) / (giou_C * giou_C)
            p_dr += ((giou_C * dU_r) - (U * dC_r)) / (giou_C * giou_C)
        if Iw <= 0 or Ih <= 0:
            p_dt = ((giou_C * dU_t) - (U * dC_t)) / (giou_C * giou_C)
            p_db = ((giou_C * dU_b) - (U * dC_b)) / (giou_C * giou_C)
            p_dl = ((giou_C * dU_l) - (U * dC_l)) / (giou_C * giou_C)
            p_dr = ((giou_C * dU_r) - (U * dC_r)) / (giou_C * giou_C)

    Ct = min(py - ph / 2, ty - th / 2)
    Cb = max(py + ph / 2, ty + th / 2)
    Cl = min(px - pw / 2, tx - tw / 2)
    Cr = max(px + pw / 2, tx + tw / 2)
    Cw = Cr - Cl
    Ch = Cb - Ct
    C = Cw * Cw + Ch * Ch

    dCt_dy = 1.0 if pred_t < t_top else 0.0
    dCt_dh = -0.5 if pred_t < t_top else 0.0
    dCb_dy = 1.0 if pred_b > t_bot else 0.0
    dCb_dh = 0.5 if pred_b > t_bot else 0.0
    dCl_dx = 1.0 if pred_l < t_left else 0.0
    dCl_dw = -0.5 if pred_l < t_left else 0.0
    dCr_dx = 1.0 if pred_r > t_right else 0.0
    dCr_dw = 0.5 if pred_r > t_right else 0.0
    dCw_dx = dCr_dx - dCl_dx
    dCw_dw = dCr_dw - dCl_dw
    dCh_dy = dCb_dy - dCt_dy
    dCh_dh = dCb_dh - dCt_dh
    # (Darknet's dCw_dy, dCw_dh, dCh_dx, dCh_dw are all 0)

    p_dx = p_dl + p_dr
    p_dy = p_dt + p_db
    p_dw = p_dr - p_dl
    p_dh = p_db - p_dt

    if kind == DIOU or kind == CIOU:
        ar_dw = 0.0
        ar_dh = 0.0
        if kind == CIOU:
            ar = math.atan(tw / th) - math.atan(pw / ph)
            ar_loss = 4 / (math.pi * math.pi) * ar * ar
            alpha = ar_loss / (1 - I / U + ar_loss + 0.000001)
            ar_dw = alpha * 8 / (math.pi * math.pi) * ar * ph
            ar_dh = alpha * -8 / (math.pi * math.pi) * ar * pw
        if C > 0:
            p_dx += (2 * (tx - px) * C - (2 * Cw * dCw_dx) * S) / (C * C)
            p_dy += (2 * (ty - py) * C - (2 * Ch * dCh_dy) * S) / (C * C)
            p_dw += (2 * Cw * dCw_dw) * S / (C * C) + ar_dw
            p_dh += (2 * Ch * dCh_dh) * S / (C * C) + ar_dh
        if Iw <= 0 or Ih <= 0:
            p_dx = (2 * (tx - px) * C - (2 * Cw * dCw_dx) * S) / (C * C)
            p_dy = (2 * (ty - py) * C - (2 * Ch * dCh_dy) * S) / (C * C)
            p_dw = (2 * Cw * dCw_dw) * S / (C * C) + ar_dw
            p_dh = (2 * Ch * dCh_dh) * S / (C * C) + ar_dh
    return p_dx, p_dy, p_dw, p_dh


# ---------------------------------------------------------------------------------------------------------------
# yolo_layer.c

@njit(cache=True, error_model="numpy")
def _logistic(v):
    return 1.0 / (1.0 + np.exp(-v))


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
        alpha = 0.5
        pt = out[b, c0 + class_id, j, i] + 0.000000000000001
        grad = -(1 - pt) * (2 * pt * np.log(pt) + pt - 1)
        for n in range(classes):
            t = 1.0 if n == class_id else 0.0
            delta[b, c0 + n, j, i] = (t - out[b, c0 + n, j, i]) * alpha * grad
            if n == class_id and count_avg:
                stats[S_AVG_CAT] += out[b, c0 + n, j, i]
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
                    best_match_iou = 0.0
                    best_iou = 0.0
                    best_t = 0
                    # compare_yolo_class: any class probability > 0.25 (the same for every truth)
                    class_match = False
                    for k in range(classes):
                        if out[b, c0 + k, j, i] > 0.25:
                            class_match = True
                            break
                    for t in range(nt):
                        class_id = int(truths[b, t, 0])
                        if class_id >= classes or class_id < 0:
                            continue
                        o = out[b, obj, j, i]
                        if np.isnan(o) or np.isinf(o):
                            out[b, obj, j, i] = 0
                        iou = box_iou(px, py, pw, ph, truths[b, t, 1], truths[b, t, 2], truths[b, t, 3],
                                      truths[b, t, 4])
                        if iou > best_match_iou and class_match:
                            best_match_iou = iou
                        if iou > best_iou:
                            best_iou = iou
                            best_t = t
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
            class_id = int(truths[b, t, 0])
            if class_id >= classes or class_id < 0:
                continue
            tx = truths[b, t, 1]
            ty = truths[b, t, 2]
            tw = truths[b, t, 3]
            th = truths[b, t, 4]
            i = int(tx * lw)
            j = int(ty * lh)
            if i >= lw:
                i = lw - 1
            if j >= lh:
                j = lh - 1
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


@dataclass
class YoloLossResult:
    grad: np.ndarray                # dL/dx for the head's raw input: -delta_normalizer * Darknet's delta
    cost: float                     # Darknet's *l.cost for this layer (see the module doc)
    output: np.ndarray              # the activated output the deltas were computed from
    delta: np.ndarray               # Darknet's l.delta (a negative gradient, before delta_normalizer)
    stats: dict = field(default_factory=dict)   # avg_iou, count, recall, recall75, avg_obj, avg_anyobj, avg_cat...


def pack_truths(truths, max_boxes: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Per-image rows (class, cx, cy, w, h) -> a padded (N, T, 5) array and the count of rows Darknet reads per
    image: up to the first row with cx == 0, at most max_boxes."""
    if isinstance(truths, np.ndarray) and truths.ndim == 3:
        rows = [truths[b] for b in range(truths.shape[0])]
    else:
        rows = [np.asarray(t, np.float64).reshape(-1, 5) for t in truths]
    n = len(rows)
    width = max([1] + [min(len(r), max_boxes) for r in rows])
    packed = np.zeros((n, width, 5), dtype)
    counts = np.zeros(n, np.int64)
    for b, r in enumerate(rows):
        r = np.asarray(r, np.float64)[:max_boxes]
        k = len(r)
        zero = np.flatnonzero(r[:, 1] == 0) if k else []
        if len(zero):
            k = int(zero[0])
        packed[b, :k] = r[:k]
        counts[b] = k
    return packed, counts


def yolo_loss(x: np.ndarray, truths, options, net_w: int, net_h: int) -> YoloLossResult:
    """Darknet's [yolo] training loss for one head.

    x: the head's raw input (N, len(mask)*(5+classes), H, W), float32 (or float64 for gradient checks).
    truths: per image an array (k, 5) of class, cx, cy, w, h (normalised), or a padded (N, T, 5) array.
    options: a YoloOptions or the darkprune Layer of the [yolo]. net_w, net_h: the network input size.
    Returns grad (dL/dx, same shape and dtype as x), Darknet's cost, the activated output and statistics."""
    opts = options if isinstance(options, YoloOptions) else YoloOptions.from_layer(options)
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    entries = 5 + opts.classes
    if x.ndim != 4 or x.shape[1] != len(opts.mask) * entries:
        raise ValueError(f"yolo loss: input {x.shape} does not hold {len(opts.mask)} anchors x (5 + {opts.classes})")
    if any(m < 0 or m >= opts.num for m in opts.mask):
        raise ValueError(f"yolo loss: mask {opts.mask} refers to anchors beyond the {opts.num} given")
    n = x.shape[0]
    packed, counts = pack_truths(truths, opts.max_boxes, x.dtype)
    if packed.shape[0] != n:
        raise ValueError(f"yolo loss: {packed.shape[0]} truth lists for a batch of {n}")
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


# ---------------------------------------------------------------------------------------------------------------
# [region] (YOLOv2), AlexeyAB's forward_region_layer
#
# Same input layout as the engine's region head (per anchor a the channels a*(5+C) + (x, y, w, h, obj, classes)).
# Darknet's region deltas are chain-ruled through the logistic for x, y and objectness (its delta_region_box and the
# objectness deltas multiply by p(1-p)), and classes get class_scale*(onehot - p) with p the softmax output (or the
# raw value when softmax=0), so every delta is the true negative gradient of a defined loss:
#   x, y: coord_scale*(t - sigmoid(z))^2 / 2;  w, h: coord_scale*(t - z)^2 / 2 (t = log(w*W/anchor_w), anchors in
#   grid cells);  objectness: object_scale*(1 - p)^2/2 at assigned cells, noobject_scale*p^2/2 at the others unless
#   their best IoU > thresh;  classes: class_scale*cross-entropy of the softmax (softmax=1) or class_scale*(t-z)^2/2.
# rescore=1 (target = the prediction's IoU, a constant to Darknet) and the first-12800-images prior matching (a
# 0.01-scaled pull of every box toward its anchor at the cell centre, depending on `seen`) are reproduced too.
# The best anchor of a truth is chosen by the IoU of the *predicted* box shape (anchor shapes with bias_match=1).
# Not supported: softmax_tree/map (YOLO9000), coords != 4. Darknet's cost: sum(delta^2).

@njit(cache=True, error_model="numpy")
def _region_box(raw, b, base, j, i, anchors, n, lw, lh):
    px = (i + _logistic(raw[b, base + 0, j, i])) / lw
    py = (j + _logistic(raw[b, base + 1, j, i])) / lh
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
    sx = _logistic(raw[b, base + 0, j, i])
    sy = _logistic(raw[b, base + 1, j, i])
    delta[b, base + 0, j, i] = scale * (t_x - sx) * ((1 - sx) * sx)
    delta[b, base + 1, j, i] = scale * (t_y - sy) * ((1 - sy) * sy)
    delta[b, base + 2, j, i] = scale * (t_w - raw[b, base + 2, j, i])
    delta[b, base + 3, j, i] = scale * (t_h - raw[b, base + 3, j, i])
    return iou


@njit(cache=True, error_model="numpy")
def _delta_region_class(out, delta, b, c0, j, i, class_id, classes, scale, focal_loss, stats):
    if focal_loss:
        alpha = 0.5
        pt = out[b, c0 + class_id, j, i] + 0.000000000000001
        grad = -(1 - pt) * (2 * pt * np.log(pt) + pt - 1)
        for n in range(classes):
            t = 1.0 if n == class_id else 0.0
            delta[b, c0 + n, j, i] = scale * (t - out[b, c0 + n, j, i]) * alpha * grad
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
                    best_iou = 0.0
                    best_class = -1
                    for t in range(nt):
                        class_id = int(truths[b, t, 0])
                        if class_id >= classes or class_id < 0:
                            continue
                        iou = box_iou(px, py, pw, ph, truths[b, t, 1], truths[b, t, 2], truths[b, t, 3],
                                      truths[b, t, 4])
                        if iou > best_iou:
                            best_class = class_id
                            best_iou = iou
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
            class_id = int(truths[b, t, 0])
            if class_id >= classes or class_id < 0:
                continue
            tx = truths[b, t, 1]
            ty = truths[b, t, 2]
            tw = truths[b, t, 3]
            th = truths[b, t, 4]
            i = min(int(tx * lw), lw - 1)
            j = min(int(ty * lh), lh - 1)
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


@njit(cache=True, parallel=True, error_model="numpy")
def _region_activate(x, num, classes, do_softmax, out):
    n_batch, _, h, w = x.shape
    size = 5 + classes
    for bn in prange(n_batch * num):
        b = bn // num
        base = (bn % num) * size
        for y in range(h):
            for xx in range(w):
                for e in range(size):
                    out[b, base + e, y, xx] = x[b, base + e, y, xx]
                out[b, base + 4, y, xx] = _logistic(x[b, base + 4, y, xx])
                if do_softmax and classes > 0:
                    c0 = base + 5
                    largest = x[b, c0, y, xx]
                    for k in range(1, classes):
                        if x[b, c0 + k, y, xx] > largest:
                            largest = x[b, c0 + k, y, xx]
                    total = 0.0
                    for k in range(classes):
                        e_k = np.exp(x[b, c0 + k, y, xx] - largest)
                        out[b, c0 + k, y, xx] = e_k
                        total += e_k
                    for k in range(classes):
                        out[b, c0 + k, y, xx] = out[b, c0 + k, y, xx] / total


def region_loss(x: np.ndarray, truths, options, seen: int) -> YoloLossResult:
    """Darknet's [region] training loss for one head. x: raw input (N, num*(5+classes), H, W); truths as for
    yolo_loss; options: RegionOptions or the darkprune Layer; seen: images trained on before this batch (Darknet's
    *net.seen, already counting this mini-batch): below 12800 the prior-matching warm-up applies.
    The returned `output` holds the objectness logistic and class softmax (x, y, w, h stay raw, as Darknet's)."""
    opts = options if isinstance(options, RegionOptions) else RegionOptions.from_layer(options)
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    size = 5 + opts.classes
    if x.ndim != 4 or x.shape[1] != opts.num * size:
        raise ValueError(f"region loss: input {x.shape} does not hold {opts.num} anchors x (5 + {opts.classes})")
    n = x.shape[0]
    packed, counts = pack_truths(truths, opts.max_boxes, x.dtype)
    if packed.shape[0] != n:
        raise ValueError(f"region loss: {packed.shape[0]} truth lists for a batch of {n}")
    out = np.empty_like(x)
    _region_activate(x, opts.num, opts.classes, bool(opts.softmax), out)
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
