"""The sensitivity analysis' variants measured off the calling thread: each batch of images (at most TASK_IMAGES) of
each masked variant is one task for a pool of worker threads, which run the network and decode the batch right
after it, handing the detections back; the calling thread adds them to the variant's evaluator in image order and
computes the metric while the workers run the next batches, so scoring overlaps the network.

The pool's size: by default one worker holding all of numba's threads (kernels parallel inside, as before).
`DARKPRUNE_ANA_WORKERS=N` runs N workers with numba's threads shared out (2 workers x 1 thread on two cores:
independent batches per core, no parallel region waiting for its slowest thread). On the shared 2-core project
machine (load average 12 to 16) one worker was the faster: 1.12x the sequential path's wall time against 1.03x for
two (bench_ana.py --quick --limit 64, CPU time 1.16x and 1.13x): two Python threads plus the scoring one convoy on the
GIL when the machine is oversubscribed. Stacking the variants of a group into one larger batch instead was measured
slower per image on this engine (see benchmarks/bench_ana.py's doc), so a task stays a few images of one variant.

Less work per variant, with the same figures: [yolo] heads are decoded from their input conv's raw output, the
logistic applied only where decoding reads it (LeanDecoder), so the engine's last [yolo] layer does not run; the
per-head constants are worked out once. (CurveMeasurer also measures a set of pruned channels that several rates
share only once.)

The figures are those of the sequential path (variants.Measure): the same images through the same kernels, the
evaluator fed in image order, the same decoding kernels on the same values. `DARKPRUNE_ANA_FAST=0` (or
CurveMeasurer(fast=False)) selects the sequential path.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..engine.decode import (NMS_KINDS, _nms_kernel, _yolo_candidates, correct_yolo_boxes, decode_image,
                             head_params)
from ..engine.network import Network
from ..engine.yolo import _xy_affine
from .variants import Measure

FAST_ENV = "DARKPRUNE_ANA_FAST"
WORKERS_ENV = "DARKPRUNE_ANA_WORKERS"
# Images per task: at most this many, whatever the analysis' batch (the figures do not depend on it). On one
# thread 8 images cost some 5% less per image than 16 (2% to 9% depending on where the rerun starts: the early
# 160 x 160 maps of a batch of 16 no longer fit the caches), and smaller tasks balance the workers better.
TASK_IMAGES = 8
_F32 = np.float32


def fast_enabled(fast: bool | None = None) -> bool:
    """The parallel path unless `fast=False` or $DARKPRUNE_ANA_FAST is 0/false/no/off."""
    if fast is not None:
        return bool(fast)
    return os.environ.get(FAST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def default_workers() -> int:
    """$DARKPRUNE_ANA_WORKERS, else 1 (see the module doc)."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return 1


# ----------------------------------------------------------------------------------------------------------------
# decoding with the per-head constants kept


