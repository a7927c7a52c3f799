"""Top-1 / top-k accuracy the way Darknet's ``classifier valid`` counts it.

Public API
----------
``topk_accuracy(scores, labels, k=5) -> dict``
    ``scores`` (N, classes) network outputs, ``labels`` (N,) class indices (-1 = unlabelled, always wrong).
    Returns ``{"top1", f"top{k}", "images"}`` (fractions 0..1); ``{"top1", "top5", "images"}`` for k=5.
``ClassificationEvaluator(k=5)``: the same, streaming: ``add(scores, labels)`` per batch, then ``result()``.

Ranking as Darknet's ``top_k``: higher score first, the lower class index first among equal scores. With fewer than
k classes, top-k counts all of them.
"""

from __future__ import annotations

import numpy as np

from darkprune.errors import DarkpruneError

__all__ = ["ClassificationEvaluator", "topk_accuracy"]


class ClassificationEvaluator:
    """Accumulates top-1 and top-k hits over batches."""

    def __init__(self, k: int = 5):
        if k < 1:
            raise DarkpruneError(f"top-k needs k >= 1, not {k}")
        self.k = int(k)
        self.images = 0
        self.top1_hits = 0
        self.topk_hits = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.asarray(scores, np.float32)
        if scores.ndim == 1:
            scores = scores[None, :]
        scores = scores.reshape(scores.shape[0], -1)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(labels) != len(scores):
            raise DarkpruneError(f"{len(scores)} score rows for {len(labels)} labels")
        k = min(self.k, scores.shape[1])
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: lower index first, as Darknet's top_k
        self.top1_hits += int((ranked[:, 0] == labels).sum())
        self.topk_hits += int((ranked == labels[:, None]).any(axis=1).sum())
        self.images += len(labels)

    def result(self) -> dict:
        n = self.images
        return {"top1": self.top1_hits / n if n else 0.0, f"top{self.k}": self.topk_hits / n if n else 0.0,
                "images": n}


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 5) -> dict:
    """``{"top1", f"top{k}", "images"}`` for scores (N, classes) and labels (N,)."""
    evaluator = ClassificationEvaluator(k)
    evaluator.add(scores, labels)
    return evaluator.result()
