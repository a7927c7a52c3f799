"""Darknet-style augmentation: boxes follow their objects through jitter/flip/letterbox, flips are involutions,
colour changes match hand-computed HSV values, the classifier crop/rotation follows Darknet's inverse map, and a seed
fixes the output."""
import math

import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.darknet.graph import build_graph
from darkprune.train.augment import (ClassifierAugment, ClassifierParams, DetectionAugment, DetectionParams,
                                     apply_classifier_augment, apply_detection_augment, distort_hsv, transform_boxes)


def scene(w=160, h=120, rect=(50, 30, 90, 70), background=60):
    """A grey BGR image with a white rectangle [x0, x1) x [y0, y1), and its box row."""
    img = np.full((h, w, 3), background, np.uint8)
    x0, y0, x1, y1 = rect
    img[y0:y1, x0:x1] = 255
    box = np.array([[3, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]], np.float32)
    return img, box


def to_bgr_uint8(chw):
    return np.ascontiguousarray(np.rint(chw * 255).astype(np.uint8).transpose(1, 2, 0)[:, :, ::-1])


def bright_extent(chw, thresh=0.8):
    """Normalised (left, top, right, bottom) of the pixels brighter than thresh, or None."""
    m = chw.min(axis=0) > thresh
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    h, w = m.shape
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


def test_flip_twice_is_identity():
    img, box = scene(96, 96)
    boxes = np.vstack([box, [[1, 0.2, 0.7, 0.1, 0.3]]]).astype(np.float32)
    flip = DetectionParams(0, 0, 0, 0, True)
    once_img, once = apply_detection_augment(img, boxes, flip, 96, 96)
    assert not np.allclose(once[:, 1], boxes[:, 1])
    np.testing.assert_allclose(once[:, 1], 1 - boxes[:, 1], atol=1e-6)          # mirrored centres
    twice_img, twice = apply_detection_augment(to_bgr_uint8(once_img), once, flip, 96, 96)
    np.testing.assert_allclose(twice, boxes, atol=1e-6)
    np.testing.assert_array_equal(twice_img, apply_detection_augment(img, boxes, DetectionParams(0, 0, 0, 0, False),
                                                                     96, 96)[0])
    # also with a crop: box transforms compose to the identity under a double flip
    p = DetectionParams(-7, 12, 5, -3, True)
    b1 = transform_boxes(boxes, p, 96, 96, 96, 96)
    p2 = DetectionParams(0, 0, 0, 0, True)
    np.testing.assert_allclose(transform_boxes(transform_boxes(b1, p2, 96, 96, 96, 96), p2, 96, 96, 96, 96), b1,
                               atol=1e-6)


@pytest.mark.parametrize("rect", [(50, 30, 90, 70), (2, 4, 30, 40)])     # middle; corner (clipped / dropped)
@pytest.mark.parametrize("seed", range(16))
def test_box_stays_on_its_object_after_jitter(seed, rect):
    img, box = scene(rect=rect)
    aug = DetectionAugment(96, 80, jitter=0.3, flip=True)
    out, boxes = aug(img, box, np.random.default_rng(seed))
    assert out.shape == (3, 80, 96) and out.dtype == np.float32
    extent = bright_extent(out)
    if len(boxes) == 0:                              # the object left the crop: nothing bright may remain
        assert extent is None or (extent[2] - extent[0]) * 96 < 2 or (extent[3] - extent[1]) * 80 < 2
        return
    cls, cx, cy, w, h = boxes[0]
    assert cls == 3
    left, top, right, bottom = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    assert extent is not None
    # edges agree within ~1.5 network pixels (bilinear resize smears an edge over a pixel)
    err = np.abs(np.subtract(extent, [left, top, right, bottom])) * [96, 80, 96, 80]
    assert err.max() <= 1.5, (extent, (left, top, right, bottom), err)


