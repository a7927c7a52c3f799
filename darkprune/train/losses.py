"""Classifier losses as Darknet trains with them: the [softmax] layer's cross-entropy and the [cost] layer (sse, l1,
smooth), plus Darknet's loss bookkeeping (get_network_cost, train_network's average, the "avg loss" line).

Sign convention. Darknet's layers write `delta = truth - prediction`, a *negative* gradient, and its update adds
`learning_rate/batch * delta`. Everything here returns true gradients instead: `grad = -delta`, so that
`param -= lr * grad` descends. Losses and gradients are *sums* over the batch (Darknet divides by the batch only in
the weight update, see optimizer.py).

Each function returns a `LossResult`:
- `loss`: the objective whose exact gradient is `grad` (what finite differences check);
- `grad`: dL/d(layer input), same shape as the input;
- `darknet_cost`: what the layer stores in `*l.cost`, i.e. what Darknet adds up and prints. It differs from `loss`:
  the softmax layer's cost is sum(-log p) over every class with a nonzero truth (so with label smoothing it counts
  -log p of every class, unweighted), the sse cost is sum((t - p)^2) while its delta is (t - p), the gradient of
  half that.
- `output`: the layer's forward output (softmax probabilities; the input itself for [cost]).

Darknet's [softmax] backward does not apply the softmax Jacobian: it passes `truth - p` to the layer below as is.
That is the exact cross-entropy gradient w.r.t. the logits when temperature=1 and the truth sums to 1 per group (our
`loss` is then -sum(t log p)); with temperature T the true gradient is (p - t)/T and Darknet still passes (p - t):
we follow Darknet. A [cost] layer after a [softmax] (pjreddie's classifier cfgs) adds `scale * (t - p)` to the same
delta, so the logits then get 2(p - t) in total: sum the two `grad`s to train as Darknet does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class LossResult:
    loss: float
    grad: np.ndarray
    darknet_cost: float
    output: np.ndarray


def smoothed_targets(labels: np.ndarray, classes: int, label_smooth_eps: float = 0.0,
                     dtype=np.float32) -> np.ndarray:
    """Darknet's fill_truth_smooth: 1 - eps for the label, eps / (classes - 1) for every other class. A label of -1
    (no class name in the path) gives an all-zero row, as Darknet's fill_truth leaves it: no loss, but the
    gradient p - 0 = p still pushes every class down, as Darknet's delta does."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n = labels.size
    if np.any(labels >= classes) or np.any(labels < -1):
        raise ValueError(f"labels must lie in -1..{classes - 1}")
    t = np.zeros((n, classes), dtype)
    eps = float(label_smooth_eps)
    known = labels >= 0
    if eps:
        t[known] = eps / (classes - 1) if classes > 1 else 0.0
    t[np.flatnonzero(known), labels[known]] = 1.0 - eps if eps else 1.0
    return t


def _softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    # Darknet's order: exp(x/T - max/T) / sum
    largest = x.max(axis=1, keepdims=True)
    e = np.exp(x / temperature - largest / temperature)
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray, label_smooth_eps: float = 0.0,
                          temperature: float = 1.0, groups: int = 1) -> LossResult:
    """Darknet [softmax] layer + its cross-entropy, for training a classifier.

    logits: the softmax layer's input, (N, K) or (N, K, 1, 1) (any (N, ...) is flattened per sample and split into
    `groups` softmaxes, as Darknet's softmax_cpu does). labels: class indices (N,) (-1 = unlabeled: zero truth), or
    a dense truth array of the logits' shape (used as is, `label_smooth_eps` ignored).
    Returns loss = -sum(t log p), grad = p - t (see the module doc for T != 1), darknet_cost = sum(-log p | t != 0),
    output = p (the logits' shape and dtype)."""
    x = np.asarray(logits)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    n = x.shape[0]
    per_sample = int(np.prod(x.shape[1:]))
    if groups < 1 or per_sample % groups:
        raise ValueError(f"{per_sample} values per sample cannot be split into groups={groups}")
    labels = np.asarray(labels)
    if labels.shape == x.shape or (labels.ndim == 2 and labels.size == x.size):
        truth = labels.astype(x.dtype).reshape(n * groups, -1)
    else:
        if groups != 1:
            raise ValueError("class-index labels need groups=1; pass a dense truth array for grouped softmax")
        truth = smoothed_targets(labels, per_sample, label_smooth_eps, x.dtype)
        if truth.shape[0] != n:
            raise ValueError(f"{truth.shape[0]} labels for {n} samples")
    rows = x.reshape(n * groups, -1)
    p = _softmax(rows, x.dtype.type(temperature))
    grad = (p - truth).astype(x.dtype)
    nz = truth != 0
    with np.errstate(divide="ignore"):
        logp = np.log(p.astype(np.float64))
    loss = float(-(truth[nz].astype(np.float64) * logp[nz]).sum())
    cost = float(-logp[nz].sum())
    return LossResult(loss, grad.reshape(x.shape), cost, p.reshape(x.shape))


