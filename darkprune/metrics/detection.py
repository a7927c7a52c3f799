"""Detection mAP exactly as AlexeyAB's ``darknet detector map`` (``validate_detector_map`` in src/detector.c).

Public API
----------
``detection_map(detections, truths, classes, names=None, iou_thresh=0.5, thresh=0.25, points=0) -> dict``
    ``detections``: per image the NMSed detections (``darkprune.engine.decode.Detections`` or a list of
    ``Detection``), decoded the way ``detector map`` does it: ``thresh=0.005``, NMS 0.45 (``decode_image(...,
    thresh=0.005, nms_thresh=0.45)``). ``truths``: per image an array (k, 5) of ``class, cx, cy, w, h`` (normalised;
    ``Dataset.boxes``).
``DetectionEvaluator(classes, names=None, iou_thresh=0.5, thresh=0.25)``
    The same, streaming: ``add(detections, truths)`` per image (keeps only the (detection, class) pairs, not the
    images), then ``result(points=0)``; ``result`` may be called for several ``points`` settings.
``COCO_IOU_THRESHOLDS``  0.50, 0.55, ..., 0.95.

The result dict: ``map50`` (Darknet's mAP at ``iou_thresh``), ``map50_95`` (the same mAP averaged over IoU
0.50:0.05:0.95), ``points``, ``iou_thresh``, ``per_class`` [``{"class", "name", "ap", "ap50_95", "tp", "fp",
"truths"}``], ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``, ``avg_iou`` (at confidence ``thresh``, IoU
``iou_thresh``, as Darknet prints them), ``thresh``, ``images``, ``detections`` ((detection, class) pairs with
probability > 0), ``truths``, ``map_per_iou`` {"0.50": ..., ...}. Fractions are 0..1.

Darknet's rules, kept exactly:
- every (detection, class) pair with probability > 0 is one ranked prediction;
- a pair matches the truth of its class with the highest IoU, if that IoU > ``iou_thresh`` (first truth on ties);
  over the global ranking by probability (ties: image order, then detection order, then class), a pair is a TP if its
  truth was not matched by a higher-ranked pair, otherwise a FP;
- ``points=0``: area under the monotone precision envelope at every unique recall (its exact loop);
  ``points=11`` (VOC2007) / ``101`` (COCO): mean of the best precision at recall >= each of the points
  ``point * (1 / (points - 1))`` (the -Ofast build's arithmetic);
- mAP is the mean over *all* ``classes`` (a class without ground truth scores AP 0);
- TP/FP at ``thresh`` are counted per image in detection order: a pair above ``thresh`` is a TP if it matched a truth
  that no earlier pair of that image (at any probability) matched. ``avg_iou`` = sum of those TPs' IoU / (TP + FP).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from numba import njit

from darkprune.engine.decode import box_iou
from darkprune.errors import DarkpruneError

__all__ = ["COCO_IOU_THRESHOLDS", "DetectionEvaluator", "detection_map", "iou_matrix", "average_precision"]

COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
_F32 = np.float32


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (k, 4), cx cy w h, in Darknet's float32 arithmetic."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    two = _F32(2)
    ax, ay, aw, ah = (a[:, i:i + 1] for i in range(4))
    bx, by, bw, bh = (b[None, :, i] for i in range(4))
    w = np.minimum(ax + aw / two, bx + bw / two) - np.maximum(ax - aw / two, bx - bw / two)
    h = np.minimum(ay + ah / two, by + bh / two) - np.maximum(ay - ah / two, by - bh / two)
    inter = np.where((w < 0) | (h < 0), _F32(0), w * h)
    union = aw * ah + bw * bh - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((inter == 0) | (union == 0), _F32(0), iou).astype(np.float32)


@njit(cache=True, nogil=True)
def _ap_area(recall, precision):
    """Darknet's -points 0 loop: walk the ranks backwards under the running precision maximum."""
    n = len(recall)
    if n == 0:
        return 0.0
    last_recall = recall[n - 1]
    last_precision = precision[n - 1]
    ap = 0.0
    for rank in range(n - 2, -1, -1):
        delta = last_recall - recall[rank]
        last_recall = recall[rank]
        if precision[rank] > last_precision:
            last_precision = precision[rank]
        ap += delta * last_precision
    ap += last_recall * last_precision  # the area between recall 0 and the first rank
    return ap


