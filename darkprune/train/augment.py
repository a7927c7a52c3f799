"""Darknet's training-data augmentation, with OpenCV and a seeded numpy Generator (deterministic for a seed).

Detection (AlexeyAB's load_data_detection, non-mosaic OpenCV path, and image_data_augmentation / fill_truth_detection):
- jitter: each side of the image moves by a random offset in [-jitter*size, +jitter*size] (integer pixels, C's
  truncation): a crop where the offset is positive, padding where it is negative; the padding is the image's mean
  colour (cv::mean, as Darknet fills it); the crop is resized to the network size with cv2.INTER_LINEAR (so jitter
  also rescales and changes the aspect ratio, as in Darknet);
- letter_box: the offsets are widened so the resize keeps the image's aspect ratio (the padding is then the mean
  colour, not Darknet's inference-time 0.5 grey);
- flip: horizontal mirror with probability 1/2 when the cfg's `flip` (default 1) is on;
- hue/saturation/exposure in OpenCV's 8-bit HSV, as Darknet's OpenCV build does: H += 179*dhue, S *= dsat,
  V *= dexp, each saturating to 0..255 (H is not wrapped, as cv::Mat arithmetic does not wrap), with
  dhue ~ U(-hue, hue), dsat = rand_scale(saturation), dexp = rand_scale(exposure), rand_scale(s) = u or 1/u with
  u ~ U(1, s) (each 1/2);
- boxes (Darknet's correct_boxes / fill_truth_detection): shuffled, edges mapped through the crop, mirrored when
  flipped, clipped to the image, then dropped when narrower or lower than one network pixel (so boxes that leave the
  image vanish), when their centre is not in (0, 1], or when their class is not below `classes`; at most
  `num_boxes` (the [yolo] `max`) are kept, w and h capped at 1.
Output: the network input (C, height, width) float32 RGB in [0, 1] (Darknet's mat_to_image), and the boxes
(k, 5) float32 class, cx, cy, w, h.
Not done: mosaic, cutmix, mixup, blur, gaussian_noise, the [yolo] `resize=` option, random=1 multi-scale (the loop
chooses the network size), `track`/`contrastive` modes.

Classification (load_image_augment_paths -> random_augment_image, rotate_crop_image, flip_image,
random_distort_image, resize_image):
- a square crop of side size = max(width, height) from the image scaled so its shorter side (after the aspect
  stretch) is r ~ randint(min_crop, max_crop), stretched horizontally by 1/aspect' with aspect' = rand_scale(aspect),
  rotated by U(-angle, angle) degrees about the image centre, shifted by a random offset within the slack, with
  bilinear sampling and 0 outside the image (cv2.warpAffine with Darknet's inverse map);
- flip (1/2 when the cfg's flip is on); hue/saturation/exposure in Darknet's float HSV (h in [0, 1) wrapping,
  s *= dsat, v *= dexp, then clamped to [0, 1]); grey images only get the exposure;
- resized to (width, height) when size differs (cv2.INTER_LINEAR; Darknet uses its own resize_image here).
Input images are what darkprune.data.load_image gives: uint8 BGR (H, W, 3) or grey (H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..darknet.heads import HEAD_TYPES


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    # rand_uniform / rand_uniform_strong: swapped bounds are allowed
    if hi < lo:
        lo, hi = hi, lo
    return lo + (hi - lo) * float(rng.random())


def rand_scale(rng: np.random.Generator, s: float) -> float:
    """Darknet's rand_scale: u ~ U(1, s), returned as u or 1/u with probability 1/2 each."""
    u = _uniform(rng, 1.0, s)
    return u if rng.integers(2) else 1.0 / u


