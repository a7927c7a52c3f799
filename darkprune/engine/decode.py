"""Head outputs -> detections, exactly as AlexeyAB's Darknet turns ``[yolo]`` / ``[region]`` outputs into boxes.

Contract with the engine
------------------------
``[yolo]``: per image an array (C, H, W) (or (1, C, H, W)), C = len(mask) * (4 + 1 + classes), holding what
``forward_yolo_layer`` leaves in ``l.output`` at inference: logistic applied to x, y, objectness and classes (unless
``new_coords=1``: then nothing), ``scale_x_y`` already applied to x, y; w, h raw (``exp``'ed here) or, with
``new_coords=1``, decoded as ``(2 w)^2``. Channel ``n * (5 + classes) + entry`` is entry (x, y, w, h, obj, cls...)
of the n-th anchor of ``mask``.
``[region]`` (YOLOv2): (C, H, W), C = num * (coords + 1 + classes), same channel order, with logistic applied to x, y
and objectness and softmax over the classes (what OpenCV's region layer outputs; Darknet's CPU code applies the
logistic on x, y inside ``get_region_box`` instead, with the same result). Anchors are in grid cells.

Public API
----------
``HeadParams`` / ``head_params(p)``       a head's parameters (from a dataclass or a cfg-style dict).
``yolo_detections(output, params, net_w, net_h, thresh, image_w=1, image_h=1, letterbox=False) -> Detections``
``region_detections(output, params, net_w, net_h, thresh, image_w=1, image_h=1, letterbox=False) -> Detections``
``correct_yolo_boxes(boxes, image_w, image_h, net_w, net_h, letterbox, relative=True)``
``nms(dets, thresh, nms_kind="default", beta_nms=0.6) -> Detections``   Darknet's do_nms_sort / diounms_sort.
``decode_image(heads, net_w, net_h, image_w=1, image_h=1, thresh=0.25, nms_thresh=0.45, letterbox=False,
               nms_kind=None, beta_nms=None) -> Detections``   all heads of one image, then NMS (kind: the last head's).
``decode_batch(heads, net_w, net_h, sizes=None, ...) -> list[Detections]``    heads holding (N, C, H, W) arrays.
``pixel_boxes(dets, image_w, image_h)``   [left, top, width, height] in pixels (Darknet's ``-ext_output``).
``class_confidences(dets, thresh=0.25)``  flat [(class, confidence)] above thresh, highest first.
``detections_to_json(dets, image_w, image_h, thresh=0.25, names=None)``  [{"name", "class", "confidence", "box"}].

``Detections`` holds Darknet's ``detection`` structs as arrays: ``boxes`` (n, 4) float32 ``cx, cy, w, h`` relative
to the original image (0..1), ``objectness`` (n,), ``probs`` (n, classes) = objectness * class probability, zeroed
at or below ``thresh`` and by NMS. It is a sequence of ``Detection(bbox, objectness, prob)``. Detections whose
probabilities are all zero (below threshold or suppressed) are dropped after NMS: they change nothing downstream.

NMS kinds (``nms_kind`` of the last ``[yolo]`` layer, as ``darknet detector test/map`` use): ``default`` ->
``do_nms_sort`` (per class, IoU > thresh suppresses); ``greedynms`` -> ``diounms_sort`` with DIoU whose distance term
is ``(d^2/c^2)^0.6`` (AlexeyAB's ``box_diou``; ``beta_nms`` unused); ``diounms`` -> DIoU with exponent ``beta_nms``;
``cornersnms`` -> plain IoU. Any other name falls back to ``default``, as in Darknet's parser.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
from numba import njit

from darkprune.darknet.heads import DECODED_HEAD_TYPES
from darkprune.errors import DarkpruneError

__all__ = [
    "Detection",
    "Detections",
    "HeadParams",
    "head_params",
    "NMS_KINDS",
    "yolo_detections",
    "region_detections",
    "correct_yolo_boxes",
    "nms",
    "decode_image",
    "decode_batch",
    "pixel_boxes",
    "class_confidences",
    "detections_to_json",
]

NMS_KINDS = {"default": 0, "greedynms": 1, "diounms": 2, "cornersnms": 3}
_F32 = np.float32


# ----------------------------------------------------------------------------------------------------------------
# detections


class Detection(NamedTuple):
    """One Darknet ``detection``: ``bbox`` (cx, cy, w, h) relative to the image, ``objectness``, ``prob`` (classes,)."""

    bbox: tuple[float, float, float, float]
    objectness: float
    prob: np.ndarray


@dataclass
class Detections:
    """Detections of one image as arrays; also a sequence of :class:`Detection`."""

    boxes: np.ndarray
    objectness: np.ndarray
    probs: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.objectness = np.asarray(self.objectness, np.float32).reshape(-1)
        self.probs = np.asarray(self.probs, np.float32)
        if self.probs.ndim != 2 or not (len(self.boxes) == len(self.objectness) == len(self.probs)):
            raise ValueError("Detections: boxes (n, 4), objectness (n,) and probs (n, classes) must agree")

    @classmethod
    def empty(cls, classes: int) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, classes), np.float32))

    @classmethod
    def from_list(cls, items: Sequence[Any], classes: int | None = None) -> "Detections":
        """From Detection tuples (or anything with ``bbox``, ``objectness``, ``prob``)."""
        if isinstance(items, Detections):
            return items
        items = list(items)
        if not items:
            if classes is None:
                raise ValueError("an empty detection list needs the number of classes")
            return cls.empty(classes)
        boxes = np.array([tuple(d.bbox) for d in items], np.float32)
        objectness = np.array([d.objectness for d in items], np.float32)
        probs = np.stack([np.asarray(d.prob, np.float32) for d in items])
        return cls(boxes, objectness, probs)

    @classmethod
    def concat(cls, parts: Sequence["Detections"], classes: int) -> "Detections":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(classes)
        return cls(np.concatenate([p.boxes for p in parts]), np.concatenate([p.objectness for p in parts]),
                   np.concatenate([p.probs for p in parts]))

    @property
    def classes(self) -> int:
        return self.probs.shape[1]

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> Detection:
        b = self.boxes[index]
        return Detection((float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(self.objectness[index]),
                         self.probs[index])

    def __iter__(self) -> Iterator[Detection]:
        for i in range(len(self)):
            yield self[i]

    def nonempty(self) -> "Detections":
        """Only the detections with some class probability left."""
        keep = (self.probs > 0).any(axis=1)
        return Detections(self.boxes[keep], self.objectness[keep], self.probs[keep])


# ----------------------------------------------------------------------------------------------------------------
# head parameters


@dataclass(frozen=True)
class HeadParams:
    """What decoding needs from a ``[yolo]`` or ``[region]`` section (cfg names; ``anchors`` flat w,h pairs)."""

    kind: str = "yolo"
    anchors: tuple[float, ...] = ()
    mask: tuple[int, ...] | None = None
    classes: int = 20
    num: int | None = None
    coords: int = 4
    new_coords: int = 0
    scale_x_y: float = 1.0  # informational: the engine applies it
    nms_kind: str = "default"
    beta_nms: float = 0.6
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def masks(self) -> tuple[int, ...]:
        """The anchor indices this head predicts with (all anchors when the cfg has no ``mask``)."""
        if self.mask is not None:
            return self.mask
        return tuple(range(self.num if self.num is not None else len(self.anchors) // 2))


def _numbers(value: Any, convert) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(convert(v) for v in value.replace(" ", "").split(",") if v != "")
    if isinstance(value, (int, float)):
        return (convert(value),)
    return tuple(convert(v) for v in value)


def head_params(params: HeadParams | Mapping[str, Any]) -> HeadParams:
    """A :class:`HeadParams` from itself or from a cfg-style mapping (values may still be strings).

    Keys: ``type``/``kind`` ("yolo" | "region", default "yolo"), ``anchors``, ``mask``, ``classes``, ``num``,
    ``coords``, ``new_coords``, ``scale_x_y``, ``nms_kind``, ``beta_nms``.
    """
    if isinstance(params, HeadParams):
        return params
    p = dict(params)
    kind = str(p.get("type", p.get("kind", "yolo"))).strip("[] ").lower()
    if kind not in DECODED_HEAD_TYPES:
        raise DarkpruneError(f"cannot decode a [{kind}] layer: only [yolo] and [region] heads")
    anchors = _numbers(p.get("anchors"), float)
    mask = _numbers(p.get("mask"), int) if p.get("mask") not in (None, "") else None
    num = int(p["num"]) if p.get("num") not in (None, "") else None
    nms_kind = str(p.get("nms_kind", "default")).strip()
    if nms_kind not in NMS_KINDS:
        warnings.warn(f"nms_kind={nms_kind} unknown, using default NMS as Darknet does", stacklevel=2)
        nms_kind = "default"
    known = {"type", "kind", "anchors", "mask", "classes", "num", "coords", "new_coords", "scale_x_y", "nms_kind",
             "beta_nms"}
    classes = int(p.get("classes", 20))  # Darknet's parser default
    return HeadParams(kind=kind, anchors=anchors, mask=mask, classes=classes,
                      num=num, coords=int(p.get("coords", 4)), new_coords=int(p.get("new_coords", 0)),
                      scale_x_y=float(p.get("scale_x_y", 1.0)), nms_kind=nms_kind,
                      beta_nms=float(p.get("beta_nms", 0.6)),
                      extra={k: v for k, v in p.items() if k not in known})


def _single_image(output: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(output)
    if out.ndim == 4:
        if out.shape[0] != 1:
            raise DarkpruneError(f"{what}: expected one image's output, got a batch of {out.shape[0]}")
        out = out[0]
    if out.ndim != 3:
        raise DarkpruneError(f"{what}: expected an output of shape (C, H, W), got {out.shape}")
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------------------------------------------
# boxes


def correct_yolo_boxes(boxes: np.ndarray, image_w: int, image_h: int, net_w: int, net_h: int,
                       letterbox: bool = False, relative: bool = True) -> np.ndarray:
    """Darknet's ``correct_yolo_boxes``: undo the letterbox placement; boxes (n, 4) cx, cy, w, h (a new array).

    Without letterbox the boxes are already relative to the image and come back unchanged (when ``relative``).
    """
    boxes = np.array(boxes, np.float32, copy=True).reshape(-1, 4)
    if letterbox:
        if _F32(net_w) / _F32(image_w) < _F32(net_h) / _F32(image_h):
            new_w, new_h = net_w, (image_h * net_w) // image_w
        else:
            new_w, new_h = (image_w * net_h) // image_h, net_h
    else:
        new_w, new_h = net_w, net_h
    deltaw = float(_F32(net_w - new_w))
    deltah = float(_F32(net_h - new_h))
    ratiow = _F32(new_w) / _F32(net_w)
    ratioh = _F32(new_h) / _F32(net_h)
    if letterbox:
        # C: (b.x - deltaw/2./netw) / ratiow in double, stored as float; b.w *= 1/ratiow in float.
        boxes[:, 0] = ((boxes[:, 0].astype(np.float64) - deltaw / 2.0 / net_w) / float(ratiow)).astype(np.float32)
        boxes[:, 1] = ((boxes[:, 1].astype(np.float64) - deltah / 2.0 / net_h) / float(ratioh)).astype(np.float32)
        boxes[:, 2] *= _F32(1) / ratiow
        boxes[:, 3] *= _F32(1) / ratioh
    if not relative:
        boxes[:, [0, 2]] *= _F32(image_w)
        boxes[:, [1, 3]] *= _F32(image_h)
    return boxes


@njit(cache=True, nogil=True)
def _yolo_candidates(view, anchor_w, anchor_h, lw, lh, net_w, net_h, thresh, new_coords):
    """get_yolo_detections' loop over one head (anchors, 5 + classes, cells): the (cell, anchor) pairs with
    objectness > thresh, cells outer, anchors inner (Darknet's order), with their boxes (in the network's frame) and
    class probabilities objectness * class, zeroed where not above thresh. NaN objectness never passes."""
    num, entries, cells = view.shape
    classes = entries - 5
    count = 0
    for cell in range(cells):
        for a in range(num):
            if view[a, 4, cell] > thresh:
                count += 1
    boxes = np.empty((count, 4), np.float32)
    objectness = np.empty(count, np.float32)
    probs = np.empty((count, classes), np.float32)
    width = np.float32(lw)
    height = np.float32(lh)
    four = np.float32(4.0)
    k = 0
    for cell in range(cells):
        col = np.float32(cell % lw)
        row = np.float32(cell // lw)
        for a in range(num):
            o = view[a, 4, cell]
            if not o > thresh:
                continue
            boxes[k, 0] = (col + view[a, 0, cell]) / width
            boxes[k, 1] = (row + view[a, 1, cell]) / height
            tw = view[a, 2, cell]
            th = view[a, 3, cell]
            if new_coords:
                boxes[k, 2] = tw * tw * four * anchor_w[a] / np.float32(net_w)
                boxes[k, 3] = th * th * four * anchor_h[a] / np.float32(net_h)
            else:  # exp() in double, as C's exp(float) does
                boxes[k, 2] = np.float32(math.exp(np.float64(tw)) * np.float64(anchor_w[a]) / np.float64(net_w))
                boxes[k, 3] = np.float32(math.exp(np.float64(th)) * np.float64(anchor_h[a]) / np.float64(net_h))
            objectness[k] = o
            for c in range(classes):
                prob = o * view[a, 5 + c, cell]
                probs[k, c] = prob if prob > thresh else np.float32(0.0)
            k += 1
    return boxes, objectness, probs


def yolo_detections(output: np.ndarray, params: HeadParams | Mapping[str, Any], net_w: int, net_h: int,
                    thresh: float = 0.25, image_w: int = 1, image_h: int = 1, letterbox: bool = False,
                    relative: bool = True) -> Detections:
    """Darknet's ``get_yolo_detections`` for one image: cells with objectness > thresh, in Darknet's order."""
    p = head_params(params)
    out = _single_image(output, "[yolo]")
    masks = p.masks
    entries = 5 + p.classes
    channels, lh, lw = out.shape
    if channels != len(masks) * entries:
        raise DarkpruneError(f"[yolo]: output has {channels} channels, expected {len(masks)} anchors x "
                             f"(5 + {p.classes} classes) = {len(masks) * entries}")
    if len(p.anchors) < 2 * (max(masks) + 1):
        raise DarkpruneError(f"[yolo]: mask uses anchor {max(masks)} but only {len(p.anchors) // 2} anchors given")
    view = np.ascontiguousarray(out.reshape(len(masks), entries, lh * lw))
    biases = np.asarray(p.anchors, np.float32)
    anchor_index = np.asarray(masks, np.int64)
    boxes, obj, probs = _yolo_candidates(view, biases[2 * anchor_index], biases[2 * anchor_index + 1], lw, lh,
                                         net_w, net_h, _F32(thresh), bool(p.new_coords))
    if len(obj) == 0:
        return Detections.empty(p.classes)
    boxes = correct_yolo_boxes(boxes, image_w, image_h, net_w, net_h, letterbox, relative)
    return Detections(boxes, obj, probs)


def region_detections(output: np.ndarray, params: HeadParams | Mapping[str, Any], net_w: int, net_h: int,
                      thresh: float = 0.25, image_w: int = 1, image_h: int = 1, letterbox: bool = False,
                      relative: bool = True) -> Detections:
    """AlexeyAB's ``custom_get_region_detections`` (YOLOv2 ``[region]``) for one image.

    Darknet keeps every cell and anchor; we keep those with some class probability above ``thresh`` (the others
    can neither be reported nor suppress anything). ``objectness`` holds the predicted objectness (Darknet stores
    1 there; NMS and mAP do not read it).
    """
    p = head_params(params)
    out = _single_image(output, "[region]")
    num = p.num if p.num is not None else len(p.anchors) // 2
    entries = p.coords + 1 + p.classes
    channels, lh, lw = out.shape
    if channels != num * entries:
        raise DarkpruneError(f"[region]: output has {channels} channels, expected num={num} x (coords {p.coords} + 1 + "
                             f"{p.classes} classes) = {num * entries}")
    if len(p.anchors) < 2 * num:
        raise DarkpruneError(f"[region]: num={num} needs {2 * num} anchor values, {len(p.anchors)} given")
    view = out.reshape(num, entries, lh * lw)
    scale = view[:, p.coords, :].T  # (cells, anchors)
    cls = view[:, p.coords + 1:, :].transpose(2, 0, 1)  # (cells, anchors, classes)
    probs = scale[:, :, None] * cls
    probs = np.where(probs > _F32(thresh), probs, _F32(0)).astype(np.float32)
    cell, anchor = np.nonzero((probs > 0).any(axis=2))
    if len(cell) == 0:
        return Detections.empty(p.classes)
    col = (cell % lw).astype(np.float32)
    row = (cell // lw).astype(np.float32)
    biases = np.asarray(p.anchors, np.float32)
    boxes = np.empty((len(cell), 4), np.float32)
    boxes[:, 0] = (col + view[anchor, 0, cell]) / _F32(lw)
    boxes[:, 1] = (row + view[anchor, 1, cell]) / _F32(lh)
    boxes[:, 2] = (np.exp(view[anchor, 2, cell].astype(np.float64)) * biases[2 * anchor] / lw).astype(np.float32)
    boxes[:, 3] = (np.exp(view[anchor, 3, cell].astype(np.float64)) * biases[2 * anchor + 1] / lh).astype(np.float32)
    boxes = correct_yolo_boxes(boxes, image_w, image_h, net_w, net_h, letterbox, relative)
    return Detections(boxes, scale[cell, anchor], probs[cell, anchor])


# ----------------------------------------------------------------------------------------------------------------
# NMS (box.c arithmetic, in float32 as Darknet computes it)


@njit(cache=True, inline="always")
def _spans(a_centre, a_size, b_centre, b_size):
    """(overlap, hull) lengths of two segments given by centre and size along one axis, in float32 as box.c
    computes them (the overlap is negative when they are apart)."""
    two = np.float32(2.0)
    a_lo, a_hi = a_centre - a_size / two, a_centre + a_size / two
    b_lo, b_hi = b_centre - b_size / two, b_centre + b_size / two
    return min(a_hi, b_hi) - max(a_lo, b_lo), max(a_hi, b_hi) - min(a_lo, b_lo)


@njit(cache=True, inline="always")
def box_iou(ax, ay, aw, ah, bx, by, bw, bh):
    """box.c's box_iou of two (cx, cy, w, h) boxes, in float32 (also the mAP's matching IoU)."""
    w = _spans(ax, aw, bx, bw)[0]
    h = _spans(ay, ah, by, bh)[0]
    if w < 0 or h < 0:
        return np.float32(0.0)
    inter = w * h
    union = aw * ah + bw * bh - inter
    if inter == 0 or union == 0:
        return np.float32(0.0)
    return inter / union


@njit(cache=True, inline="always")
def _box_diou(ax, ay, aw, ah, bx, by, bw, bh, exponent):
    """IoU minus (centre distance^2 / enclosing diagonal^2)^exponent (box_diou: 0.6; box_diounms: beta_nms)."""
    w = _spans(ax, aw, bx, bw)[1]
    h = _spans(ay, ah, by, bh)[1]
    c = w * w + h * h
    iou = box_iou(ax, ay, aw, ah, bx, by, bw, bh)
    if c == 0:
        return iou
    d = (ax - bx) * (ax - bx) + (ay - by) * (ay - by)
    u = np.float32(math.pow(np.float64(d / c), exponent))
    return iou - u


@njit(cache=True, nogil=True)
def _box_edges(boxes):
    """left, right, top, bottom and area of each (cx, cy, w, h) box: the float32 expressions box_iou evaluates."""
    n = boxes.shape[0]
    two = np.float32(2.0)
    edges = np.empty((5, n), np.float32)
    for i in range(n):
        x, y, w, h = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        edges[0, i] = x - w / two
        edges[1, i] = x + w / two
        edges[2, i] = y - h / two
        edges[3, i] = y + h / two
        edges[4, i] = w * h
    return edges[0], edges[1], edges[2], edges[3], edges[4]


@njit(cache=True, nogil=True)
def _candidates_by_class(probs, valid):
    """Each class's candidates (valid, nonzero probability) in detection order: class k's are
    members[counts[k]:counts[k + 1]]. One row-major pass counts them, a second files them (probs is (boxes,
    classes): a column scan per class would stride across rows)."""
    n, classes = probs.shape
    counts = np.zeros(classes + 1, np.int64)
    for i in range(n):
        if valid[i]:
            for k in range(classes):
                if probs[i, k] != 0:
                    counts[k + 1] += 1
    for k in range(classes):
        counts[k + 1] += counts[k]
    filled = counts[:classes].copy()
    members = np.empty(counts[classes], np.int64)
    for i in range(n):
        if valid[i]:
            for k in range(classes):
                if probs[i, k] != 0:
                    members[filled[k]] = i
                    filled[k] += 1
    return counts, members


@njit(cache=True, nogil=True, error_model="numpy")
def _suppress_later(a, m, sl, sr, st, sb, sa, boxes, candidates, limit, kind, beta, alive, hit):
    """Kept candidate `a` against every later one: alive[b] = False where box.c's test says `a` suppresses `b`.

    Written without branches over b, on slices indexed from 0 (numba then knows no index is negative), and with
    numpy's error model (a float division cannot raise), so that the IoU test runs on vector lanes, about 20 times
    faster than the pair-by-pair loop. The float32 expressions are box_iou's (w < 0 or h < 0, a zero intersection
    or union, and NaN all fail `overlap > limit`). Dead candidates are tested too (a dead one stays dead). The DIoU
    kinds then compute, one pair at a time, DIoU for the few pairs whose IoU passed: DIoU = IoU - a non-negative
    term, so a pair failing on IoU fails on DIoU."""
    al, ar, at, ab, aa = sl[a], sr[a], st[a], sb[a], sa[a]
    lo = a + 1
    left, right, top, bottom, area = sl[lo:m], sr[lo:m], st[lo:m], sb[lo:m], sa[lo:m]
    hits = hit[lo:m]
    for j in range(m - lo):
        w = min(ar, right[j]) - max(al, left[j])
        h = min(ab, bottom[j]) - max(at, top[j])
        inter = w * h
        union = aa + area[j] - inter
        overlap = inter / union
        hits[j] = (w >= 0) & (h >= 0) & (inter != 0) & (union != 0) & (overlap > limit)
    later = alive[lo:m]
    if kind == 1 or kind == 2:
        for j in range(m - lo):
            if hits[j] and later[j]:
                i, k = candidates[a], candidates[lo + j]
                hits[j] = _box_diou(boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3], boxes[k, 0], boxes[k, 1],
                                    boxes[k, 2], boxes[k, 3], 0.6 if kind == 1 else beta) > limit
    for j in range(m - lo):
        later[j] = later[j] and not hits[j]


@njit(cache=True, nogil=True)
def _nms_kernel(boxes, probs, objectness, thresh, kind, beta):
    """Per class: sort by probability, zero the probability of every later box that overlaps a kept one.

    The arithmetic is box.c's, pair for pair, in float32; what differs from a literal port is where it happens.
    Box edges and areas are the same float32 expressions box_iou evaluates, computed once per box instead of once
    per pair, and each class's candidates are copied in probability order into contiguous arrays. The DIoU kinds
    compute their distance term only for pairs whose IoU passes the threshold: DIoU = IoU - a non-negative term, so
    a pair failing on IoU fails on DIoU.
    """
    limit = np.float32(thresh)
    n, classes = probs.shape
    left, right, top, bottom, area = _box_edges(boxes)
    valid = np.zeros(n, np.bool_)
    for i in range(n):
        valid[i] = objectness[i] != 0  # Darknet moves objectness==0 detections out of NMS
    counts, members = _candidates_by_class(probs, valid)
    # the current class's candidates in probability order: their edges side by side, and whether still kept
    candidates = np.empty(n, np.int64)
    values = np.empty(n, np.float32)     # the sort's keys
    sl = np.empty(n, np.float32)
    sr = np.empty(n, np.float32)
    st = np.empty(n, np.float32)
    sb = np.empty(n, np.float32)
    sa = np.empty(n, np.float32)
    alive = np.empty(n, np.bool_)
    hit = np.empty(n, np.bool_)
    for k in range(classes):
        m = counts[k + 1] - counts[k]
        if m < 2:
            continue
        # by decreasing probability, ties in detection order (stable); a class mostly has a handful of candidates,
        # which an insertion sort orders without the allocations of argsort
        own = members[counts[k]:counts[k + 1]]
        if m <= 64:
            for a in range(m):
                i = own[a]
                v = probs[i, k]
                b = a
                while b > 0 and values[b - 1] < v:
                    values[b] = values[b - 1]
                    candidates[b] = candidates[b - 1]
                    b -= 1
                values[b] = v
                candidates[b] = i
        else:
            for a in range(m):
                values[a] = -probs[own[a], k]
            order = np.argsort(values[:m], kind="mergesort")
            for a in range(m):
                candidates[a] = own[order[a]]
        for a in range(m):
            i = candidates[a]
            sl[a], sr[a], st[a], sb[a], sa[a] = left[i], right[i], top[i], bottom[i], area[i]
            alive[a] = True
        for a in range(m):
            if alive[a]:
                _suppress_later(a, m, sl, sr, st, sb, sa, boxes, candidates, limit, kind, beta, alive, hit)
        for a in range(m):
            if not alive[a]:
                probs[candidates[a], k] = 0


def nms(dets: Detections, thresh: float = 0.45, nms_kind: str = "default", beta_nms: float = 0.6) -> Detections:
    """Darknet's per-class NMS (``do_nms_sort``, or ``diounms_sort`` for greedynms/diounms/cornersnms).

    Returns new Detections with suppressed class probabilities set to 0 (boxes kept; see ``Detections.nonempty``).
    """
    if nms_kind not in NMS_KINDS:
        raise DarkpruneError(f"nms_kind must be one of {', '.join(NMS_KINDS)}, not {nms_kind!r}")
    probs = np.array(dets.probs, np.float32, copy=True, order="C")
    if len(dets) > 1 and thresh > 0:
        _nms_kernel(np.ascontiguousarray(dets.boxes, np.float32), probs,
                    np.ascontiguousarray(dets.objectness, np.float32), float(thresh), NMS_KINDS[nms_kind],
                    float(np.float32(beta_nms)))
    return Detections(dets.boxes.copy(), dets.objectness.copy(), probs)


# ----------------------------------------------------------------------------------------------------------------
# whole image / batch


def decode_image(heads: Sequence[tuple[np.ndarray, HeadParams | Mapping[str, Any]]], net_w: int, net_h: int,
                 image_w: int = 1, image_h: int = 1, thresh: float = 0.25, nms_thresh: float = 0.45,
                 letterbox: bool = False, nms_kind: str | None = None, beta_nms: float | None = None) -> Detections:
    """All heads of one image -> NMSed detections (Darknet's ``get_network_boxes`` + ``do_nms_sort``/``diounms_sort``).

    ``heads``: ``[(output (C, H, W), params), ...]`` in layer order. ``image_w``/``image_h`` matter only with
    ``letterbox`` (boxes come back relative to the original image either way). ``nms_thresh=0`` skips NMS.
    ``nms_kind``/``beta_nms`` default to the last head's, as Darknet takes them from its last detection layer.
    ``darknet detector map`` uses ``thresh=0.005, nms_thresh=0.45``; ``detector test`` ``thresh=0.25``.
    """
    if not heads:
        raise DarkpruneError("decode_image: the network has no [yolo] or [region] head")
    parsed = [(out, head_params(params)) for out, params in heads]
    classes = parsed[-1][1].classes
    parts = []
    for out, p in parsed:
        if p.classes != classes:
            raise DarkpruneError(f"[{p.kind}] heads disagree on classes ({p.classes} vs {classes})")
        decode = yolo_detections if p.kind == "yolo" else region_detections
        parts.append(decode(out, p, net_w, net_h, thresh, image_w, image_h, letterbox))
    dets = Detections.concat(parts, classes)
    if nms_thresh:
        last = parsed[-1][1]
        dets = nms(dets, nms_thresh, nms_kind or last.nms_kind, last.beta_nms if beta_nms is None else beta_nms)
    return dets.nonempty()


def decode_batch(heads: Sequence[tuple[np.ndarray, HeadParams | Mapping[str, Any]]], net_w: int, net_h: int,
                 sizes: np.ndarray | Sequence[tuple[int, int]] | None = None, thresh: float = 0.25,
                 nms_thresh: float = 0.45, letterbox: bool = False, nms_kind: str | None = None,
                 beta_nms: float | None = None) -> list[Detections]:
    """:func:`decode_image` for each image of a batch: head arrays (N, C, H, W); ``sizes`` (N, 2) original (w, h)."""
    if not heads:
        raise DarkpruneError("decode_batch: the network has no [yolo] or [region] head")
    count = np.asarray(heads[0][0]).shape[0]
    if letterbox and sizes is None:
        raise DarkpruneError("decode_batch: letterbox decoding needs the original image sizes")
    results = []
    for i in range(count):
        w, h = (int(sizes[i][0]), int(sizes[i][1])) if sizes is not None else (1, 1)
        results.append(decode_image([(np.asarray(out)[i], params) for out, params in heads], net_w, net_h, w, h,
                                    thresh, nms_thresh, letterbox, nms_kind, beta_nms))
    return results


# ----------------------------------------------------------------------------------------------------------------
# reporting helpers


def _c_round(values: np.ndarray) -> np.ndarray:
    """C's round(): halves away from zero (numpy rounds halves to even)."""
    values = np.asarray(values, np.float64)
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def pixel_boxes(dets: Detections, image_w: int, image_h: int) -> np.ndarray:
    """Boxes as integer pixels ``[left, top, width, height]`` of the original image (Darknet's ``-ext_output``)."""
    dets = Detections.from_list(dets) if not isinstance(dets, Detections) else dets
    b = dets.boxes.astype(np.float64)
    out = np.stack([_c_round((b[:, 0] - b[:, 2] / 2) * image_w), _c_round((b[:, 1] - b[:, 3] / 2) * image_h),
                    _c_round(b[:, 2] * image_w), _c_round(b[:, 3] * image_h)], axis=1)
    return out.astype(np.int64).reshape(-1, 4)


def _above(dets: Detections, thresh: float) -> list[tuple[float, int, int]]:
    index, cls = np.nonzero(dets.probs > _F32(thresh))  # Darknet reports prob > thresh
    conf = dets.probs[index, cls]
    order = np.argsort(-conf, kind="stable")
    return [(float(conf[o]), int(cls[o]), int(index[o])) for o in order]


def class_confidences(dets: Detections | Sequence[Detection], thresh: float = 0.25) -> list[tuple[int, float]]:
    """Every (class, confidence) with confidence > thresh, highest first (one box may give several classes)."""
    if not isinstance(dets, Detections):
        dets = Detections.from_list(dets)
    return [(cls, conf) for conf, cls, _ in _above(dets, thresh)]


def detections_to_json(dets: Detections | Sequence[Detection], image_w: int, image_h: int, thresh: float = 0.25,
                       names: Sequence[str] | None = None) -> list[dict]:
    """``[{"name", "class", "confidence", "box": [left, top, width, height]}]`` above thresh, highest first."""
    if not isinstance(dets, Detections):
        dets = Detections.from_list(dets)
    boxes = pixel_boxes(dets, image_w, image_h)
    result = []
    for conf, cls, index in _above(dets, thresh):
        result.append({"name": names[cls] if names is not None and cls < len(names) else str(cls), "class": cls,
                       "confidence": conf, "box": [int(v) for v in boxes[index]]})
    return result