@njit(cache=True, nogil=True)
def _ap_points(recall, precision, points):
    """Darknet's -points N loop: best precision at recall >= each of N evenly spaced recalls, averaged.

    The recall points are ``point * (1 / (N - 1))``, not ``point / (N - 1)``: Darknet's Makefile builds with -Ofast,
    whose reciprocal math hoists the division out of the loop, so 3 * 0.1 = 0.30000000000000004 and a class whose
    recall reaches exactly 3/10 does not count at that point. This is what the released binary prints (checked with a
    real -Ofast build on coco128: 11-point mAP equal to 4 decimals, against 0.12 points off with the division)."""
    ap = 0.0
    step = 1.0 / (points - 1)
    for point in range(points):
        cur_recall = point * step
        cur_precision = 0.0
        for rank in range(len(recall)):
            if recall[rank] >= cur_recall and precision[rank] > cur_precision:
                cur_precision = precision[rank]
        ap += cur_precision
    return ap / points


def average_precision(recall: np.ndarray, precision: np.ndarray, points: int = 0) -> float:
    """AP of one class's PR curve (ranks in order of decreasing probability), Darknet's way for ``points``."""
    recall = np.ascontiguousarray(recall, np.float64)
    precision = np.ascontiguousarray(precision, np.float64)
    if points == 0:
        return float(_ap_area(recall, precision))
    if points < 2:
        raise DarkpruneError(f"points must be 0 (area under the curve) or at least 2, not {points}")
    return float(_ap_points(recall, precision, int(points)))