class LeanDecoder:
    """decode_image at `detector map`'s threshold and NMS for one network, with what is constant per head (anchor
    widths and heights of its mask, grid size, NMS kind and beta) worked out once: the same kernels in the same
    order as decode_image, so the detections are identical. Heads other than [yolo] go through decode_image.

    With `graph`, a [yolo] head fed by a convolution (without new_coords) can be decoded from that convolution's
    raw output (`wanted` asks for it): the logistic and the scale_x_y step are applied, with the same numpy
    operations as the engine's [yolo] layer, only to the objectness of every cell and to x, y and the classes of the
    cells whose objectness passes the threshold (some 15% of them), which are all that decoding reads."""

    def __init__(self, heads: list, width: int, height: int, letterbox: bool, thresh: float, nms_thresh: float,
                 graph=None):
        self.heads = [(index, head_params(params)) for index, params in heads]
        self.width, self.height, self.letterbox = int(width), int(height), bool(letterbox)
        self.thresh, self.nms_thresh = float(thresh), float(nms_thresh)
        self.classes = self.heads[-1][1].classes
        self.plain = all(p.kind == "yolo" and p.classes == self.classes for _, p in self.heads)
        self.constants = []
        self.raw: dict[int, tuple[int, np.floating, np.floating]] = {}     # head -> (its input, scale, beta)
        for index, p in self.heads:
            masks = p.masks
            biases = np.asarray(p.anchors, np.float32)
            anchor = np.asarray(masks, np.int64)
            if p.kind == "yolo" and len(biases) >= 2 * (max(masks) + 1):
                self.constants.append((index, len(masks), 5 + p.classes, biases[2 * anchor], biases[2 * anchor + 1],
                                       bool(p.new_coords)))
                if graph is not None:
                    self._raw_input(graph, index)
            else:
                self.plain = False
        last = self.heads[-1][1]
        self.nms_kind, self.beta = NMS_KINDS[last.nms_kind], float(np.float32(last.beta_nms))

    def _raw_input(self, graph, index: int) -> None:
        layer = graph[index]
        source = graph[layer.inputs[0]] if len(layer.inputs) == 1 and layer.inputs[0] >= 0 else None
        if layer.section.type == "yolo" and not layer.attrs["new_coords"] and source is not None and \
                source.section.type == "convolutional":       # a fresh array of its own, safe to activate in place
            self.raw[index] = (source.index, *_xy_affine(layer.attrs["scale_x_y"], np.dtype(np.float32)))

    def wanted(self, position: int = 0) -> list[int]:
        """The layers to run a variant to, its rerun starting at `position`: each head's raw input where it is
        recomputed, else the head (its output before `position` comes from the prefix cache)."""
        if not self.plain:
            return [index for index, _ in self.heads]
        return [self.raw[index][0] if index in self.raw and self.raw[index][0] >= position else index
                for index, _ in self.heads]

    def __call__(self, outputs: dict, i: int, image_w: int, image_h: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, probs) of image `i` of a batch's head outputs (or raw head inputs, see `wanted`), as
        decode_image(...).nonempty() has them. Raw inputs are activated in place."""
        if not self.plain:
            dets = decode_image([(outputs[index][i], params) for index, params in self.heads], self.width,
                                self.height, image_w, image_h, thresh=self.thresh, nms_thresh=self.nms_thresh,
                                letterbox=self.letterbox)
            return dets.boxes, dets.probs
        parts = []
        thresh = _F32(self.thresh)
        for index, num, entries, anchor_w, anchor_h, new_coords in self.constants:
            raw = self.raw.get(index)
            lazy = raw is not None and raw[0] in outputs and index not in outputs
            out = np.asarray(outputs[raw[0] if lazy else index][i], np.float32)
            _, lh, lw = out.shape
            view = np.ascontiguousarray(out.reshape(num, entries, lh * lw))
            if lazy:
                _activate_candidates(view, thresh, raw[1], raw[2])
            boxes, obj, probs = _yolo_candidates(view, anchor_w, anchor_h, lw, lh, self.width, self.height,
                                                 thresh, new_coords)
            if len(obj):
                if self.letterbox:
                    boxes = correct_yolo_boxes(boxes, image_w, image_h, self.width, self.height, True)
                parts.append((boxes, obj, probs))
        if not parts:
            return np.zeros((0, 4), np.float32), np.zeros((0, self.classes), np.float32)
        boxes, obj, probs = (parts[0] if len(parts) == 1 else
                             tuple(np.concatenate([p[k] for p in parts]) for k in range(3)))
        if len(boxes) > 1 and self.nms_thresh:
            _nms_kernel(boxes, probs, obj, self.nms_thresh, self.nms_kind, self.beta)
        keep = (probs > 0).any(axis=1)
        return boxes[keep], probs[keep]


def _logistic(a: np.ndarray) -> None:
    """The engine's [yolo] logistic, in place: the same numpy operations (engine/yolo.py's yolo_forward)."""
    one = a.dtype.type(1)
    np.negative(a, out=a)
    np.exp(a, out=a)
    np.add(a, one, out=a)
    np.divide(one, a, out=a)


def _activate_candidates(view: np.ndarray, thresh, scale, beta) -> None:
    """A [yolo] head's raw (anchors, entries, cells), in place: objectness through the logistic everywhere; x, y
    (logistic, then x * scale_x_y + beta) and the classes (logistic) where the objectness passes `thresh`. The
    values decoding reads are those of the engine's [yolo] layer (numpy's exp is elementwise: the same values
    gathered or in place)."""
    with np.errstate(over="ignore"):                 # exp(-x) = inf for very negative x: 1/(1+inf) = 0
        objectness = view[:, 4, :]
        _logistic(objectness)
        cells, anchors = np.nonzero(objectness.T > thresh)
        if len(cells):
            xy = view[anchors, 0:2, cells]
            _logistic(xy)
            np.multiply(xy, scale, out=xy)
            np.add(xy, beta, out=xy)
            view[anchors, 0:2, cells] = xy
            classes = view[anchors, 5:, cells]
            _logistic(classes)
            view[anchors, 5:, cells] = classes


# ----------------------------------------------------------------------------------------------------------------
# the metric of many variants at once


_SEQUENTIAL = Measure.submit       # the sequential submit (ParallelMeasure's fallback), as defined


class ParallelMeasure(Measure):
    """Measure's metric, with the detector variants' batches run on a pool of single-threaded workers (see the
    module doc). Classifiers, and a variant whose forward fills the prefix cache (it must see the batches in
    order), go through Measure.submit. The pool also serves PrefixCache.advance (its `pool`)."""

    def __init__(self, network: Network, dataset, metric: str, batch: int, cache_dir, workers: int | None = None):
        from ..evaluate import MAP_NMS, MAP_THRESH
        super().__init__(network, dataset, metric, batch, cache_dir)
        self.workers = int(workers) if workers else default_workers()
        # the numba threads shared out: one worker per thread, or one worker with all of them
        threads = max(1, numba.get_num_threads() // self.workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="darkprune-variant",
                                       initializer=numba.set_num_threads, initargs=(threads,))
        self.decoder = None
        if self.lean:
            self.decoder = LeanDecoder(self.heads, self.width, self.height, self.letterbox, MAP_THRESH, MAP_NMS,
                                       network.graph)
            self.batches = list(self.entry.batches(max(1, min(self.batch, TASK_IMAGES))))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        super().close()

    def submit(self, network: Network, forward=None):
        """The variant's metric as a future-like object (done/exception/result); see Measure.submit."""
        if not self.lean:
            return _SEQUENTIAL(self, network, forward)
        if forward is None:
            outputs = self.decoder.wanted(0)

            def run(lo, hi, x):
                return network.forward(x, outputs=outputs)
        elif getattr(forward, "stateless", False):
            outputs = self.decoder.wanted(forward.position)

            def run(lo, hi, x):
                return forward.batch(lo, hi, x, outputs)
        else:
            return _SEQUENTIAL(self, network, forward)
        tasks = [(start, self.pool.submit(self._batch, run, start, stop, inputs, sizes))
                 for start, stop, inputs, sizes in self.batches]
        return _Metric(self.dataset, tasks)

    def _batch(self, run, start: int, stop: int, inputs: np.ndarray, sizes: np.ndarray) -> list:
        outputs = run(start, stop, inputs)
        return [self.decoder(outputs, i, int(sizes[i][0]), int(sizes[i][1])) for i in range(stop - start)]


class _Metric:
    """The metric of one variant whose batches are tasks of the pool: done() when every batch is, result() adds
    the detections to a fresh evaluator in image order (once) and returns mAP@0.5."""

    def __init__(self, dataset, tasks: list):
        self.dataset, self.tasks = dataset, tasks
        self.value: float | None = None

    def done(self) -> bool:
        return all(task.done() for _, task in self.tasks)

    def exception(self):
        for _, task in self.tasks:
            if task.done() and task.exception() is not None:
                return task.exception()
        return None

    def result(self) -> float:
        if self.value is None:
            from ..metrics import DetectionEvaluator
            dataset = self.dataset
            evaluator = DetectionEvaluator(dataset.classes, dataset.names, 0.5, 0.25, iou_thresholds=())
            for start, task in self.tasks:
                for i, dets in enumerate(task.result()):
                    evaluator.add(dets, dataset.boxes[start + i])
            self.tasks = [(start, _Done()) for start, _ in self.tasks]     # the detections are no longer needed
            self.value = float(evaluator.result(0)["map50"])
        return self.value


class _Done:
    @staticmethod
    def done() -> bool:
        return True

    @staticmethod
    def exception():
        return None
