"""Accuracy of a model on a Darknet dataset: mAP as ``darknet detector map``, top-1/top-k as ``classifier valid``.

Public API
----------
``evaluate(model, data, limit=None, batch=16, thresh=0.25, iou_thresh=0.5, points=0, letterbox=None,
           mode="darknet", cache=True, progress=True, network=None, forward=None, cache_dir=None) -> dict``

Detectors (a graph with ``[yolo]`` / ``[region]`` heads) get AlexeyAB's ``detector map``: detections at its
threshold 0.005, NMS 0.45 of the kind the last head's ``nms_kind`` says, matching at ``iou_thresh``, AP by
``points`` (0 = area under the curve at every unique recall, 11 = VOC2007, 101 = COCO), plus mAP@0.5:0.95 and
per class AP/TP/FP, and precision/recall/F1, TP/FP/FN and average IoU at confidence ``thresh``. The dict is
:mod:`darkprune.metrics.detection`'s (``map50``, ``map50_95``, ``points``, ``per_class``, ...).

Classifiers get ``{"top1", "top5", "top", f"top{top}", "images"}``: the label of an image is the label name that
occurs in its path (Darknet's rule, see ``data.load_data``), ``top`` comes from the ``.data`` file, inputs are
prepared as ``classifier valid`` prepares them (``resize_min`` + centred crop, see ``detect.classifier_input``).

Inputs are streamed in batches from the preprocessed-input cache (decoded and resized once per dataset, input size
and resize mode; ``cache=False`` preprocesses on the fly): memory stays at a batch plus the per-detection pairs the
mAP needs. ``network``: a Network built already (e.g. a masked variant during pruning analysis); ``forward``: a
callable ``x (N, C, H, W) -> {layer index: output}`` used instead of ``network.forward`` (e.g. a prefix-cached
runner); it must return the head layers (detectors) or the classifier's output layer
(``detect.classifier_output``). A progress bar goes to stderr unless ``progress=False`` or ``DARKPRUNE_QUIET=1``.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from darkprune.data import Dataset, iter_input_batches, load_data
from darkprune.data.cache import cached_entry
from darkprune.detect import (
    DETECT_MODES,
    as_network,
    classifier_input,
    classifier_output,
    detection_heads,
    detector_resize,
    network_geometry,
)
from darkprune.engine.decode import decode_image
from darkprune.engine.network import Network
from darkprune.errors import DarkpruneError
from darkprune.metrics import ClassificationEvaluator, DetectionEvaluator
from darkprune.util.progress import progress_enabled

__all__ = ["MAP_THRESH", "MAP_NMS", "evaluate", "load_dataset", "progress_enabled"]

# `darknet detector map`'s fixed detection threshold and NMS IoU (validate_detector_map).
MAP_THRESH = 0.005
MAP_NMS = 0.45
# The cache mode name of Darknet's classifier preprocessing (resize_min + centred crop).
CLASSIFIER_CACHE_MODE = "darknet-crop"

Forward = Callable[[np.ndarray], dict]


def load_dataset(data: Any, limit: int | None = None) -> Dataset:
    """A Dataset from a Dataset or a ``.data`` path, cut to its first ``limit`` images."""
    if limit is not None and int(limit) <= 0:
        raise DarkpruneError(f"limit must be a positive number of images, not {limit}")
    if isinstance(data, Dataset):
        if limit is not None and int(limit) < len(data):
            return data.subset(range(int(limit)))
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, split="valid", limit=limit)
    raise DarkpruneError(f"data must be a Dataset or the path of a .data file, not {type(data).__name__}")


def evaluate(model: Any, data: Any, limit: int | None = None, batch: int = 16, thresh: float = 0.25,
             iou_thresh: float = 0.5, points: int = 0, letterbox: bool | None = None, mode: str = "darknet",
             cache: bool = True, progress: bool = True, network: Network | None = None,
             forward: Forward | None = None, cache_dir: str | os.PathLike | None = None) -> dict:
    """The model's accuracy on ``data`` (a Dataset or a ``.data`` path): see the module docstring."""
    if mode not in DETECT_MODES:
        raise DarkpruneError(f"resize mode must be one of {', '.join(DETECT_MODES)}, not {mode!r}")
    if int(batch) <= 0:
        raise DarkpruneError(f"batch must be a positive number of images, not {batch}")
    if points != 0 and points < 2:
        raise DarkpruneError(f"points must be 0 (area under the curve), 11 or 101, not {points}")
    if network is None:
        if model is None:
            raise DarkpruneError("evaluate needs a model or a network")
        network = as_network(model)
    dataset = load_dataset(data, limit)
    show = progress_enabled(progress)
    run = forward if forward is not None else network.forward
    heads = detection_heads(network.graph)
    if heads:
        return _evaluate_detector(network, heads, dataset, run, int(batch), thresh, iou_thresh, points, letterbox,
                                  mode, cache, cache_dir, show)
    return _evaluate_classifier(network, dataset, run, int(batch), mode, cache, cache_dir, show)


def _cfg_name(network: Network) -> str:
    return str(network.graph.cfg.path or "the model")


