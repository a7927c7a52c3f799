"""Evaluating the sensitivity analysis' masked variants quickly: the prefix cache (the original activations at a
group's divergence layer, so that a variant reruns only the rest of the network) and the analysis' metric computed
with less around it than evaluate() (see analysis.py's module doc for why the results are identical).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..engine.network import Network

# Above this many bytes of cached frontier activations we recompute from the input instead.
FRONTIER_BUDGET_BYTES = 2 << 30


class PrefixCache:
    """Original activations of all evaluation images at the current divergence layer (its frontier), moved forward
    group by group; filled by the first full forward pass (the baseline evaluation, or the first variant on
    resume)."""

    def __init__(self, network: Network, outputs: list[int], images: int, enabled: bool = True):
        self.network = network
        self.graph = network.graph
        self.outputs = list(outputs)
        self.images = images
        self.enabled = enabled
        self.position: int | None = None          # the divergence layer the state serves
        self.state: dict[int, np.ndarray] = {}
        self.pool = None                          # an executor to advance on (parallel_variants.ParallelMeasure's)

    def need(self, position: int) -> list[int]:
        """What serving a run from `position` needs: the frontier, plus evaluated outputs made earlier."""
        return sorted(set(self.network.frontier(position)) | {o for o in self.outputs if o < position})

    def _bytes(self, layers: list[int]) -> int:
        shape = self.graph.input_shape
        per_image = sum(int(np.prod(self.graph[i].out_shape if i >= 0 else shape)) for i in layers)
        return per_image * 4 * self.images

    def fits(self, position: int) -> bool:
        return self._bytes(self.need(position)) <= FRONTIER_BUDGET_BYTES

    def advance(self, target: int, batch: int) -> None:
        """Move the frontier forward to `target` (computing what is new from the current frontier)."""
        if not self.enabled or self.position is None or target == self.position:
            return
        if target < self.position or not self.fits(target):
            self.state, self.position = {}, None   # refilled by the next full pass (or kept off when too large)
            self.enabled = self.fits(target)
            return
        need = self.need(target)
        fresh = [i for i in need if i not in self.state]
        computed: dict[int, list[np.ndarray]] = {i: [] for i in fresh}
        if fresh:
            def one(start: int) -> dict:
                cached = {k: v[start:start + batch] for k, v in self.state.items()}
                return self.network.forward(None, outputs=fresh, start=self.position, cached=cached)
            starts = range(0, self.images, batch)
            # the batches are independent: on the pool's workers when there is one (in order either way)
            for out in (self.pool.map(one, starts) if self.pool is not None else map(one, starts)):
                for i in fresh:
                    computed[i].append(out[i])
        self.state = {i: (np.concatenate(computed[i]) if i in computed else self.state[i]) for i in need}
        self.position = target

    def runner(self, variant: Network, position: int, zero: dict[int, np.ndarray]) -> "PrefixRunner":
        """A forward(x) for evaluate(): batches arrive in dataset order. Served from the frontier at `position`
        (the pruned channels `zero[layer]` of the frontier layers set to 0), or, while the frontier is empty, run
        from the input (the original network up to the frontier, kept for the next runs, then the variant).
        When served from the frontier it is `stateless`: `.batch(lo, hi, x)` runs images lo..hi in any order."""
        return PrefixRunner(self, variant, position, zero)

    def _fill(self, parts: dict, outputs: dict, need: list[int], served: int, position: int) -> None:
        """Keep one batch's frontier outputs; once all images are served, they are the frontier at `position`."""
        for i in need:
            parts.setdefault(i, []).append(np.array(outputs[i], copy=True))
        if served >= self.images:
            self.state = {i: np.concatenate(parts[i]) for i in need}
            self.position = position

    def base_runner(self, position: int):
        """forward(x) for the baseline evaluation, filling the frontier at `position` on the way."""
        served = {"next": 0}
        filling = self.enabled and self.fits(position)
        need = self.need(position)
        parts: dict[int, list[np.ndarray]] = {}

        def forward(x: np.ndarray) -> dict:
            hi = served["next"] + len(x)
            served["next"] = hi
            if not filling:
                return self.network.forward(x, outputs=self.outputs)
            out = self.network.forward(x, outputs=self.outputs, keep=[i for i in need if i >= 0])
            out[-1] = x
            self._fill(parts, out, need, hi, position)
            return out
        return forward