def test_boxes_leaving_the_image_are_dropped_and_clipped():
    boxes = np.array([[0, 0.1, 0.5, 0.1, 0.2],      # at the left edge
                      [1, 0.6, 0.5, 0.3, 0.2]], np.float32)
    # crop 40 px off the left of a 200 px image: box 0 (x 10..30 px) leaves, box 1 is kept and shifted
    p = DetectionParams(40, 0, 0, 0, False)
    out = transform_boxes(boxes, p, 200, 100, 100, 100)
    assert len(out) == 1 and out[0, 0] == 1
    np.testing.assert_allclose(out[0, 1:], [(120 - 40) / 160, 0.5, 60 / 160, 0.2], atol=1e-6)
    # crop half of box 1 away on the right: clipped to the image edge
    p = DetectionParams(0, 70, 0, 0, False)
    out = transform_boxes(boxes, p, 200, 100, 100, 100)
    np.testing.assert_allclose(out[1, 1:], [(90 + 130) / 2 / 130, 0.5, 40 / 130, 0.2], atol=1e-6)
    # classes beyond `classes` and boxes beyond num_boxes are dropped, as fill_truth_detection does
    assert len(transform_boxes(boxes, DetectionParams(0, 0, 0, 0, False), 200, 100, 100, 100, classes=1)) == 1
    assert len(transform_boxes(boxes, DetectionParams(0, 0, 0, 0, False), 200, 100, 100, 100, num_boxes=1)) == 1


def test_padding_uses_the_image_mean_and_letterbox_keeps_aspect():
    img, box = scene(200, 100, rect=(80, 30, 120, 70))            # a 40x40 square in a 2:1 image
    aug = DetectionAugment(96, 96, jitter=0.0, letter_box=True, flip=False)
    out, boxes = aug(img, box, np.random.default_rng(0))
    cx, cy, w, h = boxes[0, 1:]
    assert w * 96 == pytest.approx(h * 96, abs=0.5)                # still square
    extent = bright_extent(out)
    assert (extent[2] - extent[0]) == pytest.approx(w, abs=1.5 / 96)
    mean = img.reshape(-1, 3).mean(axis=0)[::-1] / 255           # padding rows (top) hold the mean colour
    np.testing.assert_allclose(out[:, 0, 0], np.rint(mean * 255) / 255, atol=1 / 255)


def test_same_seed_same_output():
    img, box = scene()
    aug = DetectionAugment(96, 96, jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5)
    a = aug(img, box, np.random.default_rng(42))
    b = aug(img, box, np.random.default_rng(42))
    c = aug(img, box, np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    cls_aug = ClassifierAugment(32, 32, angle=15, aspect=1.2, hue=0.1, saturation=1.5, exposure=1.5)
    np.testing.assert_array_equal(cls_aug(img, np.random.default_rng(7)), cls_aug(img, np.random.default_rng(7)))
    assert not np.array_equal(cls_aug(img, np.random.default_rng(7)), cls_aug(img, np.random.default_rng(8)))


def test_detection_hsv_in_opencv_8bit():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 2] = 255                                              # BGR pure red, H = 0
    # hue +1/3: H += 179/3 -> 60 (OpenCV's 8-bit H is degrees / 2): green
    out, _ = apply_detection_augment(red, np.zeros((0, 5)), DetectionParams(0, 0, 0, 0, False, dhue=1 / 3), 8, 8)
    np.testing.assert_allclose(out[:, 0, 0], [0, 1, 0], atol=1 / 255)
    # hue -x saturates at 0 (no wrap): red stays red
    out, _ = apply_detection_augment(red, np.zeros((0, 5)), DetectionParams(0, 0, 0, 0, False, dhue=-0.2), 8, 8)
    np.testing.assert_allclose(out[:, 0, 0], [1, 0, 0], atol=1 / 255)
    # saturation 0.5: S = 128 -> min channel = 255 * (1 - 128/255) = 127
    out, _ = apply_detection_augment(red, np.zeros((0, 5)), DetectionParams(0, 0, 0, 0, False, dsat=0.5), 8, 8)
    np.testing.assert_allclose(out[:, 0, 0] * 255, [255, 127, 127], atol=1.01)
    # exposure 0.5: V = 128
    out, _ = apply_detection_augment(red, np.zeros((0, 5)), DetectionParams(0, 0, 0, 0, False, dexp=0.5), 8, 8)
    np.testing.assert_allclose(out[:, 0, 0] * 255, [128, 0, 0], atol=1.01)


