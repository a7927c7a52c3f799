"""Darknet-style training mini-batches: each a pure function of (seed, iteration, subdivision), so a run is
deterministic for a seed, images can be prepared on background threads, and a resumed run draws exactly what the
uninterrupted run would have. Each mini-batch draws its images uniformly at random (with replacement) from the
dataset and augments them from the cfg (see augment.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..darknet.heads import is_detector
from ..errors import DarkpruneError
from .backprop import TrainBatch

IMAGE_CACHE_BYTES = 512 << 20      # decoded training images kept in memory (small datasets are read once)


class BatchFeeder:
    """Darknet-style training mini-batches, each a pure function of (seed, iteration, subdivision): random images
    (with replacement) from the dataset, augmented from the cfg. Prepares the next mini-batch on a thread."""

    def __init__(self, dataset, graph, mini_batch: int, seed: int, threads: int = 2, unlabeled: bool = False):
        from ..data import load_image
        from .augment import ClassifierAugment, DetectionAugment
        self.dataset = dataset
        self.mini_batch = int(mini_batch)
        self.seed = int(seed)
        self.channels = graph.net["channels"]
        self.detector = is_detector(graph)
        if self.detector:
            if dataset.kind != "detection" or dataset.boxes is None:
                raise DarkpruneError(f"{dataset.source}: a detector needs a detection dataset (label files with "
                                     f"boxes), this one is {dataset.kind}")
            self.augment = DetectionAugment.from_graph(graph)
        else:
            if dataset.kind != "classification" or dataset.labels is None:
                raise DarkpruneError(f"{dataset.source}: a classifier needs a classification dataset (a labels= "
                                     f"list in the .data file), this one is {dataset.kind}")
            self.augment = ClassifierAugment.from_graph(graph)
        if len(dataset) == 0:
            raise DarkpruneError(f"{dataset.source}: the training list is empty")
        self.labeled = labeled_images(dataset) if unlabeled else None
        self._load_image = load_image
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self._pending: dict[tuple[int, int], Any] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _image(self, index: int) -> np.ndarray:
        img = self._cache.get(index)
        if img is None:
            img = self._load_image(self.dataset.image_paths[index], self.channels)
            if self._cache_bytes + img.nbytes <= IMAGE_CACHE_BYTES:
                self._cache[index] = img
                self._cache_bytes += img.nbytes
        return img

    def _one(self, index: int, seed: int):
        rng = np.random.default_rng(seed)
        image = self._image(index)
        if self.detector:
            return self.augment(image, self.dataset.boxes[index], rng)
        return self.augment(image, rng), int(self.dataset.labels[index])

    def _build(self, iteration: int, subdivision: int) -> TrainBatch:
        rng = np.random.default_rng([self.seed, iteration, subdivision, 0])
        picks = rng.integers(0, len(self.dataset), self.mini_batch)
        seeds = rng.integers(0, 2 ** 63 - 1, self.mini_batch)
        items = list(self._pool.map(self._one, picks.tolist(), seeds.tolist()))
        images = np.stack([it[0] for it in items]).astype(np.float32, copy=False)
        labeled = None if self.labeled is None else self.labeled[picks]
        if self.detector:
            return TrainBatch(images, truths=[np.asarray(it[1], np.float32).reshape(-1, 5) for it in items],
                              labeled=labeled)
        return TrainBatch(images, labels=np.array([it[1] for it in items], np.int64), labeled=labeled)

    def get(self, iteration: int, subdivision: int, following: tuple[int, int] | None = None) -> TrainBatch:
        """The mini-batch (iteration, subdivision); starts preparing `following` in the background."""
        key = (iteration, subdivision)
        future = self._pending.pop(key, None)
        if following is not None and following not in self._pending:
            self._pending[following] = _Background(self._build, following)
        if future is not None:
            return future.result()
        return self._build(*key)


def labeled_images(dataset) -> np.ndarray:
    """(N,) bool: the images that have ground truth: a label file (detection; an empty one counts: no objects),
    a label name in the path (classification)."""
    if dataset.kind == "classification":
        return np.asarray(dataset.labels) >= 0
    if not dataset.label_paths:                   # a Dataset built in memory: its boxes are the ground truth
        return np.ones(len(dataset), bool)
    return np.array([p is not None for p in dataset.label_paths], bool)


class _Background:
    """Runs fn(*args) on its own thread (the pool's workers are used by fn itself for the images)."""

    def __init__(self, fn, args):
        import threading
        self._result = None
        self._error = None

        def run():
            try:
                self._result = fn(*args)
            except BaseException as exc:          # re-raised in the caller's thread
                self._error = exc
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
