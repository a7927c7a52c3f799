"""Parallelism across the images of a batch: the network runner splits a batch into one shard per numba thread and
runs each shard's whole forward on its own Python thread, its kernels on one numba thread each.

Splitting each layer's work between the threads (what the kernels do for a single image) pays a synchronisation
per parallel region, several per layer, and leaves a thread idle on every layer too small to split; on a shared
machine each region also waits for its slowest thread. Shards need neither: each thread runs a whole network on
its images with no barrier until the outputs are joined. The kernels release the GIL (nogil), so the Python layer
loops overlap with the other shard's kernels.

Used only with a thread-safe numba threading layer (omp or tbb: the workqueue layer aborts on concurrent launches)
and when the batch splits evenly enough (N divisible by the shard count, or at least two images per thread).

A forward that is not split (one image, or a batch too small to shard) splits its kernels between the threads.
Whether that pays depends on the machine's load more than on the network: on a quiet machine two threads finish
Yolo-Fastest batch 1 in 0.8x one thread's time, but when another process holds a core every parallel region waits
for the descheduled worker and two threads take 1.5-5x longer. `ThreadChoice` measures both ways on the forwards the
caller is running anyway and keeps the faster one. The kernels split work by output element, never a reduction, but
their GEMM blocks are sized by the thread count, so the two modes agree to float32 rounding, not always bit for bit
(seen in the full test suite, not reproduced alone): batch-1 outputs may differ in the last bits between runs.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .blas import limit_threads

_executor: list = [None, 0]          # [ThreadPoolExecutor, its worker count]
_executor_lock = threading.Lock()
_SAFE_LAYERS = ("omp", "tbb")


def _workers(n: int) -> ThreadPoolExecutor:
    with _executor_lock:
        if _executor[0] is None or _executor[1] < n:
            _executor[0] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="darkprune-shard")
            _executor[1] = n
        return _executor[0]


def _threading_layer_safe() -> bool:
    try:
        return numba.threading_layer() in _SAFE_LAYERS
    except ValueError:   # no parallel kernel has run yet in this process
        return False


def batch_shards(acts: dict, layers) -> list[tuple[int, int]]:
    """[(lo, hi)] image ranges of the shards for this batch (one range: run unsplit)."""
    arrays = list(acts.values())
    n = arrays[0].shape[0] if arrays else 0
    threads = numba.get_num_threads()
    k = min(threads, n)
    if k < 2 or not layers or (n % k and n < 2 * k) or not _threading_layer_safe():
        return [(0, n)]
    bounds = [n * j // k for j in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_shards(forward_layers, acts: dict, shards, start: int, last: int, wanted: set) -> dict:
    """Each shard through forward_layers(acts, start, last, wanted) on its own thread (the first on the caller's);
    the outputs joined along the batch."""

    def job(lo, hi):
        part = {i: a[lo:hi] for i, a in acts.items()}
        with limit_threads(1):
            return forward_layers(part, start, last, wanted)

    futures = [_workers(len(shards) - 1).submit(job, lo, hi) for lo, hi in shards[1:]]
    parts, error = [], None
    try:
        parts.append(job(*shards[0]))
    except BaseException as exc:   # wait for the other shards before raising
        error = exc
    for f in futures:
        try:
            parts.append(f.result())
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return {i: np.concatenate([p[i] for p in parts]) for i in parts[0]}


class ThreadChoice:
    """All of numba's threads or one for an unsplit forward, chosen by the measured time of recent forwards of the
    same kind (key: batch size, layer range, requested outputs).

    Per key: the first `warmup` forwards run on all threads and are not counted (JIT compilation, arena planning);
    then the two modes alternate until each has `keep` times; from then on the mode with the lower median of its
    last `keep` times runs. The other mode is tried again after `explore` forwards, an interval that doubles (up to
    `max_explore`) each time the try confirms the choice and resets when the choice flips, so that a change in the
    machine's load is noticed within a few dozen forwards and a steady state costs at most one slow forward in
    `max_explore`. Thread-safe; `clock` is injectable for tests."""

    def __init__(self, warmup: int = 2, keep: int = 3, explore: int = 16, max_explore: int = 256,
                 clock=time.perf_counter):
        self.warmup, self.keep, self.explore, self.max_explore = warmup, keep, explore, max_explore
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict = {}

    def _key_state(self, key) -> dict:
        state = self._state.get(key)
        if state is None:
            state = {"seen": 0, "times": {True: deque(maxlen=self.keep), False: deque(maxlen=self.keep)},
                     "best": True, "interval": self.explore, "since": 0}
            self._state[key] = state
        return state

    def _choose(self, key) -> bool:
        """True: run on all threads; False: on one."""
        with self._lock:
            state = self._key_state(key)
            state["seen"] += 1
            if state["seen"] <= self.warmup:
                return True
            times = state["times"]
            for mode in (True, False):
                if len(times[mode]) < self.keep:
                    return mode
            state["since"] += 1
            if state["since"] >= state["interval"]:
                state["since"] = 0
                return not state["best"]
            return state["best"]

    def _record(self, key, all_threads: bool, seconds: float) -> None:
        with self._lock:
            state = self._key_state(key)
            if state["seen"] <= self.warmup:
                return
            times = state["times"]
            times[all_threads].append(seconds)
            if len(times[True]) < self.keep or len(times[False]) < self.keep:
                return
            best = statistics.median(times[True]) <= statistics.median(times[False])
            if best != state["best"]:                   # the choice flips: watch closely again
                state["interval"], state["since"] = self.explore, 0
            elif all_threads != best:                   # a try of the other mode did not flip the choice
                if seconds < statistics.median(times[best]):
                    state["since"] = state["interval"]  # but it was faster: try it again at once
                else:
                    state["interval"] = min(2 * state["interval"], self.max_explore)
            state["best"] = best

    def run(self, key, forward):
        """forward() on all threads or on one, timed."""
        threads = numba.get_num_threads()
        if threads < 2:
            return forward()
        key = (threads, key)
        all_threads = self._choose(key)
        t0 = self.clock()
        if all_threads:
            result = forward()
        else:
            with limit_threads(1):
                result = forward()
        self._record(key, all_threads, self.clock() - t0)
        return result

    def mode(self, key) -> str | None:
        """'all', 'one' or None (not measured yet): what the next steady-state forward of this kind runs at the
        current thread count."""
        with self._lock:
            state = self._state.get((numba.get_num_threads(), key))
            if state is None or any(len(t) < self.keep for t in state["times"].values()):
                return None
            return "all" if state["best"] else "one"