def test_classifier_identity_crop_and_rotation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgb = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255
    ident = ClassifierParams(aspect=1.0, crop=32, rad=0.0, dx=0.0, dy=0.0, flip=False)
    np.testing.assert_allclose(apply_classifier_augment(img, ident, 32, 32), rgb, atol=1e-6)
    flipped = ClassifierParams(1.0, 32, 0.0, 0.0, 0.0, True)
    np.testing.assert_allclose(apply_classifier_augment(img, flipped, 32, 32), rgb[:, :, ::-1], atol=1e-6)
    # 90 degrees about Darknet's centre (w/2, h/2) = (16, 16): out(x, y) = in(32 - y, x)
    rot = apply_classifier_augment(img, ClassifierParams(1.0, 32, math.pi / 2, 0.0, 0.0, False), 32, 32)
    expect = np.zeros_like(rgb)
    expect[:, 1:, :] = np.rot90(rgb, k=1, axes=(1, 2))[:, :-1, :]
    np.testing.assert_allclose(rot, expect, atol=1e-5)


def test_classifier_scale_and_shift():
    img = np.zeros((64, 64), np.uint8)                             # grey, 16x16 bright square in the middle
    img[24:40, 24:40] = 255
    # shorter side scaled to 32 -> factor 0.5, centred crop of 32: the square lands on [12, 20)
    out = apply_classifier_augment(img, ClassifierParams(1.0, 32, 0.0, 0.0, 0.0, False), 32, 32)
    assert out.shape == (1, 32, 32)
    ys, xs = np.nonzero(out[0] > 0.9)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (12, 19, 12, 19)
    # dx shifts the window right by dx output pixels: the square moves left
    out = apply_classifier_augment(img, ClassifierParams(1.0, 32, 0.0, 4.0, -2.0, False), 32, 32)
    ys, xs = np.nonzero(out[0] > 0.9)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 15, 14, 21)


def test_distort_hsv_float_like_darknet():
    red = np.zeros((2, 2, 3), np.float32)
    red[..., 0] = 1.0
    np.testing.assert_allclose(distort_hsv(red, 1 / 3, 1, 1)[0, 0], [0, 1, 0], atol=1e-5)
    np.testing.assert_allclose(distort_hsv(red, -1 / 3, 1, 1)[0, 0], [0, 0, 1], atol=1e-5)   # wraps to blue
    np.testing.assert_allclose(distort_hsv(red, 0, 0.5, 0.5)[0, 0], [0.5, 0.25, 0.25], atol=1e-5)
    np.testing.assert_allclose(distort_hsv(red, 0, 1, 2.0)[0, 0], [1, 0, 0], atol=1e-6)     # clamped
    grey = np.full((2, 2), 0.4, np.float32)
    np.testing.assert_allclose(distort_hsv(grey, 0.3, 3.0, 1.5), 0.6, atol=1e-6)


def test_from_graph_reads_the_cfg():
    cfg = parse_cfg_text("""[net]
width=64
height=48
channels=3
hue=.1
saturation=1.5
exposure=1.4
flip=0
angle=7
max_crop=80
[convolutional]
filters=14
size=1
activation=linear
[yolo]
mask=0,1
anchors=10,14, 23,27
classes=2
num=2
jitter=.3
max=90
""")
    g = build_graph(cfg)
    d = DetectionAugment.from_graph(g)
    assert (d.width, d.height, d.jitter, d.hue, d.saturation, d.exposure, d.flip, d.num_boxes, d.classes) == \
        (64, 48, 0.3, 0.1, 1.5, 1.4, False, 90, 2)
    c = ClassifierAugment.from_graph(g)
    assert (c.min_crop, c.max_crop, c.angle, c.aspect, c.flip) == (64, 80, 7.0, 1.0, False)


def test_real_image_with_its_labels():
    from conftest import BUNDLED_CFG, asset
    from darkprune.darknet.cfg import read_cfg
    from darkprune.data.darknet_data import read_detection_labels
    from darkprune.data.preprocess import load_image

    image_path = asset("coco128", "images", "train2017", "000000000009.jpg")
    labels, _ = read_detection_labels(asset("coco128", "labels", "train2017", "000000000009.txt"), 80)
    img = load_image(image_path)
    aug = DetectionAugment.from_graph(build_graph(read_cfg(BUNDLED_CFG)))
    for seed in range(4):
        out, boxes = aug(img, labels, np.random.default_rng(seed))
        assert out.shape == (3, 320, 320) and 0 <= out.min() and out.max() <= 1
        assert 0 < len(boxes) <= len(labels)
        assert np.isin(boxes[:, 0], labels[:, 0]).all()
        left, right = boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 1] + boxes[:, 3] / 2
        assert (left >= -1e-6).all() and (right <= 1 + 1e-6).all() and (boxes[:, 3] >= 1 / 320).all()
