"""Darknet-style text reports of metric dicts.

Public API
----------
``format_detection_report(metrics) -> str``       the tail of ``darknet detector map``'s printout, plus mAP@0.5:0.95.
``format_classification_report(metrics) -> str`` ``top 1`` / ``top k`` as ``darknet classifier valid`` prints them.
``format_report(metrics) -> str``                 either, chosen by the dict's keys.
"""

from __future__ import annotations

__all__ = ["format_detection_report", "format_classification_report", "format_report"]


def format_detection_report(metrics: dict) -> str:
    """Per-class AP with TP/FP, precision/recall/F1 and TP/FP/FN/average IoU at ``thresh``, then the mAPs."""
    lines = [f" detections_count = {metrics.get('detections', 0)}, unique_truth_count = {metrics.get('truths', 0)}",
             f" images = {metrics.get('images', 0)}"]
    for row in metrics["per_class"]:
        lines.append(f"class_id = {row['class']}, name = {row['name']}, ap = {row['ap'] * 100:.2f}%   \t "
                     f"(TP = {row['tp']}, FP = {row['fp']}) ")
    thresh = metrics["thresh"]
    lines.append("")
    lines.append(f" for conf_thresh = {thresh:.2f}, precision = {metrics['precision']:.2f}, "
                 f"recall = {metrics['recall']:.2f}, F1-score = {metrics['f1']:.2f} ")
    lines.append(f" for conf_thresh = {thresh:.2f}, TP = {metrics['tp']}, FP = {metrics['fp']}, FN = {metrics['fn']}, "
                 f"average IoU = {metrics['avg_iou'] * 100:.2f} % ")
    lines.append("")
    points = metrics.get("points", 0)
    how = f"used {points} Recall-points" if points else "used Area-Under-Curve for each unique Recall"
    iou = metrics.get("iou_thresh", 0.5)
    lines.append(f" IoU threshold = {iou * 100:.0f} %, {how} ")
    map50 = metrics["map50"]
    lines.append(f" mean average precision (mAP@{iou:.2f}) = {map50:.6f}, or {map50 * 100:.2f} % ")
    if "map50_95" in metrics:
        lines.append(f" mean average precision (mAP@0.50:0.95) = {metrics['map50_95']:.6f}, "
                     f"or {metrics['map50_95'] * 100:.2f} % ")
    return "\n".join(lines) + "\n"


def format_classification_report(metrics: dict) -> str:
    """``images = N`` then ``top 1: 0.xxxxxx, top k: 0.xxxxxx``."""
    topk = sorted((int(key[3:]), value) for key, value in metrics.items()
                  if key.startswith("top") and key[3:].isdigit() and key != "top1")
    parts = [f"top 1: {metrics['top1']:.6f}"] + [f"top {k}: {v:.6f}" for k, v in topk]
    return f" images = {metrics.get('images', 0)}\n {', '.join(parts)}\n"


def format_report(metrics: dict) -> str:
    """A detection report for mAP dicts, a classification report for top-k dicts."""
    if "map50" in metrics:
        return format_detection_report(metrics)
    if "top1" in metrics:
        return format_classification_report(metrics)
    raise ValueError("not a darkprune metrics dict (no 'map50' or 'top1')")
