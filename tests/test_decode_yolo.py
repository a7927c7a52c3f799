"""Decoding [yolo] / [region] outputs and Darknet's NMS kinds, on hand-built tensors with hand-computed answers."""

import math

import numpy as np
import pytest

from darkprune.engine.decode import (
    Detection,
    Detections,
    HeadParams,
    class_confidences,
    correct_yolo_boxes,
    decode_batch,
    decode_image,
    detections_to_json,
    head_params,
    nms,
    pixel_boxes,
    region_detections,
    yolo_detections,
)
from darkprune.errors import DarkpruneError

ANCHORS = [10, 14, 23, 27, 37, 58]
YOLO = dict(type="yolo", mask="1,2", anchors="10,14, 23,27, 37,58", classes=2, num=3)


def yolo_tensor(cells=4):
    """(2 anchors x (5 + 2 classes), 4, 4) with low objectness everywhere and one strong cell."""
    out = np.zeros((2, 7, cells, cells), np.float32)
    out[:, 4] = 0.001
    # anchor slot 1 (mask[1] = anchor 2 = 37 x 58), row 2, column 1
    out[1, 0, 2, 1] = 0.5               # x offset (after logistic)
    out[1, 1, 2, 1] = 0.25              # y offset
    out[1, 2, 2, 1] = math.log(2.0)     # raw w: exp -> 2
    out[1, 3, 2, 1] = 0.0               # raw h: exp -> 1
    out[1, 4, 2, 1] = 0.9               # objectness
    out[1, 5:, 2, 1] = [0.2, 0.8]       # class probabilities
    return out.reshape(14, cells, cells)


def test_yolo_one_strong_cell_gives_the_expected_box():
    dets = yolo_detections(yolo_tensor(), YOLO, net_w=128, net_h=128, thresh=0.25)
    assert len(dets) == 1
    det = dets[0]
    assert isinstance(det, Detection)
    # cx = (col + x) / 4, cy = (row + y) / 4, w = exp(tw) * 37 / 128, h = exp(th) * 58 / 128
    np.testing.assert_allclose(det.bbox, [1.5 / 4, 2.25 / 4, 2 * 37 / 128, 58 / 128], rtol=1e-6)
    assert det.objectness == pytest.approx(0.9)
    np.testing.assert_allclose(det.prob, [0, 0.72], rtol=1e-6)  # 0.9 * 0.2 = 0.18 <= 0.25 -> 0
    # In pixels of a 640 x 480 image: left = (0.375 - 0.2890625) * 640 = 55, top = (0.5625 - 0.2265625) * 480 =
    # 161.25 -> 161, width = 0.578125 * 640 = 370, height = 0.453125 * 480 = 217.5 -> 218.
    assert pixel_boxes(dets, 640, 480).tolist() == [[55, 161, 370, 218]]
    assert class_confidences(dets, 0.25) == [(1, pytest.approx(0.72))]
    assert detections_to_json(dets, 640, 480, 0.25, names=["cat", "dog"]) == [
        {"name": "dog", "class": 1, "confidence": pytest.approx(0.72), "box": [55, 161, 370, 218]}]


def test_yolo_threshold_and_order_follow_darknet():
    out = yolo_tensor().reshape(2, 7, 4, 4)
    out[0, 4, 0, 3] = 0.3  # anchor slot 0, row 0, column 3: passes thresh 0.25, class probs below it
    out[0, 5:, 0, 3] = [0.5, 0.5]
    out[0, 4, 0, 0] = np.nan  # NaN objectness never passes
    dets = yolo_detections(out.reshape(14, 4, 4), YOLO, 128, 128, thresh=0.25)
    assert len(dets) == 2
    # Darknet walks cells row-major, anchors inside: cell 3 (row 0) before cell 9 (row 2).
    np.testing.assert_allclose(dets.boxes[0, :2], [3 / 4, 0])  # x = y = 0 in that cell
    assert not dets.probs[0].any()
    # decode_image drops detections without any class probability left
    assert len(decode_image([(out.reshape(14, 4, 4), YOLO)], 128, 128, thresh=0.25)) == 1


def test_yolo_new_coords():
    out = yolo_tensor().reshape(2, 7, 4, 4)
    out[1, 2, 2, 1] = 0.5  # new_coords: w = (2 * 0.5)^2 * anchor = anchor
    out[1, 3, 2, 1] = 0.25
    params = dict(YOLO, new_coords=1)
    det = yolo_detections(out.reshape(14, 4, 4), params, 128, 128, 0.25)[0]
    np.testing.assert_allclose(det.bbox[2:], [0.5 * 0.5 * 4 * 37 / 128, 0.25 * 0.25 * 4 * 58 / 128], rtol=1e-6)