def _as_arrays(detections: Any, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (n, 4), probs (n, classes)) from Detections, a list of Detection, or a (boxes, probs) pair."""
    if hasattr(detections, "boxes") and hasattr(detections, "probs"):
        boxes, probs = detections.boxes, detections.probs
    elif isinstance(detections, tuple) and len(detections) == 2 and isinstance(detections[0], np.ndarray):
        boxes, probs = detections
    else:
        items = list(detections)
        if not items:
            return np.zeros((0, 4), np.float32), np.zeros((0, classes), np.float32)
        boxes = np.array([tuple(d.bbox) for d in items], np.float32)
        probs = np.stack([np.asarray(d.prob, np.float32) for d in items])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 2 or probs.shape[0] != len(boxes):
        raise DarkpruneError("detections: boxes and class probabilities do not line up")
    if probs.shape[1] != classes:
        raise DarkpruneError(f"detections have {probs.shape[1]} classes, the dataset {classes}")
    return boxes, probs


def _first_occurrences(index: np.ndarray) -> np.ndarray:
    """True where ``index[i] >= 0`` and no earlier position holds the same value."""
    first = np.zeros(len(index), bool)
    positions = np.nonzero(index >= 0)[0]
    if len(positions):
        _, where = np.unique(index[positions], return_index=True)
        first[positions[where]] = True
    return first


@njit(cache=True, nogil=True)
def _match_pairs(boxes, probs, truth_boxes, truth_class, thresholds):
    """Each (detection, class) pair with a nonzero probability, in Darknet's order (detections, then classes): its
    class and probability, for each IoU threshold the first truth of its class with the largest IoU above it (-1:
    none), and that IoU at the first threshold (0: none). IoU as box.c computes it (float32), as iou_matrix."""
    n, classes = probs.shape
    k = truth_boxes.shape[0]
    count = 0
    for i in range(n):
        for c in range(classes):
            if probs[i, c] > 0:
                count += 1
    pair_class = np.empty(count, np.int64)
    pair_prob = np.empty(count, np.float32)
    best = np.full((len(thresholds), count), -1, np.int64)
    best_iou = np.zeros(count, np.float32)
    ious = np.empty(k, np.float32)
    q = 0
    for i in range(n):
        ax, ay, aw, ah = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        have_ious = False
        for c in range(classes):
            p = probs[i, c]
            if not p > 0:
                continue
            if not have_ious:
                for j in range(k):
                    ious[j] = box_iou(ax, ay, aw, ah, truth_boxes[j, 0], truth_boxes[j, 1], truth_boxes[j, 2],
                                      truth_boxes[j, 3])
                have_ious = True
            pair_class[q] = c
            pair_prob[q] = p
            for t in range(len(thresholds)):
                top = np.float32(-1.0)
                for j in range(k):
                    if truth_class[j] == c and ious[j] > thresholds[t] and ious[j] > top:
                        top = ious[j]
                        best[t, q] = j
                if t == 0 and best[0, q] >= 0:
                    best_iou[q] = top
            q += 1
    return pair_class, pair_prob, best, best_iou


class DetectionEvaluator:
    """Streaming ``darknet detector map``: ``add`` each image's detections and truths, then ``result(points)``."""

    def __init__(self, classes: int, names: Sequence[str] | None = None, iou_thresh: float = 0.5,
                 thresh: float = 0.25, iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS):
        if classes <= 0:
            raise DarkpruneError(f"classes must be positive, not {classes}")
        self.classes = int(classes)
        self.names = list(names) if names is not None else [str(i) for i in range(classes)]
        if len(self.names) < self.classes:
            self.names += [str(i) for i in range(len(self.names), self.classes)]
        self.iou_thresh = float(iou_thresh)
        self.thresh = float(thresh)
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        self._thresholds = list(dict.fromkeys([self.iou_thresh] + self.iou_thresholds))  # primary first
        self.images = 0
        self.truth_counts = np.zeros(self.classes, np.int64)
        self.unique_truths = 0
        self.tp_per_class = np.zeros(self.classes, np.int64)
        self.fp_per_class = np.zeros(self.classes, np.int64)
        self.iou_sum_per_class = np.zeros(self.classes, np.float64)
        self._probs: list[np.ndarray] = []
        self._classes: list[np.ndarray] = []
        self._truth_index: list[np.ndarray] = []

    def add(self, detections: Any, truths: np.ndarray | Sequence) -> None:
        """One image: its NMSed detections and its truths (k, 5) ``class, cx, cy, w, h``."""
        boxes, probs = _as_arrays(detections, self.classes)
        truths = np.asarray(truths, np.float32).reshape(-1, 5)
        truth_class = truths[:, 0].astype(np.int64)
        bad = (truth_class < 0) | (truth_class >= self.classes) | (truths[:, 0] != truth_class)
        if bad.any():
            warnings.warn(f"image {self.images}: {int(bad.sum())} truths with a class outside 0..{self.classes - 1} "
                          f"ignored", stacklevel=2)
            truths, truth_class = truths[~bad], truth_class[~bad]
        truth_boxes = truths[:, 1:5]
        self.truth_counts += np.bincount(truth_class, minlength=self.classes)

        thresholds = np.array(self._thresholds, np.float32)
        pair_class, pair_prob, best, best_iou = _match_pairs(
            np.ascontiguousarray(boxes), np.ascontiguousarray(probs), np.ascontiguousarray(truth_boxes),
            truth_class, thresholds)
        truth_index = np.where(best >= 0, best + self.unique_truths, -1).astype(np.int32)

        # TP / FP at the confidence threshold, Darknet's per-image bookkeeping.
        above = pair_prob > _F32(self.thresh)
        tp = above & _first_occurrences(truth_index[0])
        fp = above & ~tp
        self.tp_per_class += np.bincount(pair_class[tp], minlength=self.classes)
        self.fp_per_class += np.bincount(pair_class[fp], minlength=self.classes)
        self.iou_sum_per_class += np.bincount(pair_class[tp], weights=best_iou[tp].astype(np.float64),
                                              minlength=self.classes)

        self._probs.append(pair_prob.astype(np.float32))
        self._classes.append(pair_class.astype(np.int32))
        self._truth_index.append(truth_index)
        self.unique_truths += len(truth_class)
        self.images += 1

    def _map_at(self, t: int, order: np.ndarray, sorted_class: np.ndarray, group_bounds: np.ndarray,
                group_order: np.ndarray, points: int) -> np.ndarray:
        truth_index = np.concatenate([ti[t] for ti in self._truth_index])[order]
        tp = _first_occurrences(truth_index)  # matched, and the truth not taken by a higher-ranked pair
        aps = np.zeros(self.classes)
        for c in range(self.classes):
            lo, hi = group_bounds[c], group_bounds[c + 1]
            if lo == hi:
                continue
            tp_c = tp[group_order[lo:hi]]
            tp_cum = np.cumsum(tp_c).astype(np.float64)
            fp_cum = np.cumsum(~tp_c).astype(np.float64)
            precision = tp_cum / (tp_cum + fp_cum)
            truths = self.truth_counts[c]
            recall = tp_cum / truths if truths > 0 else np.zeros_like(tp_cum)
            aps[c] = average_precision(recall, precision, points)
        return aps

    def result(self, points: int = 0) -> dict:
        """The metrics of every image added so far (see the module docstring for the keys)."""
        if points != 0 and points < 2:
            raise DarkpruneError(f"points must be 0 (area under the curve) or at least 2, not {points}")
        probs = np.concatenate(self._probs) if self._probs else np.zeros(0, np.float32)
        pair_class = np.concatenate(self._classes) if self._classes else np.zeros(0, np.int32)
        order = np.argsort(-probs, kind="stable")
        sorted_class = pair_class[order]
        group_order = np.argsort(sorted_class, kind="stable")  # rank order kept within each class
        group_bounds = np.searchsorted(sorted_class[group_order], np.arange(self.classes + 1))

        aps_by_iou = {}
        for t, iou_thresh in enumerate(self._thresholds):
            aps_by_iou[iou_thresh] = self._map_at(t, order, sorted_class, group_bounds, group_order, points)
        aps = aps_by_iou[self.iou_thresh]
        coco = np.mean([aps_by_iou[t] for t in self.iou_thresholds], axis=0) if self.iou_thresholds else aps

        tp = int(self.tp_per_class.sum())
        fp = int(self.fp_per_class.sum())
        fn = int(self.unique_truths - tp)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / self.unique_truths if self.unique_truths else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        avg_iou = float(self.iou_sum_per_class.sum() / (tp + fp)) if tp + fp else 0.0
        per_class = [
            {"class": c, "name": self.names[c], "ap": float(aps[c]), "ap50_95": float(coco[c]),
             "tp": int(self.tp_per_class[c]), "fp": int(self.fp_per_class[c]), "truths": int(self.truth_counts[c])}
            for c in range(self.classes)
        ]
        return {
            "map50": float(aps.mean()),
            "map50_95": float(coco.mean()),
            "points": int(points),
            "iou_thresh": self.iou_thresh,
            "per_class": per_class,
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "avg_iou": avg_iou,
            "thresh": self.thresh,
            "images": self.images,
            "detections": int(len(probs)),
            "truths": int(self.unique_truths),
            "map_per_iou": {f"{t:.2f}": float(aps_by_iou[t].mean()) for t in self._thresholds},
        }


def detection_map(detections: Sequence[Any], truths: Sequence[np.ndarray], classes: int,
                  names: Sequence[str] | None = None, iou_thresh: float = 0.5, thresh: float = 0.25,
                  points: int = 0) -> dict:
    """``darknet detector map`` on per-image detections and truths (see the module docstring)."""
    if len(detections) != len(truths):
        raise DarkpruneError(f"{len(detections)} detection lists for {len(truths)} images")
    evaluator = DetectionEvaluator(classes, names, iou_thresh, thresh)
    for dets, truth in zip(detections, truths):
        evaluator.add(dets, truth)
    return evaluator.result(points)
