"""Darknet's `detector map` on hand-computed cases, and on the real coco128 set against Darknet's printed figure."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from darkprune.engine.decode import Detection, Detections
from darkprune.metrics import DetectionEvaluator, detection_map, format_report
from darkprune.metrics.detection import average_precision, iou_matrix

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def dets(rows, classes):
    """rows: (cx, cy, w, h, class, prob) -> Detections with one class probability each."""
    boxes = np.array([r[:4] for r in rows], np.float32).reshape(-1, 4)
    probs = np.zeros((len(rows), classes), np.float32)
    for i, r in enumerate(rows):
        probs[i, r[4]] = r[5]
    return Detections(boxes, np.ones(len(rows), np.float32), probs)


def truths(rows):
    return np.array([(c, x, y, w, h) for x, y, w, h, c in rows], np.float32).reshape(-1, 5)


# Five separate ground-truth boxes of class 0 in one image.
GT5 = [(0.1 + 0.2 * i, 0.5, 0.1, 0.1, 0) for i in range(5)]


def fp_box(i):
    return (0.1 + 0.2 * i, 0.1, 0.05, 0.05)  # far from every truth


def test_perfect_detections_score_one():
    images_truth = [truths([(0.3, 0.3, 0.2, 0.4, 0), (0.7, 0.6, 0.3, 0.2, 1)]), truths([(0.5, 0.5, 0.5, 0.5, 2)])]
    images_dets = [dets([(0.3, 0.3, 0.2, 0.4, 0, 0.9), (0.7, 0.6, 0.3, 0.2, 1, 0.8)], 3),
                   dets([(0.5, 0.5, 0.5, 0.5, 2, 0.7)], 3)]
    m = detection_map(images_dets, images_truth, 3, ["a", "b", "c"])
    assert m["map50"] == 1.0 and m["map50_95"] == 1.0
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)
    assert m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["avg_iou"] == pytest.approx(1.0)
    assert m["images"] == 2 and m["truths"] == 3 and m["detections"] == 3
    assert [c["ap"] for c in m["per_class"]] == [1.0, 1.0, 1.0]
    for points in (11, 101):
        assert detection_map(images_dets, images_truth, 3, points=points)["map50"] == pytest.approx(1.0)


def test_known_pr_curve_all_point_and_11_point():
    # Ranked by probability: TP, FP, TP, FP, TP, FP with 5 truths.
    # precision 1, 1/2, 2/3, 1/2, 3/5, 1/2 ; recall .2, .2, .4, .4, .6, .6
    rows = [(*GT5[0][:4], 0, 0.9), (*fp_box(0), 0, 0.8), (*GT5[1][:4], 0, 0.7), (*fp_box(1), 0, 0.6),
            (*GT5[2][:4], 0, 0.5), (*fp_box(2), 0, 0.4)]
    d, t = [dets(rows, 1)], [truths(GT5)]
    # All points: 0.2 x 1 + 0.2 x 2/3 + 0.2 x 0.6 = 0.453333...
    assert detection_map(d, t, 1)["map50"] == pytest.approx(0.2 + 0.2 * 2 / 3 + 0.2 * 0.6)
    # 11 points (recall 0, .1, ..., 1): 1, 1, 1, 2/3, 2/3, .6, 0, 0, 0, 0, 0 -> 4.9333 / 11 = 0.44848. The point
    # at recall .6 scores 0: Darknet's -Ofast build computes it as 6 * 0.1 = 0.6000000000000001, which the recall
    # 3/5 = 0.6 does not reach (its printed 11-point mAP on coco128 agrees only this way; tests/test_darknet_binary.py)
    assert detection_map(d, t, 1, points=11)["map50"] == pytest.approx((3 + 4 / 3 + 0.6) / 11)
    assert 6 * (1.0 / 10) > 3 / 5  # the arithmetic the comment above relies on
    # 101 points: 21 points at 1, 20 at 2/3, 20 at 0.6, 40 at 0 -> 46.333 / 101
    assert detection_map(d, t, 1, points=101)["map50"] == pytest.approx((21 + 20 * 2 / 3 + 20 * 0.6) / 101)
    m = detection_map(d, t, 1)
    # at conf 0.25 all six count: TP 3, FP 3, FN 2
    assert (m["tp"], m["fp"], m["fn"]) == (3, 3, 2)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert m["avg_iou"] == pytest.approx(3 / 6)  # IoU 1 for each TP, divided by TP + FP as Darknet does


def test_average_precision_loops_directly():
    recall = np.array([0.2, 0.2, 0.4, 0.4, 0.6, 0.6])
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5, 1 / 2])
    assert average_precision(recall, precision, 0) == pytest.approx(0.45333333333)
    assert average_precision(recall, precision, 11) == pytest.approx((3 + 4 / 3 + 0.6) / 11)  # 6 * 0.1 > 0.6
    # recall 0.6 as an exact float is reached once the points are computed by division instead
    assert average_precision(recall + 1e-12, precision, 11) == pytest.approx((3 + 4 / 3 + 1.2) / 11)
    assert average_precision(np.array([]), np.array([]), 0) == 0.0


def test_duplicates_become_false_positives():
    t = [truths([(0.5, 0.5, 0.2, 0.2, 0)])]
    d = [dets([(0.5, 0.5, 0.2, 0.2, 0, 0.9), (0.505, 0.5, 0.2, 0.2, 0, 0.8)], 1)]
    m = detection_map(d, t, 1)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["map50"] == pytest.approx(1.0)  # the duplicate ranks after the recall already reached 1
    assert m["per_class"][0]["tp"] == 1 and m["per_class"][0]["fp"] == 1
    # the duplicate ranked first takes the truth: then the exact box is the false positive
    d = [dets([(0.5, 0.5, 0.2, 0.2, 0, 0.8), (0.505, 0.5, 0.2, 0.2, 0, 0.9)], 1)]
    assert detection_map(d, t, 1)["map50"] == pytest.approx(1.0)


def test_class_without_ground_truth_scores_zero_and_counts_in_the_mean():
    t = [truths([(0.5, 0.5, 0.2, 0.2, 0)])]
    d = [dets([(0.5, 0.5, 0.2, 0.2, 0, 0.9), (0.2, 0.2, 0.1, 0.1, 1, 0.6)], 3)]
    m = detection_map(d, t, 3)
    assert [c["ap"] for c in m["per_class"]] == [1.0, 0.0, 0.0]
    assert m["map50"] == pytest.approx(1 / 3)
    assert m["per_class"][1]["fp"] == 1 and m["per_class"][1]["truths"] == 0
    assert detection_map(d, t, 3, points=11)["map50"] == pytest.approx(1 / 3)


def test_no_detections():
    t = [truths([(0.5, 0.5, 0.2, 0.2, 0)]), truths([])]
    m = detection_map([Detections.empty(2), []], t, 2)
    assert m["map50"] == 0.0 and m["map50_95"] == 0.0
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 1)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["avg_iou"] == 0.0
    empty = detection_map([[]], [np.zeros((0, 5))], 2)
    assert empty["map50"] == 0.0 and empty["truths"] == 0 and empty["images"] == 1


def test_wrong_class_and_low_iou_do_not_match():
    t = [truths([(0.5, 0.5, 0.2, 0.2, 0)])]
    d = [dets([(0.5, 0.5, 0.2, 0.2, 1, 0.9), (0.6, 0.5, 0.2, 0.2, 0, 0.8)], 2)]  # IoU 1/3 for the right class
    m = detection_map(d, t, 2)
    assert m["map50"] == 0.0 and (m["tp"], m["fp"]) == (0, 2)


def test_map_50_95_with_a_known_iou():
    # Same centre, width 0.2 vs 0.2, height 0.146 vs 0.2: IoU 0.73 -> TP for IoU thresholds 0.50 .. 0.70 only.
    t = [truths([(0.5, 0.5, 0.2, 0.2, 0)])]
    d = [dets([(0.5, 0.5, 0.2, 0.146, 0, 0.9)], 1)]
    assert iou_matrix(d[0].boxes, t[0][:, 1:])[0, 0] == pytest.approx(0.73, abs=1e-6)
    m = detection_map(d, t, 1)
    assert m["map50"] == 1.0 and m["map50_95"] == pytest.approx(0.5)
    assert m["map_per_iou"]["0.70"] == 1.0 and m["map_per_iou"]["0.75"] == 0.0
    assert m["avg_iou"] == pytest.approx(0.73, abs=1e-6)
    assert detection_map(d, t, 1, iou_thresh=0.75)["map50"] == 0.0


def test_conf_thresh_counts_follow_darknet_per_image_order():
    # Darknet counts TP/FP at conf_thresh per image in detection order: an earlier pair below the threshold that
    # matched the truth makes a later confident pair a FP there, while the ranked PR curve still counts it as TP.
    t = [truths([(0.5, 0.5, 0.2, 0.2, 0)])]
    d = [dets([(0.5, 0.5, 0.2, 0.2, 0, 0.1), (0.5, 0.5, 0.2, 0.2, 0, 0.9)], 1)]
    m = detection_map(d, t, 1)
    assert (m["tp"], m["fp"]) == (0, 1)
    assert m["map50"] == 1.0
    # below thresh nothing is counted
    m = detection_map(d, t, 1, thresh=0.95)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 1)


def test_inputs_as_detection_lists_and_streaming():
    t = truths([(0.5, 0.5, 0.2, 0.2, 0)])
    as_list = [Detection((0.5, 0.5, 0.2, 0.2), 0.9, np.array([0.9, 0], np.float32))]
    evaluator = DetectionEvaluator(2, ["x", "y"])
    evaluator.add(as_list, t)
    evaluator.add(dets([(0.5, 0.5, 0.2, 0.2, 0, 0.8)], 2), t)
    assert evaluator.result()["map50"] == pytest.approx(0.5)  # class 1 has no truth: AP 0
    assert evaluator.result(points=11)["points"] == 11
    with pytest.warns(UserWarning, match="class outside"):
        evaluator.add([], truths([(0.5, 0.5, 0.2, 0.2, 5)]))


def test_report_looks_like_darknet():
    t = [truths(GT5)]
    d = [dets([(*GT5[0][:4], 0, 0.9), (*fp_box(0), 0, 0.8)], 1)]
    text = format_report(detection_map(d, t, 1, ["person"]))
    assert "class_id = 0, name = person, ap = 20.00%   \t (TP = 1, FP = 1) " in text
    assert " for conf_thresh = 0.25, precision = 0.50, recall = 0.20, F1-score = 0.29 " in text
    assert " for conf_thresh = 0.25, TP = 1, FP = 1, FN = 4, average IoU = 50.00 % " in text
    assert " IoU threshold = 50 %, used Area-Under-Curve for each unique Recall " in text
    assert " mean average precision (mAP@0.50) = 0.200000, or 20.00 % " in text
    assert "used 11 Recall-points" in format_report(detection_map(d, t, 1, points=11))


def test_coco128_with_opencv_forward_reproduces_darknet_map():
    """yolo-fastest-1.1 on coco128: OpenCV computes the raw head convolutions from our Darknet-resized inputs, the
    logistic is applied as forward_yolo_layer does, and our decode + greedynms + mAP must land on the figure
    AlexeyAB's `darknet detector map` prints for this set (0.328778; OpenCV's batch-norm eps and JPEG decoder differ
    from Darknet's, so a small gap remains). Plain IoU NMS instead of greedynms moves it measurably."""
    cv2 = pytest.importorskip("cv2")
    model = ASSETS / "models" / "yolo-fastest-1.1"
    data = ASSETS / "coco128" / "coco128.data"
    if not (model.exists() and data.exists()):
        pytest.skip("assets not present")
    from darkprune.data import load_data, preprocess_batch
    from darkprune.engine.decode import decode_image

    net = cv2.dnn.readNetFromDarknet(str(model / "yolo-fastest-1.1.cfg"), str(model / "yolo-fastest-1.1.weights"))
    names = net.getLayerNames()
    heads_out = [names[names.index(n) - 2] for n in net.getUnconnectedOutLayersNames()]  # conv before permute+yolo
    anchors = "12,18, 37,49, 52,132, 115,73, 119,199, 242,238"
    params = [dict(type="yolo", mask="3,4,5", anchors=anchors, classes=80, num=6, nms_kind="greedynms"),
              dict(type="yolo", mask="0,1,2", anchors=anchors, classes=80, num=6, nms_kind="greedynms")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_data(data)
    inputs, _ = preprocess_batch(ds.image_paths, 320, 320)
    greedy, plain = [], []
    for x in inputs:
        net.setInput(x[None])
        heads = []
        for raw, p in zip(net.forward(heads_out), params):
            out = raw[0].reshape(3, 85, *raw.shape[2:]).astype(np.float64)
            out[:, [0, 1]] = 1 / (1 + np.exp(-out[:, [0, 1]]))
            out[:, 4:] = 1 / (1 + np.exp(-out[:, 4:]))
            heads.append((out.reshape(255, *raw.shape[2:]).astype(np.float32), p))
        greedy.append(decode_image(heads, 320, 320, thresh=0.005, nms_thresh=0.45))
        plain.append(decode_image(heads, 320, 320, thresh=0.005, nms_thresh=0.45, nms_kind="default"))
    m = detection_map(greedy, ds.boxes, ds.classes, ds.names)
    assert m["images"] == 128 and m["truths"] == 898
    assert m["map50"] == pytest.approx(0.328778, abs=0.003)
    assert 0 < m["map50_95"] < m["map50"]
    assert abs(detection_map(plain, ds.boxes, ds.classes)["map50"] - m["map50"]) > 0.001