class PrefixRunner:
    """PrefixCache.runner's forward: call it with the batches in dataset order, or, when `stateless` (served from
    the frontier, or the cache is off), `batch(lo, hi, x)` for images lo..hi in any order, from any thread."""

    def __init__(self, prefix: PrefixCache, variant: Network, position: int, zero: dict[int, np.ndarray]):
        self.prefix, self.variant, self.position, self.zero = prefix, variant, position, zero
        self.next = 0
        self.filling = prefix.enabled and prefix.position is None and prefix.fits(position)
        self.parts: dict[int, list[np.ndarray]] = {}
        self.need = prefix.need(position)
        self.stateless = not self.filling

    def __call__(self, x: np.ndarray) -> dict:
        lo = self.next
        hi = lo + len(x)
        self.next = hi
        if not self.filling:
            return self.batch(lo, hi, x)
        prefix, need = self.prefix, self.need
        layers = [i for i in need if i >= 0]
        base = prefix.network.forward(x, outputs=layers) if layers else {}
        base[-1] = x
        prefix._fill(self.parts, base, need, hi, self.position)
        return self._suffix({i: base[i] for i in need})

    def batch(self, lo: int, hi: int, x: np.ndarray, outputs: list[int] | None = None) -> dict:
        """The outputs (default: the prefix cache's) of images lo..hi; `outputs` before the divergence layer must
        be among the cache's."""
        prefix = self.prefix
        outputs = prefix.outputs if outputs is None else outputs
        if prefix.enabled and prefix.position == self.position:
            return self._suffix({i: prefix.state[i][lo:hi] for i in self.need}, outputs)
        return self.variant.forward(x, outputs=outputs)

    def _suffix(self, cached: dict, outputs: list[int] | None = None) -> dict:
        zero, position = self.zero, self.position
        outputs = self.prefix.outputs if outputs is None else outputs
        later = [o for o in outputs if o >= position]
        cached = {i: (zeroed(v, zero[i]) if i in zero else v) for i, v in cached.items()}
        result = self.variant.forward(None, outputs=later, start=position, cached=cached) if later else {}
        result.update({o: cached[o] for o in outputs if o < position})
        return result


class Measure:
    """The analysis' metric of one variant: evaluate()'s number, computed with less around it for detectors.

    evaluate() also computes mAP@0.5:0.95 (ten IoU thresholds) and per-class tables the analysis does not use; for
    detectors we run the same steps (the same cached inputs, decode_image at `detector map`'s threshold and NMS, the
    same DetectionEvaluator) with only the IoU threshold 0.5. The tests check that the figure equals evaluate()'s.
    Classifiers go through evaluate() itself.

    Decoding and scoring run on a second thread, one batch behind the network: the kernels release the GIL, and the
    small late layers a prefix-cached run consists of mostly leave a core idle. `submit` returns a Future of the
    metric as soon as the variant's last batch has gone through the network, so the last batch of one variant is
    scored while the first batch of the next one runs."""

    def __init__(self, network: Network, dataset, metric: str, batch: int, cache_dir):
        from ..detect import detection_heads
        self.dataset, self.metric, self.batch, self.cache_dir = dataset, metric, batch, cache_dir
        self.heads = detection_heads(network.graph)
        net = network.graph.net
        self.width, self.height, self.channels = int(net["width"]), int(net["height"]), int(net["channels"])
        self.letterbox = bool(net.get("letter_box", 0))
        self.lean = bool(self.heads) and dataset.kind == "detection" and \
            self.heads[-1][1].classes == dataset.classes
        self.entry = None
        self.scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="darkprune-score")
        self.pending: Future | None = None        # the task last handed to the scorer
        if self.lean:
            from ..data import cached_inputs
            # opened once: batches are handed on as views of the memory map, so a run served from the frontier
            # never reads (or copies) an input image
            self.entry = cached_inputs(dataset, self.width, self.height, self.channels,
                                       "letterbox" if self.letterbox else "darknet", cache_dir, batch, False)

    def close(self) -> None:
        self.scorer.shutdown(wait=True)

    def _hand_over(self, task, *args) -> Future:
        """Queue `task` on the scorer once the task before it is done: at most one batch waits there, so memory
        stays one batch of head outputs, and a failure surfaces at the next hand-over."""
        if self.pending is not None:
            self.pending.result()
        self.pending = self.scorer.submit(task, *args)
        return self.pending

    def submit(self, network: Network, forward=None) -> Future:
        """The variant's metric, as a Future (already resolved for classifiers)."""
        from ..evaluate import MAP_NMS, MAP_THRESH, evaluate
        if not self.lean:
            result = Future()
            result.set_result(float(evaluate(None, self.dataset, network=network, forward=forward, progress=False,
                                             batch=self.batch, cache_dir=self.cache_dir)[self.metric]))
            return result
        from ..engine.decode import decode_image
        from ..metrics import DetectionEvaluator
        run = forward or network.forward
        dataset = self.dataset
        evaluator = DetectionEvaluator(dataset.classes, dataset.names, 0.5, 0.25, iou_thresholds=())

        def score(start: int, stop: int, outputs: dict, sizes: np.ndarray) -> None:
            for i in range(stop - start):
                dets = decode_image([(outputs[index][i], params) for index, params in self.heads], self.width,
                                    self.height, int(sizes[i][0]), int(sizes[i][1]), thresh=MAP_THRESH,
                                    nms_thresh=MAP_NMS, letterbox=self.letterbox)
                evaluator.add(dets, dataset.boxes[start + i])

        # one task per batch, in order (the scorer has one thread), so the evaluator sees the images as evaluate()
        # does; the metric is computed by one more task after them
        for start, stop, inputs, sizes in self.entry.batches(self.batch):
            self._hand_over(score, start, stop, run(inputs), sizes)
        return self._hand_over(lambda: float(evaluator.result(0)["map50"]))


def zeroed(x: np.ndarray, channels: np.ndarray) -> np.ndarray:
    out = np.array(x, copy=True)
    out[:, channels] = 0.0
    return out
