"""Top-1 / top-k accuracy as Darknet's `classifier valid` counts it."""

import numpy as np
import pytest

from darkprune.errors import DarkpruneError
from darkprune.metrics import ClassificationEvaluator, format_report, topk_accuracy


def test_top1_top5_hand_counted():
    scores = np.array([
        [0.1, 0.7, 0.2, 0.0, 0.0, 0.0, 0.0],   # label 1: top-1 hit
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05],  # label 3: rank 2 (tie with 1, 2, 4: lower index first) -> top-5 hit
        [0.3, 0.2, 0.15, 0.1, 0.09, 0.08, 0.08],  # label 6: rank 7 -> miss
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],   # label -1 (no label matched): always wrong
    ], np.float32)
    labels = np.array([1, 3, 6, -1])
    result = topk_accuracy(scores, labels)
    assert result == {"top1": 0.25, "top5": 0.5, "images": 4}


def test_ties_rank_the_lower_class_first():
    scores = np.full((1, 10), 0.1, np.float32)
    assert topk_accuracy(scores, [0], k=1)["top1"] == 1.0
    assert topk_accuracy(scores, [1], k=1)["top1"] == 0.0
    assert topk_accuracy(scores, [4], k=5)["top5"] == 1.0
    assert topk_accuracy(scores, [5], k=5)["top5"] == 0.0


def test_fewer_classes_than_k_and_streaming():
    evaluator = ClassificationEvaluator(k=5)
    evaluator.add(np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([0, 0]))
    evaluator.add(np.array([0.3, 0.7]), np.array([1]))
    assert evaluator.result() == {"top1": pytest.approx(2 / 3), "top5": 1.0, "images": 3}
    assert ClassificationEvaluator().result() == {"top1": 0.0, "top5": 0.0, "images": 0}
    with pytest.raises(DarkpruneError, match="score rows"):
        evaluator.add(np.zeros((2, 3)), np.zeros(3))


def test_report():
    text = format_report({"top1": 0.9548, "top5": 0.9991, "images": 10000})
    assert text == " images = 10000\n top 1: 0.954800, top 5: 0.999100\n"
    with pytest.raises(ValueError):
        format_report({"accuracy": 1})
