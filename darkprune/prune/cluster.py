"""The sensitivity analysis on a dask.distributed cluster (`ana --cluster`): one task per channel group.

A large detector's analysis is hundreds of independent curves (a group x every rate), so instead of a scheduler of
our own we hand the groups to Dask's (the optional extra `darkprune[dask]`), which places tasks on workers, moves
the data to them, and reruns the tasks of a worker that dies.

- The job (the model, the validation images' list and ground truth, the analysis settings) is scattered once to
  every worker. A worker joining later (one restarted after a crash) copies it from a peer with its first task.
- On each worker process the first task of a job builds a CurveMeasurer (the network, the prefix cache, the
  metric's Measure holding the preprocessed inputs, read from the worker's input cache or made into it once) and
  keeps it, keyed by the job's token (the model's structure, its weights, the images, the settings); the job's
  later tasks on that process reuse it. One group at a time per process (a lock: the prefix cache is not
  thread-safe); start workers with one thread each (`dask worker ADDRESS --nthreads 1`), the engine uses the cores.
- Tasks are pure and idempotent: a group's curve depends on the job only and a task writes nothing. So a task lost
  with its worker is simply run again elsewhere, and a failed one may be retried.
- This process receives the curves as they finish (as_completed) and keeps each one as the local run does: into
  the same Sensitivity, saved atomically after every group. The file is the local run's (curves keyed and ordered
  by group id), so a run interrupted either way resumes either way, skipping the groups done.
- The figures are bit-for-bit the local run's: the same code measures each group, and the prefix cache (whose
  frontier depends on which groups a worker got before) changes no figure (see analysis.py). The baseline is
  measured on the cluster too, by a full pass, which is what the local run's baseline pass computes as well.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

from ..errors import DarkpruneError, SettingError
from .curves import CurveMeasurer, divergence_layer

INSTALL_HINT = "pip install darkprune[dask]"
LOCAL = re.compile(r"local:(\d+)")
ADDRESS = re.compile(r"[a-z][a-z0-9+.-]*://\S+|[^\s:/]+:\d+")
CONNECT_TIMEOUT = "30s"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters
RETRIES = 2                 # reruns of a task that raised (a worker that dies is handled by the scheduler)


def distributed_module():
    """dask.distributed, imported on first use (an optional extra)."""
    try:
        import distributed
    except ImportError:
        raise DarkpruneError(f"the cluster setting needs dask.distributed, which is not installed: "
                             f"{INSTALL_HINT}") from None
    return distributed


def parse_cluster(cluster) -> tuple[str, object]:
    """("local", N) for "local:N", ("address", text) for a scheduler address, ("client", client) for a Client."""
    if not isinstance(cluster, str):
        if type(cluster).__name__ == "Client" and hasattr(cluster, "submit"):
            return "client", cluster
        raise SettingError("cluster", f"cluster {cluster!r}: expected a scheduler address, local:N or a "
                                      f"distributed.Client")
    text = cluster.strip()
    local = LOCAL.fullmatch(text)
    if local:
        workers = int(local.group(1))
        if workers < 1:
            raise SettingError("cluster", f"cluster {text}: a local cluster needs at least 1 worker process")
        return "local", workers
    if ADDRESS.fullmatch(text):
        return "address", text
    raise SettingError("cluster", f"cluster {text}: expected a Dask scheduler's address (tcp://HOST:8786) or "
                                  f"local:N (N worker processes on this machine)")


def check_cluster(cluster) -> None:
    """Refuse a malformed cluster setting, or a missing dask.distributed, before any work."""
    parse_cluster(cluster)
    distributed_module()


@contextmanager
def cluster_client(cluster):
    """A distributed.Client for the cluster setting: a local cluster started for the run (and closed after it), a
    connection to a running scheduler (closed after the run; the cluster stays), or the caller's own Client."""
    kind, value = parse_cluster(cluster)
    distributed = distributed_module()
    if kind == "client":
        yield value
    elif kind == "local":
        # the worker processes share this machine's cores: each engine gets its share of them (not all of them)
        threads = {"NUMBA_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // value))}
        with distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True, dashboard_address=None,
                                      env=threads) as local, distributed.Client(local) as client:
            yield client
    else:
        try:
            client = distributed.Client(value, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise DarkpruneError(f"cluster {value}: cannot reach a Dask scheduler there ({exc})") from None
        try:
            yield client
        finally:
            client.close()


# ----------------------------------------------------------------------------------------------------------------
# the worker's side

@dataclass
class ClusterJob:
    """What a worker needs to measure any group of one analysis (sent to each worker once)."""
    token: str
    model: object
    dataset: object
    rates: list
    criterion: str
    divisible: int
    batch: int
    prefix_cache: bool
    cache_dir: object


_WORKER_LOCK = threading.Lock()
_WORKER_SLOT: dict = {"token": None, "measurer": None}      # this process's CurveMeasurer, for one job at a time


def _undo_malloc_trimming() -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, so that glibc hands freed memory back at once.
    Setting it also stops glibc from raising its mmap threshold, so every array above 128 KiB (each activation
    batch) is a fresh mapping, zero-filled page by page on first use: measured here, 6x the system time and twice
    the wall time of the analysis. Large thresholds set in this process restore the heap's reuse."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)       # glibc's largest
    except (OSError, AttributeError):
        pass                                            # not glibc: nothing to undo


def _measurer(job: ClusterJob) -> CurveMeasurer:
    """This worker process's CurveMeasurer for `job` (built by the job's first task here; another job's is freed
    first, so a long-lived worker holds one model and one set of inputs)."""
    if _WORKER_SLOT["token"] != job.token:
        old = _WORKER_SLOT["measurer"]
        _WORKER_SLOT.update(token=None, measurer=None)
        if old is not None:
            old.close()
        _undo_malloc_trimming()
        measurer = CurveMeasurer(job.model, job.dataset, job.rates, job.criterion, job.divisible, job.batch,
                                 job.prefix_cache, job.cache_dir)
        _WORKER_SLOT.update(token=job.token, measurer=measurer)
    return _WORKER_SLOT["measurer"]


def measure_group(job: ClusterJob, group_id: int) -> dict[float, float]:
    """The task: group `group_id`'s curve, {rate: metric}."""
    with _WORKER_LOCK:
        measurer = _measurer(job)
        return measurer.curve(measurer.grouping.groups[group_id])


def measure_baseline(job: ClusterJob) -> float:
    """The task measuring the unpruned model's metric."""
    from ..evaluate import evaluate
    with _WORKER_LOCK:
        measurer = _measurer(job)
        result = evaluate(None, job.dataset, network=measurer.network, progress=False, batch=job.batch,
                          cache_dir=job.cache_dir)
        return float(result[measurer.measure.metric])


# ----------------------------------------------------------------------------------------------------------------
# the client's side

def job_token(run) -> str:
    """The identity of the job of `run` (an analysis.AnalysisRun): runs with the same token compute the same
    figures, so their tasks may share keys."""
    s = run.settings
    text = "\0".join([s.fingerprint, s.weights_digest, s.data_digest, repr(list(s.rates)), s.criterion,
                      str(s.divisible), str(s.images), str(run.batch)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def analyze_on_cluster(cluster, run):
    """Measure the groups of `run` (an analysis.AnalysisRun) as tasks on the cluster; the curves are kept (and
    saved) as they arrive. Returns the run's Sensitivity."""
    with cluster_client(cluster) as client:
        s = run.settings
        token = job_token(run)
        job = ClusterJob(token, run.model, run.dataset, list(s.rates), s.criterion, s.divisible, run.batch,
                         run.prefix_cache, run.cache_dir)
        [shared] = client.scatter([job], broadcast=True, hash=False)
        # in the order of their divergence layers, as a local run visits them: each worker's frontier moves forward
        positions = {g.id: divergence_layer(run.grouping, g)[0] for g in run.todo}
        todo = sorted(run.todo, key=lambda g: (positions[g.id], g.id))
        tasks = {}
        for i, group in enumerate(todo):
            future = client.submit(measure_group, shared, group.id, key=f"darkprune-ana-{token}-group-{group.id}",
                                   priority=len(todo) - i, retries=RETRIES, pure=True)
            tasks[future] = group
        if run.sens is None:
            baseline = client.submit(measure_baseline, shared, key=f"darkprune-ana-{token}-baseline",
                                     priority=len(todo) + 1, retries=RETRIES, pure=True)
            tasks[baseline] = None
        try:
            return _collect(run, tasks)
        finally:
            client.cancel(list(tasks) + [shared])


def _collect(run, tasks: dict):
    """Keep each result as it arrives: the baseline (None's task) starts the analysis; curves finished before it
    wait for it."""
    distributed = distributed_module()
    sens = run.begin(None) if run.sens is not None else None
    early = []
    rates = len(run.settings.rates)
    bar = tqdm(total=sum(1 for g in tasks.values() if g is not None) * rates, desc="analysis", unit="eval",
               file=sys.stderr, disable=not run.show, dynamic_ncols=True)
    try:
        for future in distributed.as_completed(list(tasks)):
            group, value = tasks[future], _result(distributed, future, tasks[future])
            if group is None:
                sens = run.begin(value)
                for done, curve in early:
                    run.record(done, curve)
                continue
            bar.update(rates)
            bar.set_postfix_str(f"group {group.id}: {run.settings.metric} "
                                f"{' '.join(f'{v:.4f}' for v in value.values())}")
            if sens is None:
                early.append((group, value))
            else:
                run.record(group, value)
    finally:
        bar.close()
    return sens


def _result(distributed, future, group):
    """A task's result; a task that took its workers down with it is reported in one line."""
    try:
        return future.result()
    except distributed.KilledWorker as exc:
        what = f"group {group.id}" if group is not None else "the baseline"
        raise DarkpruneError(f"cluster: measuring {what} killed the workers running it, again and again ({exc}); "
                             f"out of memory there?") from None