def test_letterbox_correction():
    # A 640 x 320 image letterboxed into 128 x 128 occupies rows 32..95: new_h = 320 * 128 // 640 = 64.
    boxes = np.array([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.1, 0.25]], np.float32)
    corrected = correct_yolo_boxes(boxes, 640, 320, 128, 128, letterbox=True)
    # y = (y - 32 / 128) / 0.5 and h = h / 0.5; x and w unchanged (the width fills the input)
    np.testing.assert_allclose(corrected, [[0.5, 0.5, 0.5, 1.0], [0.25, 0.0, 0.1, 0.5]], atol=1e-7)
    np.testing.assert_array_equal(correct_yolo_boxes(boxes, 640, 320, 128, 128, letterbox=False), boxes)
    absolute = correct_yolo_boxes(boxes, 640, 320, 128, 128, letterbox=True, relative=False)
    np.testing.assert_allclose(absolute[0], [320, 160, 320, 320])
    # the same through decode_image with the image size
    det = decode_image([(yolo_tensor(), YOLO)], 128, 128, image_w=640, image_h=320, letterbox=True)[0]
    assert det.bbox[1] == pytest.approx((2.25 / 4 - 0.25) / 0.5)
    assert det.bbox[3] == pytest.approx(58 / 128 / 0.5)


def test_region_head():
    # num=2 anchors in grid cells, coords=4, 3 classes, 3 x 3 grid; values already activated.
    out = np.zeros((2, 8, 3, 3), np.float32)
    out[1, 0, 0, 2], out[1, 1, 0, 2] = 0.5, 0.5
    out[1, 2, 0, 2], out[1, 3, 0, 2] = 0.0, math.log(2.0)
    out[1, 4, 0, 2] = 0.8
    out[1, 5:, 0, 2] = [0.1, 0.7, 0.2]
    params = dict(type="region", anchors="0.6,0.9, 1.5,1.2", num=2, classes=3, coords=4)
    dets = region_detections(out.reshape(16, 3, 3), params, 96, 96, thresh=0.1)
    assert len(dets) == 1
    np.testing.assert_allclose(dets.boxes[0], [2.5 / 3, 0.5 / 3, 1.5 / 3, 2 * 1.2 / 3], rtol=1e-6)
    np.testing.assert_allclose(dets.probs[0], [0, 0.56, 0.16], rtol=1e-6)


def test_shape_mismatch_and_unknown_heads_are_refused():
    with pytest.raises(DarkpruneError, match=r"\[yolo\]: output has 13 channels, expected 2 anchors"):
        yolo_detections(np.zeros((13, 4, 4), np.float32), YOLO, 128, 128)
    with pytest.raises(DarkpruneError, match=r"cannot decode a \[detection\] layer"):
        head_params({"type": "detection"})
    with pytest.raises(DarkpruneError, match="no \\[yolo\\] or \\[region\\] head"):
        decode_image([], 128, 128)
    assert head_params(YOLO) == HeadParams(kind="yolo", anchors=tuple(map(float, ANCHORS)), mask=(1, 2), classes=2,
                                           num=3)
    with pytest.warns(UserWarning, match="nms_kind=softnms unknown"):
        assert head_params(dict(YOLO, nms_kind="softnms")).nms_kind == "default"


# ----------------------------------------------------------------------------------------------------------------
# NMS


def two_class_dets(boxes, probs):
    return Detections(np.array(boxes, np.float32), np.ones(len(boxes), np.float32), np.array(probs, np.float32))