def cost_layer(prediction: np.ndarray, truth: np.ndarray, cost_type: str = "sse", scale: float = 1.0) -> LossResult:
    """Darknet's [cost] layer: type sse (l2_cpu), l1, or smooth (smooth_l1_cpu); `scale` multiplies the delta passed
    back (backward_cost_layer's axpy). `loss` is the objective whose gradient `grad` is:
    sse: 0.5 * scale * sum((t - p)^2) (Darknet's printed cost is sum((t - p)^2), without the 0.5 and the scale);
    l1: scale * sum|t - p|; smooth: scale * sum(0.5 d^2 if |d| < 1 else |d| - 0.5)."""
    p = np.asarray(prediction)
    t = np.asarray(truth, p.dtype).reshape(p.shape)
    d = (t - p).astype(np.float64)
    if cost_type in ("sse", "seg", "masked"):
        err = d * d
        delta = d
        loss = 0.5 * float(err.sum())
    elif cost_type == "l1":
        err = np.abs(d)
        delta = np.where(d > 0, 1.0, -1.0)
        loss = float(err.sum())
    elif cost_type == "smooth":
        a = np.abs(d)
        small = a < 1
        err = np.where(small, d * d, 2 * a - 1)
        delta = np.where(small, d, np.where(d > 0, 1.0, -1.0))
        loss = float(np.where(small, 0.5 * d * d, a - 0.5).sum())
    else:
        raise ValueError(f"cost type '{cost_type}' is not supported (sse, l1, smooth)")
    grad = (-scale * delta).astype(p.dtype)
    return LossResult(scale * loss, grad, float(err.sum()), p)


def sse(prediction: np.ndarray, truth: np.ndarray, scale: float = 1.0) -> LossResult:
    """The [cost] layer's default type: loss 0.5*scale*sum((p-t)^2), grad scale*(p-t), darknet_cost sum((t-p)^2)."""
    return cost_layer(prediction, truth, "sse", scale)


# -- Darknet's loss bookkeeping -----------------------------------------------------------------------------------

def network_cost(layer_costs: Sequence[float]) -> float:
    """get_network_cost: the mean of `*l.cost` over the layers that have one (softmax, cost, yolo, region...)."""
    costs = list(layer_costs)
    return float(sum(costs) / len(costs)) if costs else 0.0


def train_loss(subdivision_costs: Sequence[float], mini_batch: int) -> float:
    """train_network's return value: sum of network_cost over the subdivisions / (subdivisions * mini_batch), i.e.
    the per-image loss of one cfg batch. This is the `loss` Darknet prints after the iteration number."""
    costs = list(subdivision_costs)
    return float(sum(costs) / (len(costs) * mini_batch))


def update_avg_loss(avg_loss: float | None, loss: float) -> float:
    """Darknet's running "avg loss": avg = loss the first time (or after a NaN), then avg*0.9 + loss*0.1."""
    if avg_loss is None or avg_loss < 0 or math.isnan(avg_loss):
        avg_loss = loss
    return avg_loss * 0.9 + loss * 0.1