def _bar(total: int, enabled: bool):
    return tqdm(total=total, desc="evaluating", unit="img", file=sys.stderr, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------------------------------------------
# detectors


def _evaluate_detector(network: Network, heads: list, dataset: Dataset, run: Forward, batch: int, thresh: float,
                       iou_thresh: float, points: int, letterbox: bool | None, mode: str, cache: bool,
                       cache_dir, show: bool) -> dict:
    if dataset.kind != "detection":
        raise DarkpruneError(f"{dataset.source}: a classification dataset, but {_cfg_name(network)} is a detector")
    classes = heads[-1][1].classes
    if classes != dataset.classes:
        raise DarkpruneError(f"{dataset.source}: classes={dataset.classes}, but the [yolo]/[region] layers of "
                             f"{_cfg_name(network)} predict {classes} classes")
    width, height, channels = network_geometry(network)
    resize, letterbox = detector_resize(network, letterbox, mode)
    indices = [index for index, _ in heads]
    evaluator = DetectionEvaluator(dataset.classes, dataset.names, iou_thresh, thresh)
    batches = iter_input_batches(dataset, width, height, batch, channels, resize, cache, cache_dir, show)
    with _bar(len(dataset), show) as bar:
        for start, stop, inputs, sizes in batches:
            outputs = _run(run, inputs, indices)
            for i in range(stop - start):
                dets = decode_image([(outputs[index][i], params) for index, params in heads], width, height,
                                    int(sizes[i][0]), int(sizes[i][1]), thresh=MAP_THRESH, nms_thresh=MAP_NMS,
                                    letterbox=letterbox)
                evaluator.add(dets, dataset.boxes[start + i])
            bar.update(stop - start)
    result = evaluator.result(points)
    result["letterbox"] = bool(letterbox)
    return result


def _run(run: Forward, inputs: np.ndarray, indices: list[int]) -> dict:
    outputs = run(np.ascontiguousarray(inputs, dtype=np.float32))
    missing = [i for i in indices if i not in outputs]
    if missing:
        raise DarkpruneError(f"the forward pass returned no output for layer(s) {missing}")
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# classifiers


def _evaluate_classifier(network: Network, dataset: Dataset, run: Forward, batch: int, mode: str, cache: bool,
                         cache_dir, show: bool) -> dict:
    if dataset.kind != "classification":
        raise DarkpruneError(f"{dataset.source}: a detection dataset, but {_cfg_name(network)} has no [yolo] or "
                             f"[region] layer (a classifier)")
    output = classifier_output(network)
    outputs = network.graph[output].outputs
    if outputs < dataset.classes:
        raise DarkpruneError(f"{dataset.source}: classes={dataset.classes}, but {_cfg_name(network)} outputs "
                             f"{outputs} scores (layer {output})")
    width, height, channels = network_geometry(network)
    top = max(1, int(dataset.top))
    evaluators = {k: ClassificationEvaluator(k) for k in sorted({1, 5, top})}
    if mode == "darknet":
        batches = _classifier_batches(dataset.image_paths, width, height, channels, batch, cache, cache_dir, show)
    else:
        batches = iter_input_batches(dataset, width, height, batch, channels, mode, cache, cache_dir, show)
    with _bar(len(dataset), show) as bar:
        for start, stop, inputs, _ in batches:
            scores = _run(run, inputs, [output])[output].reshape(stop - start, -1)
            # Darknet ranks the first `classes` entries of the prediction (top_k(pred, classes, ...)).
            scores = scores[:, :dataset.classes]
            for evaluator in evaluators.values():
                evaluator.add(scores, dataset.labels[start:stop])
            bar.update(stop - start)
    result = {"top1": evaluators[1].result()["top1"], "top5": evaluators[5].result()["top5"], "top": top,
              f"top{top}": evaluators[top].result()[f"top{top}"], "images": len(dataset),
              "unlabelled": int((dataset.labels < 0).sum())}
    return result


def _classifier_batches(paths: list[str], width: int, height: int, channels: int, batch: int, cache: bool,
                        cache_dir, show: bool) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Batches of Darknet's classifier inputs (resize_min + centred crop), from the cache or made on the fly.

    The data module's preprocessing knows only whole-image resizing, so this fills the cache's entries itself (same
    folder, key scheme and file naming, through data.cache.cached_entry) under the mode name "darknet-crop".
    """
    if not cache:
        for start in range(0, len(paths), batch):
            stop = min(start + batch, len(paths))
            inputs, sizes = _prepare_classifier_inputs(paths[start:stop], width, height, channels)
            yield start, stop, inputs, sizes
        return
    inputs, sizes = _cached_classifier_inputs(paths, width, height, channels, cache_dir, batch, show)
    for start in range(0, len(paths), batch):
        stop = min(start + batch, len(paths))
        yield start, stop, inputs[start:stop], sizes[start:stop]


def _prepare_classifier_inputs(paths: list[str], width: int, height: int, channels: int,
                               out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    if out is None:
        out = np.empty((len(paths), channels, height, width), np.float32)
    sizes = np.zeros((len(paths), 2), np.int32)

    def work(i: int) -> None:
        out[i], sizes[i] = classifier_input(paths[i], width, height, channels, "darknet")

    workers = max(1, min(os.cpu_count() or 1, len(paths)))
    if workers == 1:
        for i in range(len(paths)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(paths))))
    return out, sizes


def _cached_classifier_inputs(paths: list[str], width: int, height: int, channels: int, cache_dir, batch: int,
                              show: bool) -> tuple[np.ndarray, np.ndarray]:
    def fill(chunk: list[str], out: np.ndarray) -> np.ndarray:
        return _prepare_classifier_inputs(chunk, width, height, channels, out=out)[1]

    entry = cached_entry(paths, width, height, channels, CLASSIFIER_CACHE_MODE, fill, cache_dir, batch, show)
    return entry.inputs, entry.sizes
