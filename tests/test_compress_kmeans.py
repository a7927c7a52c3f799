"""1-D k-means weight sharing and centroid finetuning, checked against brute-force references."""

import numpy as np
import pytest

from darkprune.compress.kmeans import (CentroidFinetuner, centroid_gradients, initial_centroids, kmeans_1d,
                                       nearest_centroid, quantized_weights, share_weights)
from darkprune.errors import DarkpruneError


def brute_force_lloyd(values, centroids, iterations=1000):
    """Plain Lloyd: argmin assignment over all centroids, mean update, empty clusters keep their centroid."""
    values = np.asarray(values, dtype=np.float64)
    centroids = np.array(centroids, dtype=np.float64)
    labels = None
    for _ in range(iterations):
        new_labels = np.argmin(np.abs(values[:, None] - centroids[None, :]), axis=1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for j in range(centroids.size):
            members = values[labels == j]
            if members.size:
                centroids[j] = members.mean()
    return np.sort(centroids)


def test_linear_init_converges_to_known_centroids():
    values = np.array([0, 1, 2, 10, 11, 12, 20, 21, 22], dtype=np.float32)
    codebook, labels = kmeans_1d(values, 3)  # linear init: 0, 11, 22
    assert codebook.dtype == np.float32
    assert codebook.tolist() == [1.0, 11.0, 21.0]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_initialisations():
    values = np.arange(101, dtype=np.float64)
    np.testing.assert_allclose(initial_centroids(values, 5, "linear"), [0, 25, 50, 75, 100])
    np.testing.assert_allclose(initial_centroids(values, 4, "density"), np.quantile(values, [0.125, 0.375, 0.625,
                                                                                               0.875]))
    a = initial_centroids(values, 6, "random", seed=3)
    assert np.array_equal(a, initial_centroids(values, 6, "random", seed=3))
    assert set(a.tolist()) <= set(values.tolist()) and len(set(a.tolist())) == 6
    with pytest.raises(DarkpruneError, match="initialisation"):
        initial_centroids(values, 3, "kmeans++")


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_matches_brute_force_lloyd_and_is_a_fixed_point(init):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(3000).astype(np.float32)
    weights = weights[np.abs(weights) > 0.8]  # survivors of magnitude pruning: two separated tails
    codebook, labels = kmeans_1d(weights, 16, init=init, seed=5)
    reference = brute_force_lloyd(weights, initial_centroids(weights, 16, init, seed=5))
    np.testing.assert_allclose(codebook, reference.astype(np.float32), rtol=1e-6, atol=1e-7)
    # Labels are the nearest centroid (checked by brute force over the float32 codebook).
    brute = np.argmin(np.abs(weights[:, None].astype(np.float64) - codebook[None, :].astype(np.float64)), axis=1)
    np.testing.assert_array_equal(labels, brute)
    # Every non-empty cluster's centroid is its members' mean.
    for j in np.unique(labels):
        assert codebook[j] == pytest.approx(weights[labels == j].astype(np.float64).mean(), rel=1e-6, abs=1e-7)


def test_more_clusters_than_distinct_values():
    values = np.array([1.0, 1.0, 2.0, 2.0, 3.5], dtype=np.float32)
    codebook, labels = kmeans_1d(values, 10)
    assert codebook.size == 10
    np.testing.assert_array_equal(codebook[labels], values)  # every value is its own centroid
    constant = np.full(7, -0.25, dtype=np.float32)
    codebook, labels = kmeans_1d(constant, 4)
    np.testing.assert_array_equal(codebook[labels], constant)
    codebook, labels = kmeans_1d(np.zeros(0, dtype=np.float32), 4)
    assert codebook.size == 4 and labels.size == 0


def test_nearest_centroid_ties_go_low():
    assert nearest_centroid([0.5, 1.5, 2.0], [0.0, 1.0, 2.0]).tolist() == [0, 1, 2]


def test_share_weights_keeps_pruned_positions_zero():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((50, 20, 5, 5)).astype(np.float32)
    mask = np.abs(weights) > 1.5
    codebook, labels, dense = share_weights(weights, mask, 256)
    assert dense.dtype == np.float32 and dense.shape == weights.shape
    assert (dense[~mask] == 0).all()
    np.testing.assert_array_equal(dense[mask], codebook[labels])
    assert np.abs(dense[mask] - weights[mask]).max() < 0.05
    np.testing.assert_array_equal(quantized_weights(codebook, labels, mask), dense)


def test_centroid_gradients_are_grouped_sums():
    rng = np.random.default_rng(2)
    mask = rng.random((30, 40)) < 0.2
    labels = rng.integers(0, 32, int(mask.sum()))
    dense_grads = rng.standard_normal(mask.shape).astype(np.float32)
    expected = np.zeros(32, dtype=np.float64)
    np.add.at(expected, labels, dense_grads[mask].astype(np.float64))
    np.testing.assert_allclose(centroid_gradients(labels, dense_grads, 32, mask=mask), expected, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(centroid_gradients(labels, dense_grads[mask], 32), expected, rtol=1e-6, atol=1e-6)


def test_centroid_finetuner_sgd_with_momentum():
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((10, 500)).astype(np.float32)
    mask = np.abs(weights) > 1.2
    codebook, labels, _ = share_weights(weights, mask, 32)
    tuner = CentroidFinetuner(codebook, labels, mask, lr=0.01, momentum=0.9)
    grads1 = rng.standard_normal(weights.shape).astype(np.float32)
    grads2 = rng.standard_normal(weights.shape).astype(np.float32)
    g1 = np.zeros(32)
    np.add.at(g1, labels, grads1[mask].astype(np.float64))
    g2 = np.zeros(32)
    np.add.at(g2, labels, grads2[mask].astype(np.float64))
    tuner.step(grads1)
    dense = tuner.step(grads2)
    velocity = 0.9 * (0.01 * g1) + 0.01 * g2
    expected = codebook.astype(np.float64) - 0.01 * g1 - velocity
    np.testing.assert_allclose(tuner.codebook, expected, rtol=1e-5, atol=1e-6)
    assert (dense[~mask] == 0).all()  # pruned weights never come back
    np.testing.assert_array_equal(dense[mask], tuner.codebook[labels])
    spec = tuner.spec(5)
    assert spec["index_bits"] == 5 and spec["labels"].size == int(mask.sum())
