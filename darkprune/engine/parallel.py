"""Parallelism across the images of a batch: the network runner splits a batch into one shard per numba thread and
runs each shard's whole forward on its own Python thread, its kernels on one numba thread each.

Splitting each layer's work between the threads (what the kernels do for a single image) pays a synchronisation
per parallel region, several per layer, and leaves a thread idle on every layer too small to split; on a shared
machine each region also waits for its slowest thread. Shards need neither: each thread runs a whole network on
its images with no barrier until the outputs are joined. The kernels release the GIL (nogil), so the Python layer
loops overlap with the other shard's kernels.

Used only with a thread-safe numba threading layer (omp or tbb: the workqueue layer aborts on concurrent launches)
and when the batch splits evenly enough (N divisible by the shard count, or at least two images per thread).
"""
from __future__ import annotations

import threading
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
