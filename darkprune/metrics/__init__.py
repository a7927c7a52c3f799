"""Accuracy metrics computed as Darknet does: detection mAP (``detector map``) and top-k (``classifier valid``).

See :mod:`darkprune.metrics.detection`, :mod:`darkprune.metrics.classification` and the Darknet-style text reports in
:mod:`darkprune.metrics.report`.
"""

from darkprune.metrics.classification import ClassificationEvaluator, topk_accuracy
from darkprune.metrics.detection import COCO_IOU_THRESHOLDS, DetectionEvaluator, average_precision, detection_map
from darkprune.metrics.report import format_classification_report, format_detection_report, format_report

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "ClassificationEvaluator",
    "DetectionEvaluator",
    "average_precision",
    "detection_map",
    "format_classification_report",
    "format_detection_report",
    "format_report",
    "topk_accuracy",
]