def iou(a, b):
    """Plain float64 IoU of cx, cy, w, h boxes (an independent reference)."""
    iw = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    ih = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = max(iw, 0) * max(ih, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def diou(a, b, beta):
    width = max(a[0] + a[2] / 2, b[0] + b[2] / 2) - min(a[0] - a[2] / 2, b[0] - b[2] / 2)
    height = max(a[1] + a[3] / 2, b[1] + b[3] / 2) - min(a[1] - a[3] / 2, b[1] - b[3] / 2)
    d = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    return iou(a, b) - (d / (width ** 2 + height ** 2)) ** beta


def test_nms_suppresses_the_weaker_overlapping_box_of_the_same_class_only():
    a, b, c = (0.5, 0.5, 0.2, 0.2), (0.51, 0.5, 0.2, 0.2), (0.65, 0.5, 0.2, 0.2)
    assert iou(a, b) > 0.9 and iou(a, c) < 0.45 and iou(b, c) < 0.45
    dets = two_class_dets([b, a, c], [[0.8, 0.0], [0.9, 0.0], [0.7, 0.6]])
    kept = nms(dets, 0.45)
    np.testing.assert_allclose(kept.probs, [[0, 0], [0.9, 0], [0.7, 0.6]], rtol=1e-6)
    np.testing.assert_array_equal(dets.probs[0], np.float32([0.8, 0]))  # the input is not modified
    other = two_class_dets([a, b], [[0.9, 0.0], [0.0, 0.8]])  # different classes: both stay
    np.testing.assert_array_equal(nms(other, 0.45).probs, other.probs)


def test_nms_kinds_differ_as_darknet_defines_them():
    a = (0.5, 0.5, 0.2, 0.2)
    near = (0.55, 0.5, 0.2, 0.2)    # IoU 0.6: DIoU^0.6 0.49 (suppressed), DIoU^0.3 0.27 (kept)
    far = (0.56, 0.5, 0.2, 0.2)     # IoU 0.54: DIoU^0.6 0.41 (kept by greedynms), plain IoU suppresses
    assert iou(a, near) == pytest.approx(0.6) and diou(a, near, 0.6) > 0.45 > diou(a, near, 0.3)
    assert iou(a, far) > 0.45 > diou(a, far, 0.6)
    for other, expected in [(near, {"default": 0, "cornersnms": 0, "greedynms": 0, "diounms": 0.8}),
                            (far, {"default": 0, "cornersnms": 0, "greedynms": 0.8, "diounms": 0.8})]:
        dets = two_class_dets([a, other], [[0.9, 0], [0.8, 0]])
        for kind, second in expected.items():
            out = nms(dets, 0.45, kind, beta_nms=0.3)
            assert out.probs[1, 0] == pytest.approx(second), (other, kind)
            assert out.probs[0, 0] == pytest.approx(0.9)
    # greedynms ignores beta_nms (AlexeyAB's box_diou has the exponent 0.6 built in)
    dets = two_class_dets([a, near], [[0.9, 0], [0.8, 0]])
    assert nms(dets, 0.45, "greedynms", beta_nms=0.3).probs[1, 0] == 0


def test_nms_corner_cases():
    assert len(nms(Detections.empty(3), 0.45)) == 0
    single = two_class_dets([(0.5, 0.5, 0.1, 0.1)], [[0.3, 0.4]])
    np.testing.assert_array_equal(nms(single, 0.45).probs, single.probs)
    same = two_class_dets([(0.5, 0.5, 0.1, 0.1)] * 3, [[0.3, 0], [0.3, 0], [0.5, 0]])
    np.testing.assert_allclose(nms(same, 0.45).probs[:, 0], [0, 0, 0.5])
    # equal scores: the earlier detection wins
    tie = two_class_dets([(0.5, 0.5, 0.1, 0.1)] * 2, [[0.4, 0], [0.4, 0]])
    np.testing.assert_allclose(nms(tie, 0.45).probs[:, 0], [0.4, 0])
    # objectness 0 takes no part in NMS (Darknet moves those detections out first)
    zero = Detections(np.array([(0.5, 0.5, 0.1, 0.1)] * 2, np.float32), np.array([0, 1], np.float32),
                      np.array([[0.9, 0], [0.5, 0]], np.float32))
    np.testing.assert_allclose(nms(zero, 0.45).probs[:, 0], [0.9, 0.5])
    # zero-size boxes have IoU 0 with everything
    flat = two_class_dets([(0.5, 0.5, 0.0, 0.1), (0.5, 0.5, 0.0, 0.1)], [[0.9, 0], [0.5, 0]])
    np.testing.assert_allclose(nms(flat, 0.45).probs[:, 0], [0.9, 0.5])
    with pytest.raises(DarkpruneError, match="nms_kind"):
        nms(single, 0.45, "soft")


def reference_nms(boxes, probs, objectness, thresh, kind, beta):
    """do_nms_sort / diounms_sort written out pair by pair as box.c does it, in float32 scalars."""
    f = np.float32
    probs = probs.copy()

    def overlap(a, b):
        left = max(f(a[0] - a[2] / f(2)), f(b[0] - b[2] / f(2)))
        right = min(f(a[0] + a[2] / f(2)), f(b[0] + b[2] / f(2)))
        top = max(f(a[1] - a[3] / f(2)), f(b[1] - b[3] / f(2)))
        bottom = min(f(a[1] + a[3] / f(2)), f(b[1] + b[3] / f(2)))
        w, h = f(right - left), f(bottom - top)
        inter = f(0) if w < 0 or h < 0 else f(w * h)
        union = f(f(f(a[2] * a[3]) + f(b[2] * b[3])) - inter)
        iou = f(0) if inter == 0 or union == 0 else f(inter / union)
        if kind in ("default", "cornersnms"):
            return iou
        cw = f(max(f(a[0] + a[2] / f(2)), f(b[0] + b[2] / f(2))) - min(f(a[0] - a[2] / f(2)), f(b[0] - b[2] / f(2))))
        ch = f(max(f(a[1] + a[3] / f(2)), f(b[1] + b[3] / f(2))) - min(f(a[1] - a[3] / f(2)), f(b[1] - b[3] / f(2))))
        c = f(f(cw * cw) + f(ch * ch))
        if c == 0:
            return iou
        d = f(f(f(a[0] - b[0]) * f(a[0] - b[0])) + f(f(a[1] - b[1]) * f(a[1] - b[1])))
        return f(iou - f(math.pow(float(f(d / c)), 0.6 if kind == "greedynms" else beta)))

    live = [i for i in range(len(boxes)) if objectness[i] != 0]
    for k in range(probs.shape[1]):
        order = sorted((i for i in live if probs[i, k] != 0), key=lambda i: -probs[i, k])  # stable
        for x, i in enumerate(order):
            if probs[i, k] == 0:
                continue
            for j in order[x + 1:]:
                if probs[j, k] != 0 and overlap(boxes[i], boxes[j]) > f(thresh):
                    probs[j, k] = 0
    return probs


@pytest.mark.parametrize("kind", ["default", "greedynms", "diounms", "cornersnms"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [40, 150])      # a few dozen candidates per class, and over 64 (the kernel's 2 sorts)
def test_nms_equals_box_c_pair_by_pair_on_crowded_random_detections(kind, seed, n):
    rng = np.random.default_rng(seed)
    classes = 4
    centres = rng.random((6, 2)) * 0.8 + 0.1        # crowded: most boxes overlap some others
    boxes = np.empty((n, 4), np.float32)
    boxes[:, :2] = centres[rng.integers(0, 6, n)] + rng.normal(0, 0.03, (n, 2))
    boxes[:, 2:] = rng.uniform(0.02, 0.3, (n, 2))
    boxes[::17, 2] = 0                               # some zero-size boxes
    probs = (rng.random((n, classes)) * (rng.random((n, classes)) < 0.6)).astype(np.float32)
    probs[5:9] = probs[4]                            # ties: the earlier detection wins
    boxes[5:9] = boxes[4]
    objectness = np.where(rng.random(n) < 0.1, 0, rng.random(n)).astype(np.float32)
    dets = Detections(boxes, objectness, probs)
    got = nms(dets, 0.45, kind, beta_nms=0.3).probs
    expected = reference_nms(boxes, probs, objectness, 0.45, kind, float(np.float32(0.3)))  # C float beta_nms
    assert (expected == 0).sum() > (probs == 0).sum() + n // 5   # the data really exercises suppression
    np.testing.assert_array_equal(got, expected)


def test_decode_image_uses_the_last_heads_nms_kind_and_decode_batch():
    out = yolo_tensor().reshape(2, 7, 4, 4)
    out[0, :4, 2, 1] = out[1, :4, 2, 1]  # same box from the other anchor, a bit weaker
    out[0, 2, 2, 1] = math.log(2.0 * 37 / 23)  # same width with anchor 1 (23 x 27)
    out[0, 3, 2, 1] = math.log(58 / 27)
    out[0, 4, 2, 1] = 0.8
    out[0, 5:, 2, 1] = [0.1, 0.9]
    tensor = out.reshape(14, 4, 4)
    assert len(decode_image([(tensor, YOLO)], 128, 128)) == 1
    assert len(decode_image([(tensor, YOLO)], 128, 128, nms_thresh=0)) == 2
    batch = np.stack([tensor, yolo_tensor()])
    results = decode_batch([(batch, YOLO)], 128, 128, sizes=[(640, 480), (320, 200)])
    assert [len(r) for r in results] == [1, 1]
    with pytest.raises(DarkpruneError, match="needs the original image sizes"):
        decode_batch([(batch, YOLO)], 128, 128, letterbox=True)


def test_pixel_boxes_round_halves_away_from_zero_like_c():
    dets = two_class_dets([(0.75, 0.5, 0.25, 0.5)], [[1, 0]])
    # left = 0.625 * 4 = 2.5 -> 3 (numpy's round would give 2), width = 1
    assert pixel_boxes(dets, 4, 4).tolist() == [[3, 1, 1, 2]]
    assert Detections.from_list(list(dets)).boxes.tolist() == dets.boxes.tolist()