def _to_chw_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 BGR (H, W, 3) or grey (H, W) -> float32 (C, H, W) RGB / 255."""
    if img.ndim == 2:
        return (img.astype(np.float32) / 255.0)[None]
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


# ---------------------------------------------------------------------------------------------------------------
# detection

@dataclass
class ColorDraw:
    """The hue/saturation/exposure part of a draw (keyword-only: it follows each augmentation's own fields)."""
    dhue: float = field(default=0.0, kw_only=True)
    dsat: float = field(default=1.0, kw_only=True)
    dexp: float = field(default=1.0, kw_only=True)

    @staticmethod
    def draw(rng: np.random.Generator, hue: float, saturation: float, exposure: float) -> dict:
        """Darknet's order: hue ~ U(-hue, hue), then rand_scale(saturation), then rand_scale(exposure)."""
        dhue = _uniform(rng, -hue, hue)
        dsat = rand_scale(rng, saturation)
        return {"dhue": dhue, "dsat": dsat, "dexp": rand_scale(rng, exposure)}


@dataclass
class DetectionParams(ColorDraw):
    """One draw of the detection augmentation (pixel offsets of the left/right/top/bottom sides; positive = crop)."""
    pleft: int
    pright: int
    ptop: int
    pbot: int
    flip: bool


@dataclass
class DetectionAugment:
    width: int
    height: int
    jitter: float = 0.2
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0
    flip: bool = True
    letter_box: bool = False
    num_boxes: int = 200
    classes: int | None = None

    @classmethod
    def from_graph(cls, graph) -> "DetectionAugment":
        """[net] width/height/hue/saturation/exposure/flip/letter_box, jitter/max/classes of the last
        [yolo]/[region] layer (the one Darknet's train_detector reads them from)."""
        net = graph.cfg.net
        heads = [l for l in graph.layers if l.type in HEAD_TYPES]
        if not heads:
            raise ValueError("the network has no detection head")
        head = heads[-1]
        return cls(width=graph.net["width"], height=graph.net["height"],
                   jitter=head.attrs.get("jitter", head.section.get_float("jitter", 0.2)),
                   hue=net.get_float("hue", 0.0), saturation=net.get_float("saturation", 1.0),
                   exposure=net.get_float("exposure", 1.0), flip=bool(net.get_int("flip", 1)),
                   letter_box=bool(net.get_int("letter_box", 0)),
                   num_boxes=head.attrs.get("max_boxes", 200), classes=head.attrs.get("classes"))

    def draw(self, rng: np.random.Generator, image_w: int, image_h: int) -> DetectionParams:
        """The random part, in Darknet's order: r1..r4, flip, hue, saturation, exposure."""
        dw = int(image_w * self.jitter)
        dh = int(image_h * self.jitter)
        r1, r2, r3, r4 = (float(rng.random()) for _ in range(4))
        flip = bool(rng.integers(2)) if self.flip else False
        color = ColorDraw.draw(rng, self.hue, self.saturation, self.exposure)
        # rand_precalc_random(-d, d, r) = r*2d - d, stored in an int (truncation toward zero)
        pleft = int(r1 * 2 * dw - dw)
        pright = int(r2 * 2 * dw - dw)
        ptop = int(r3 * 2 * dh - dh)
        pbot = int(r4 * 2 * dh - dh)
        if self.letter_box:
            pleft, pright, ptop, pbot = _letterbox_offsets(pleft, pright, ptop, pbot, image_w, image_h,
                                                           self.width, self.height)
        return DetectionParams(pleft, pright, ptop, pbot, flip, **color)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
        """Augment one image and its boxes (k, 5: class, cx, cy, w, h). Returns (CHW float32 RGB, boxes)."""
        params = self.draw(rng, image.shape[1], image.shape[0])
        order = rng.permutation(len(boxes)) if len(boxes) else np.zeros(0, np.int64)
        return apply_detection_augment(image, np.asarray(boxes)[order] if len(boxes) else boxes, params,
                                       self.width, self.height, self.num_boxes, self.classes)


def _letterbox_offsets(pleft, pright, ptop, pbot, ow, oh, w, h):
    img_ar = ow / oh
    net_ar = w / h
    if img_ar / net_ar > 1:             # the crop must get taller
        delta_h = (ow / net_ar - oh) / 2
        ptop = int(ptop - delta_h)
        pbot = int(pbot - delta_h)
    else:                               # wider
        delta_w = (oh * net_ar - ow) / 2
        pleft = int(pleft - delta_w)
        pright = int(pright - delta_w)
    return pleft, pright, ptop, pbot


def transform_boxes(boxes: np.ndarray, params: DetectionParams, image_w: int, image_h: int, net_w: int,
                    net_h: int, num_boxes: int = 200, classes: int | None = None) -> np.ndarray:
    """Darknet's correct_boxes + fill_truth_detection for boxes (k, 5: class, cx, cy, w, h) in the given order."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 5)
    swidth = max(1, image_w - params.pleft - params.pright)
    sheight = max(1, image_h - params.ptop - params.pbot)
    sx = swidth / image_w
    sy = sheight / image_h
    dx = (params.pleft / image_w) / sx
    dy = (params.ptop / image_h) / sy
    lowest_w = 1.0 / net_w
    lowest_h = 1.0 / net_h
    out = []
    for cls_id, x, y, w, h in boxes:
        if (x == 0 and y == 0) or x + w / 2 < 0 or y + h / 2 < 0 or x - w / 2 > 1 or y - h / 2 > 1:
            out.append(None)            # Darknet marks it (999999) and it still takes a slot below
            continue
        left = (x - w / 2) / sx - dx
        right = (x + w / 2) / sx - dx
        top = (y - h / 2) / sy - dy
        bottom = (y + h / 2) / sy - dy
        if params.flip:
            left, right = 1.0 - right, 1.0 - left
        left, right = min(max(left, 0.0), 1.0), min(max(right, 0.0), 1.0)
        top, bottom = min(max(top, 0.0), 1.0), min(max(bottom, 0.0), 1.0)
        out.append((cls_id, (left + right) / 2, (top + bottom) / 2, min(max(right - left, 0.0), 1.0),
                    min(max(bottom - top, 0.0), 1.0)))
    # fill_truth_detection: truncate to num_boxes (before filtering, as Darknet does), then filter
    kept = []
    for row in out[:num_boxes]:
        if row is None:
            continue
        cls_id, x, y, w, h = row
        if classes is not None and int(cls_id) >= classes:
            continue
        if w < lowest_w or h < lowest_h:
            continue
        if x <= 0 or x > 1 or y <= 0 or y > 1:
            continue
        kept.append((cls_id, x, y, min(w, 1.0), min(h, 1.0)))
    return np.asarray(kept, np.float32).reshape(-1, 5)


def apply_detection_augment(image: np.ndarray, boxes: np.ndarray, params: DetectionParams, width: int, height: int,
                            num_boxes: int = 200, classes: int | None = None):
    """Apply a DetectionParams draw: crop/pad, resize to (width, height), flip, HSV; boxes in the given order.
    Returns (CHW float32 RGB in [0, 1], boxes (k, 5) float32)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError("detection augment: expected a uint8 (H, W) or (H, W, 3) image")
    oh, ow = img.shape[:2]
    new_boxes = transform_boxes(boxes, params, ow, oh, width, height, num_boxes, classes)
    swidth = max(1, ow - params.pleft - params.pright)
    sheight = max(1, oh - params.ptop - params.pbot)
    if params.pleft == 0 and params.ptop == 0 and swidth == ow and sheight == oh:
        crop = img
    else:
        # the crop rectangle, clipped to the image, copied into a mean-filled canvas (cv::Rect intersection)
        mean = cv2.mean(img)
        fill = [int(np.rint(m)) for m in mean[: (1 if img.ndim == 2 else 3)]]
        crop = np.empty((sheight, swidth) + img.shape[2:], np.uint8)
        crop[...] = fill[0] if img.ndim == 2 else fill
        x0, y0 = max(params.pleft, 0), max(params.ptop, 0)
        x1, y1 = min(params.pleft + swidth, ow), min(params.ptop + sheight, oh)
        if x1 > x0 and y1 > y0:
            dx0, dy0 = max(0, -params.pleft), max(0, -params.ptop)
            crop[dy0:dy0 + (y1 - y0), dx0:dx0 + (x1 - x0)] = img[y0:y1, x0:x1]
    sized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    if params.flip:
        sized = cv2.flip(sized, 1)
    if params.dsat != 1 or params.dexp != 1 or params.dhue != 0:
        if sized.ndim == 3 and sized.shape[2] >= 3:
            hsv = cv2.cvtColor(sized, cv2.COLOR_BGR2HSV).astype(np.float32)
            hsv[..., 1] *= np.float32(params.dsat)
            hsv[..., 2] *= np.float32(params.dexp)
            hsv[..., 0] += np.float32(179 * params.dhue)
            hsv = np.clip(np.rint(hsv), 0, 255).astype(np.uint8)
            sized = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        else:
            sized = np.clip(np.rint(sized.astype(np.float32) * np.float32(params.dexp)), 0, 255).astype(np.uint8)
    return _to_chw_rgb(sized), new_boxes


# ---------------------------------------------------------------------------------------------------------------
# classification

@dataclass
class ClassifierParams(ColorDraw):
    """One draw of the classifier augmentation."""
    aspect: float
    crop: int           # r: the shorter side after scaling, in pixels
    rad: float          # rotation in radians
    dx: float
    dy: float
    flip: bool


@dataclass
class ClassifierAugment:
    width: int
    height: int
    min_crop: int | None = None       # default: width (Darknet's net->min_crop = net->w)
    max_crop: int | None = None       # default: 2 * width
    angle: float = 0.0
    aspect: float = 1.0
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0
    flip: bool = True

    def __post_init__(self):
        if self.min_crop is None:
            self.min_crop = self.width
        if self.max_crop is None:
            self.max_crop = 2 * self.width

    @property
    def size(self) -> int:
        return max(self.width, self.height)

    @classmethod
    def from_graph(cls, graph) -> "ClassifierAugment":
        net = graph.cfg.net
        w = graph.net["width"]
        return cls(width=w, height=graph.net["height"], min_crop=net.get_int("min_crop", w),
                   max_crop=net.get_int("max_crop", 2 * w), angle=net.get_float("angle", 0.0),
                   aspect=net.get_float("aspect", 1.0), hue=net.get_float("hue", 0.0),
                   saturation=net.get_float("saturation", 1.0), exposure=net.get_float("exposure", 1.0),
                   flip=bool(net.get_int("flip", 1)))

    def draw(self, rng: np.random.Generator, image_w: int, image_h: int) -> ClassifierParams:
        """random_augment_image's draws (aspect, crop, angle, dx, dy), then flip, then random_distort_image's."""
        aspect = rand_scale(rng, self.aspect)
        lo, hi = sorted((int(self.min_crop), int(self.max_crop)))
        r = int(rng.integers(lo, hi + 1))
        short = int(image_h if image_h < image_w * aspect else image_w * aspect)
        scale = r / max(short, 1)
        rad = _uniform(rng, -self.angle, self.angle) * 2 * math.pi / 360.0
        size = self.size
        dx = max((image_w * scale / aspect - size) / 2.0, 0.0)
        dy = max((image_h * scale - size) / 2.0, 0.0)
        dx = _uniform(rng, -dx, dx)
        dy = _uniform(rng, -dy, dy)
        flip = bool(rng.integers(2)) if self.flip else False
        return ClassifierParams(aspect, r, rad, dx, dy, flip,
                                **ColorDraw.draw(rng, self.hue, self.saturation, self.exposure))

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment one image; returns the network input (C, height, width) float32 RGB in [0, 1]."""
        params = self.draw(rng, image.shape[1], image.shape[0])
        return apply_classifier_augment(image, params, self.width, self.height)


def rotate_crop(img: np.ndarray, rad: float, scale: float, w: int, h: int, dx: float, dy: float,
                aspect: float) -> np.ndarray:
    """Darknet's rotate_crop_image on a float (H, W, C) image: output pixel (x, y) samples the input at
    R(rad) . ((x - w/2 + dx) * aspect / scale, (y - h/2 + dy) / scale) + image centre, bilinear, 0 outside."""
    ih, iw = img.shape[:2]
    c, s = math.cos(rad), math.sin(rad)
    a = aspect / scale
    b = 1.0 / scale
    cx, cy = iw / 2.0, ih / 2.0
    m = np.array([[c * a, -s * b, c * a * (dx - w / 2.0) - s * b * (dy - h / 2.0) + cx],
                  [s * a, c * b, s * a * (dx - w / 2.0) + c * b * (dy - h / 2.0) + cy]], np.float64)
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(h, w, *img.shape[2:])


def distort_hsv(img: np.ndarray, dhue: float, dsat: float, dexp: float) -> np.ndarray:
    """Darknet's distort_image on a float RGB (H, W, 3) image in [0, 1]: h += dhue (wrapped into [0, 1)),
    s *= dsat, v *= dexp, back to RGB, clamped to [0, 1]. Grey (H, W, 1) or (H, W): only v *= dexp."""
    if img.ndim == 3 and img.shape[2] >= 3:
        hsv = cv2.cvtColor(np.ascontiguousarray(img, np.float32), cv2.COLOR_RGB2HSV)
        h = hsv[..., 0] / np.float32(360.0) + np.float32(dhue)
        h = np.where(h > 1, h - 1, h)
        h = np.where(h < 0, h + 1, h)
        hsv[..., 0] = h * np.float32(360.0)
        hsv[..., 1] *= np.float32(dsat)
        hsv[..., 2] *= np.float32(dexp)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    else:
        out = img.astype(np.float32) * np.float32(dexp)
    return np.clip(out, 0.0, 1.0)


def apply_classifier_augment(image: np.ndarray, params: ClassifierParams, width: int, height: int) -> np.ndarray:
    """Apply a ClassifierParams draw to a uint8 BGR (H, W, 3) / grey (H, W) image (or float RGB/grey in [0, 1]).
    Returns (C, height, width) float32 RGB in [0, 1]."""
    img = np.asarray(image)
    if img.dtype == np.uint8:
        f = img.astype(np.float32) / np.float32(255.0)
        if f.ndim == 3:
            f = np.ascontiguousarray(f[:, :, ::-1])      # BGR -> RGB, Darknet's load_image_color
    else:
        f = np.ascontiguousarray(img, np.float32)
    if f.ndim == 2:
        f = f[:, :, None]
    ih, iw = f.shape[:2]
    size = max(width, height)
    short = int(ih if ih < iw * params.aspect else iw * params.aspect)
    scale = params.crop / max(short, 1)
    crop = rotate_crop(f, params.rad, scale, size, size, params.dx, params.dy, params.aspect)
    if params.flip:
        crop = crop[:, ::-1]
    crop = distort_hsv(crop if crop.shape[2] >= 3 else crop[:, :, 0], params.dhue, params.dsat, params.dexp)
    if crop.ndim == 2:
        crop = crop[:, :, None]
    if (width, height) != (size, size):
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, -1)
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)
