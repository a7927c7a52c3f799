"""Classifier losses (Darknet's softmax cross-entropy with label smoothing, the [cost] layer) against central finite
differences in float64 and hand-computed values, and Darknet's loss bookkeeping."""
import math

import numpy as np
import pytest

from darkprune.train.losses import (cost_layer, network_cost, smoothed_targets, softmax_cross_entropy, sse,
                                    train_loss, update_avg_loss)

from conftest import central_grad

EPS = 1e-6


def numeric_grad(f, x):
    return central_grad(f, x, EPS)


def reference_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_cross_entropy_gradient_matches_finite_differences(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)) * 2
    labels = np.array([0, 3, 6, 2, 3])
    res = softmax_cross_entropy(logits, labels, label_smooth_eps=eps)
    num = numeric_grad(lambda: softmax_cross_entropy(logits, labels, label_smooth_eps=eps).loss, logits)
    np.testing.assert_allclose(res.grad, num, rtol=1e-6, atol=1e-9)
    # by hand: the loss is -sum(t log p) with Darknet's smoothed truth
    p = reference_softmax(logits)
    t = np.full((5, 7), eps / 6)
    t[np.arange(5), labels] = 1 - eps
    assert res.loss == pytest.approx(float(-(t * np.log(p)).sum()), rel=1e-12)
    np.testing.assert_allclose(res.output, p, rtol=1e-12)
    # Darknet's printed cost: -log p of every class with a nonzero truth, unweighted
    expect_cost = float(-np.log(p[np.arange(5), labels]).sum()) if eps == 0 else float(-np.log(p).sum())
    assert res.darknet_cost == pytest.approx(expect_cost, rel=1e-12)


def test_softmax_cross_entropy_shapes_groups_and_temperature():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 1, 1)).astype(np.float32)
    res = softmax_cross_entropy(x, np.array([1, 5, 0]))
    assert res.grad.shape == x.shape and res.grad.dtype == np.float32
    np.testing.assert_allclose(res.grad.sum(axis=1), 0, atol=1e-6)          # p - onehot sums to 0
    # temperature: Darknet still passes p - t (its softmax backward ignores 1/T)
    r2 = softmax_cross_entropy(x.astype(np.float64), np.array([1, 5, 0]), temperature=2.0)
    p = reference_softmax(x.reshape(3, 6).astype(np.float64) / 2)
    t = np.eye(6)[[1, 5, 0]]
    np.testing.assert_allclose(r2.grad.reshape(3, 6), p - t, rtol=1e-12)
    # groups: two softmaxes per sample, dense truth
    z = rng.normal(size=(2, 8))
    truth = np.zeros((2, 8))
    truth[0, 1] = truth[0, 6] = truth[1, 3] = truth[1, 4] = 1
    rg = softmax_cross_entropy(z, truth, groups=2)
    num = numeric_grad(lambda: softmax_cross_entropy(z, truth, groups=2).loss, z)
    np.testing.assert_allclose(rg.grad, num, rtol=1e-6, atol=1e-9)


def test_smoothed_targets_like_fill_truth_smooth():
    t = smoothed_targets(np.array([2, -1]), 4, 0.1)
    np.testing.assert_allclose(t[0], [0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3], rtol=1e-6)
    assert not t[1].any()                                                   # unlabeled: zero truth
    np.testing.assert_array_equal(smoothed_targets(np.array([1]), 3), [[0, 1, 0]])
    with pytest.raises(ValueError):
        smoothed_targets(np.array([4]), 4)


def test_sse_and_cost_layer():
    rng = np.random.default_rng(2)
    p = rng.normal(size=(4, 5))
    t = rng.normal(size=(4, 5))
    r = sse(p, t, scale=1.5)
    np.testing.assert_allclose(r.grad, 1.5 * (p - t), rtol=1e-12)
    assert r.darknet_cost == pytest.approx(float(((t - p) ** 2).sum()))
    num = numeric_grad(lambda: sse(p, t, scale=1.5).loss, p)
    np.testing.assert_allclose(r.grad, num, rtol=1e-6, atol=1e-9)
    for kind in ("l1", "smooth"):
        q = p * 2        # some |d| above 1 for smooth's linear part
        num = numeric_grad(lambda: cost_layer(q, t, kind).loss, q)
        np.testing.assert_allclose(cost_layer(q, t, kind).grad, num, rtol=1e-6, atol=1e-8)
    d = np.array([0.5, -3.0])
    assert cost_layer(np.zeros(2), d, "smooth").darknet_cost == pytest.approx(0.25 + 5.0)   # d^2 | 2|d| - 1
    assert cost_layer(np.zeros(2), d, "l1").darknet_cost == pytest.approx(3.5)


def test_darknet_loss_bookkeeping():
    # two yolo layers with costs 10 and 30 -> network cost 20; 4 subdivisions of 16 images
    assert network_cost([10.0, 30.0]) == 20.0
    assert train_loss([20.0, 24.0, 16.0, 20.0], mini_batch=16) == pytest.approx(80 / 64)
    avg = update_avg_loss(None, 5.0)
    assert avg == 5.0                                   # first iteration: avg = loss
    assert update_avg_loss(avg, 3.0) == pytest.approx(4.8)
    assert update_avg_loss(-1, 2.0) == 2.0              # Darknet starts from -1
    assert update_avg_loss(math.nan, 2.0) == 2.0
