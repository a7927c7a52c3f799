"""Darknet's box arithmetic for the training losses (AlexeyAB's src/box.c): IoU, GIoU, DIoU and CIoU of two
(cx, cy, w, h) boxes, and dx_box_iou, the derivatives Darknet uses for its iou/giou/diou/ciou box deltas (see
yolo_loss's module doc for where they are not the true gradient)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit

IOU_KINDS = {"mse": 0, "iou": 1, "giou": 2, "diou": 3, "ciou": 4}
MSE, IOU, GIOU, DIOU, CIOU = 0, 1, 2, 3, 4


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
def _distance_parts(ax, ay, aw, ah, bx, by, bw, bh):
    """(IoU, squared diagonal of the enclosing box, squared distance of the centres): DIoU's and CIoU's parts."""
    cw, ch = _enclosing(ax, ay, aw, ah, bx, by, bw, bh)
    return (box_iou(ax, ay, aw, ah, bx, by, bw, bh), cw * cw + ch * ch,
            (ax - bx) * (ax - bx) + (ay - by) * (ay - by))


@njit(cache=True, error_model="numpy")
def box_diou(ax, ay, aw, ah, bx, by, bw, bh):
    """Darknet's box_diou value: IoU - (d^2/c^2)^0.6 (the 0.6 power is Darknet's; its gradient ignores it)."""
    iou, c, d = _distance_parts(ax, ay, aw, ah, bx, by, bw, bh)
    if c == 0:
        return iou
    return iou - (d / c) ** 0.6


@njit(cache=True, error_model="numpy")
def box_ciou(ax, ay, aw, ah, bx, by, bw, bh):
    iou, c, u = _distance_parts(ax, ay, aw, ah, bx, by, bw, bh)
    if c == 0:
        return iou
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

    # Darknet adds the GIoU (DIoU) term when the enclosing box is not empty and, with no overlap, replaces the IoU
    # part by it (whatever the enclosing box: a division by zero gives inf/nan, as in C)
    no_overlap = Iw <= 0 or Ih <= 0
    if kind == GIOU and (no_overlap or giou_C > 0):
        g_t = ((giou_C * dU_t) - (U * dC_t)) / (giou_C * giou_C)
        g_b = ((giou_C * dU_b) - (U * dC_b)) / (giou_C * giou_C)
        g_l = ((giou_C * dU_l) - (U * dC_l)) / (giou_C * giou_C)
        g_r = ((giou_C * dU_r) - (U * dC_r)) / (giou_C * giou_C)
        if no_overlap:
            p_dt, p_db, p_dl, p_dr = g_t, g_b, g_l, g_r
        else:
            p_dt, p_db, p_dl, p_dr = p_dt + g_t, p_db + g_b, p_dl + g_l, p_dr + g_r

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
        if no_overlap or C > 0:
            d_x = (2 * (tx - px) * C - (2 * Cw * dCw_dx) * S) / (C * C)
            d_y = (2 * (ty - py) * C - (2 * Ch * dCh_dy) * S) / (C * C)
            d_w = (2 * Cw * dCw_dw) * S / (C * C) + ar_dw
            d_h = (2 * Ch * dCh_dh) * S / (C * C) + ar_dh
            if no_overlap:
                p_dx, p_dy, p_dw, p_dh = d_x, d_y, d_w, d_h
            else:
                p_dx, p_dy, p_dw, p_dh = p_dx + d_x, p_dy + d_y, p_dw + d_w, p_dh + d_h
    return p_dx, p_dy, p_dw, p_dh
