"""What the [yolo] and [region] training losses share: the ground truth as Darknet reads it, the per-image
statistics, the result type, and the small numba pieces both kernels use."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .box_iou import box_iou

# per-image statistics, columns of the stats array
(S_TOT_IOU, S_TOT_GIOU, S_TOT_DIOU, S_TOT_CIOU, S_TOT_IOU_LOSS, S_TOT_GIOU_LOSS, S_COUNT, S_CLASS_COUNT, S_RECALL,
 S_RECALL75, S_AVG_OBJ, S_AVG_CAT, S_AVG_ANYOBJ, S_REWRITTEN, S_TOTAL_BBOX) = range(15)
N_STATS = 15


@dataclass
class YoloLossResult:
    grad: np.ndarray                # dL/dx for the head's raw input: -delta_normalizer * Darknet's delta
    cost: float                     # Darknet's *l.cost for this layer (see yolo_loss's / region_loss's doc)
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


def head_input(x, truths, channels: int, max_boxes: int, what: str, holds: str):
    """(x as a C-contiguous float array, packed truths, counts), checked: x (N, channels, H, W), one truth list per
    image. `holds` says what the channels are, for the error."""
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what}: input {x.shape} does not hold {holds}")
    packed, counts = pack_truths(truths, max_boxes, x.dtype)
    if packed.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: {packed.shape[0]} truth lists for a batch of {x.shape[0]}")
    return x, packed, counts


@njit(cache=True, error_model="numpy")
def logistic(v):
    return 1.0 / (1.0 + np.exp(-v))


@njit(cache=True, error_model="numpy")
def read_truth(truths, b, t, classes, lw, lh):
    """Row t of image b: (class, cx, cy, w, h, cell i, cell j); class -1 for a class outside 0..classes-1 (a row
    Darknet skips). cx = 1.0 exactly (Darknet's out-of-range cell W) goes to the last cell."""
    class_id = int(truths[b, t, 0])
    if class_id >= classes or class_id < 0:
        class_id = -1
    tx = truths[b, t, 1]
    ty = truths[b, t, 2]
    return class_id, tx, ty, truths[b, t, 3], truths[b, t, 4], min(int(tx * lw), lw - 1), min(int(ty * lh), lh - 1)


@njit(cache=True, error_model="numpy")
def best_truth(px, py, pw, ph, truths, b, nt, classes):
    """(best IoU of the prediction box with image b's truths, the row giving it (0 if none does better than 0),
    whether any row has a class in 0..classes-1: the rows Darknet reads)."""
    best_iou = 0.0
    best_t = 0
    valid = False
    for t in range(nt):
        class_id = int(truths[b, t, 0])
        if class_id >= classes or class_id < 0:
            continue
        valid = True
        iou = box_iou(px, py, pw, ph, truths[b, t, 1], truths[b, t, 2], truths[b, t, 3], truths[b, t, 4])
        if iou > best_iou:
            best_iou = iou
            best_t = t
    return best_iou, best_t, valid


@njit(cache=True, error_model="numpy")
def focal_class_deltas(out, delta, b, c0, j, i, class_id, classes, scale):
    """Darknet's focal-loss class deltas (alpha 0.5, gamma 2) of one prediction, times `scale`."""
    alpha = 0.5
    pt = out[b, c0 + class_id, j, i] + 0.000000000000001
    grad = -(1 - pt) * (2 * pt * np.log(pt) + pt - 1)
    for n in range(classes):
        t = 1.0 if n == class_id else 0.0
        delta[b, c0 + n, j, i] = scale * (t - out[b, c0 + n, j, i]) * alpha * grad
