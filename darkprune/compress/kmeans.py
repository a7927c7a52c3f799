"""Deep Compression's weight sharing: per-layer 1-D k-means over the surviving weights, and centroid finetuning.

In one dimension, nearest-centroid clusters are contiguous runs of the sorted data, cut at the midpoints between
neighbouring (sorted) centroids. One Lloyd iteration is therefore k binary searches plus prefix-sum lookups on data
sorted once: O(k log n) per iteration, whatever the layer size.
"""

from __future__ import annotations

import numpy as np

from darkprune.errors import DarkpruneError

INITS = ("linear", "density", "random")


def initial_centroids(values: np.ndarray, k: int, init: str = "linear", seed: int = 0) -> np.ndarray:
    """The paper's three initialisations (section 3.2), as float64 ascending.

    linear:  k points evenly spaced between min and max (the paper's best: keeps centroids on the rare large weights);
    density: the weights' CDF spaced evenly on the y axis, quantiles at (i + 0.5) / k;
    random (Forgy): k weights drawn without replacement (with replacement when k exceeds the count), seeded.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return np.zeros(k, dtype=np.float64)
    if init == "linear":
        centroids = np.linspace(values.min(), values.max(), k)
    elif init == "density":
        centroids = np.quantile(values, (np.arange(k) + 0.5) / k)
    elif init == "random":
        rng = np.random.default_rng(seed)
        centroids = rng.choice(values, size=k, replace=k > values.size)
    else:
        raise DarkpruneError(f"unknown k-means initialisation {init!r} (choose from {', '.join(INITS)})")
    return np.sort(centroids)


def nearest_centroid(values, codebook) -> np.ndarray:
    """Index of the nearest codebook entry for every value (ties go to the lower index); codebook ascending."""
    codebook = np.asarray(codebook, dtype=np.float64)
    if codebook.size > 1 and np.any(np.diff(codebook) < 0):
        raise ValueError("nearest_centroid needs an ascending codebook")
    midpoints = (codebook[:-1] + codebook[1:]) * 0.5
    # A value equal to a midpoint goes to the lower centroid: count the midpoints strictly below it.
    return np.searchsorted(midpoints, np.asarray(values, dtype=np.float64), side="left").astype(np.int32)


def kmeans_1d(values, k: int, init: str = "linear", seed: int = 0, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on a 1-D array.

    Returns (codebook float32[k] ascending, labels int32 per value, in the input's order). Iterates until the
    partition no longer changes (Lloyd's fixed point) or `max_iter`. A cluster that empties keeps its centroid, so the
    codebook always has k entries even when k exceeds the number of distinct values; the labels then simply never
    reference the spare entries. Labels are the nearest float32 centroid.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DarkpruneError(f"the cluster count must be a positive integer, got {k!r}")
    values = np.asarray(values)
    flat = values.astype(np.float64).ravel()
    if flat.size and not np.all(np.isfinite(flat)):
        raise DarkpruneError("k-means: the weights contain NaN or inf")
    centroids = initial_centroids(flat, k, init, seed)
    if flat.size:
        ordered = np.sort(flat)
        prefix = np.concatenate(([0.0], np.cumsum(ordered)))
        cuts = None
        for _ in range(max_iter):
            midpoints = (centroids[:-1] + centroids[1:]) * 0.5
            new_cuts = np.concatenate(([0], np.searchsorted(ordered, midpoints, side="right"), [ordered.size]))
            if cuts is not None and np.array_equal(new_cuts, cuts):
                break
            cuts = new_cuts
            sizes = np.diff(cuts)
            sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
            filled = sizes > 0
            centroids = centroids.copy()
            centroids[filled] = sums[filled] / sizes[filled]
            # An empty cluster kept its old centroid, which can now sit out of order: re-sort so cuts stay valid.
            centroids.sort()
    codebook = centroids.astype(np.float32)
    codebook.sort()
    labels = nearest_centroid(flat, codebook)
    return codebook, labels.reshape(values.shape)


def share_weights(weights, mask, k: int, init: str = "linear", seed: int = 0, max_iter: int = 300):
    """k-means over the surviving weights of one layer.

    Returns (codebook float32[k], labels int32 per surviving weight in C order, quantised dense float32 array with
    pruned positions exactly 0).
    """
    weights = np.asarray(weights, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != weights.shape:
        raise DarkpruneError(f"mask shape {mask.shape} differs from the weights' {weights.shape}")
    codebook, labels = kmeans_1d(weights[mask], k, init=init, seed=seed, max_iter=max_iter)
    return codebook, labels, quantized_weights(codebook, labels, mask)


def quantized_weights(codebook, labels, mask) -> np.ndarray:
    """Dense float32 weights: codebook[label] at the surviving positions (C order), exactly 0 elsewhere."""
    mask = np.asarray(mask, dtype=bool)
    labels = np.asarray(labels).ravel()
    if labels.size != int(mask.sum()):
        raise ValueError(f"{labels.size} labels for {int(mask.sum())} surviving weights")
    dense = np.zeros(mask.shape, dtype=np.float32)
    dense[mask] = np.asarray(codebook, dtype=np.float32)[labels]
    return dense


def centroid_gradients(labels, weight_grads, k: int, mask=None) -> np.ndarray:
    """dL/dC_j = sum of dL/dW over the weights in cluster j (the paper's eq. 3); pruned weights are excluded.

    `weight_grads` is either one gradient per surviving weight (aligned with `labels`), or, with `mask`, the dense
    gradient array of the layer (only its surviving positions count). Returns float32[k], accumulated in float64.
    """
    grads = np.asarray(weight_grads)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if grads.shape != mask.shape:
            raise ValueError(f"gradient shape {grads.shape} differs from the mask's {mask.shape}")
        grads = grads[mask]
    labels = np.asarray(labels).ravel()
    grads = grads.ravel()
    if grads.size != labels.size:
        raise ValueError(f"{grads.size} gradients for {labels.size} labels")
    return np.bincount(labels, weights=grads.astype(np.float64), minlength=k)[:k].astype(np.float32)


class CentroidFinetuner:
    """SGD with momentum on one layer's codebook, labels and mask fixed (so a pruned weight never comes back).

    Per step: g = centroid_gradients(...); v = momentum * v + lr * g; codebook -= v (Caffe's and Darknet's form).
    `step` returns the new dense quantised weights for the training engine to copy into the layer.
    """

    def __init__(self, codebook, labels, mask, lr: float = 0.001, momentum: float = 0.9) -> None:
        self.codebook = np.array(codebook, dtype=np.float32)
        self.mask = np.array(mask, dtype=bool)
        self.labels = np.array(labels, dtype=np.int32).ravel()
        if self.labels.size != int(self.mask.sum()):
            raise ValueError(f"{self.labels.size} labels for {int(self.mask.sum())} surviving weights")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.codebook.size):
            raise ValueError("a label is outside the codebook")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.velocity = np.zeros(self.codebook.shape, dtype=np.float32)

    @property
    def k(self) -> int:
        return int(self.codebook.size)

    def gradients(self, weight_grads) -> np.ndarray:
        """Centroid gradients from a dense gradient (the mask's shape) or one gradient per surviving weight."""
        grads = np.asarray(weight_grads)
        return centroid_gradients(self.labels, grads, self.k, mask=self.mask if grads.shape == self.mask.shape else None)

    def step(self, weight_grads, lr: float | None = None) -> np.ndarray:
        """One update from the gradient of the loss w.r.t. the layer's (dense, or per-survivor) weights."""
        rate = self.lr if lr is None else float(lr)
        grads = self.gradients(weight_grads)
        self.velocity = (self.momentum * self.velocity + rate * grads).astype(np.float32)
        self.codebook = (self.codebook - self.velocity).astype(np.float32)
        return self.weights()

    def weights(self) -> np.ndarray:
        return quantized_weights(self.codebook, self.labels, self.mask)

    def spec(self, index_bits: int) -> dict:
        """The .dcz description of this layer's weights (see darkprune.compress.dcz.write_dcz)."""
        return {"codebook": self.codebook.copy(), "labels": self.labels.copy(), "mask": self.mask.copy(),
                "index_bits": int(index_bits)}


__all__ = ["INITS", "initial_centroids", "nearest_centroid", "kmeans_1d", "share_weights", "quantized_weights",
           "centroid_gradients", "CentroidFinetuner"]
