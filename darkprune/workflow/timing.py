"""Latency and memory of our engine against OpenCV's Darknet importer on the same cfg/weights/input.

Both run the same batch with the same thread count; warm-up runs (JIT compilation, OpenCV's lazy init) are excluded
and the median of repeated runs is reported. `bench` times one model; `latencies` times several round-robin (the
sweep's table), so that a change in the machine's load hits them alike.

One thread policy for every timing (bench, sweep, benchmarks/): N threads means numba's pool gets N and the BLAS
library 1, as the engine runs (engine/blas.set_threads: the engine splits its GEMMs across numba's threads itself, and
two thread pools on the same cores stall each other), and OpenCV gets N.

Peak memory is measured in a fresh child process per engine, as the rise of the process's peak resident set during
inference over its resident set just before it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..darknet import load
from ..errors import DarkpruneError


def set_threads(threads: int) -> bool:
    """Both engines on `threads` threads (the policy in the module doc). True when the BLAS library was reachable."""
    import cv2
    from ..engine import blas
    cv2.setNumThreads(threads)
    return blas.set_threads(threads)


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _opencv_net(model, folder: Path):
    import cv2
    cfg, weights = folder / "bench.cfg", folder / "bench.weights"
    model.save(cfg, weights)
    try:
        net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    except cv2.error as exc:
        raise DarkpruneError(f"{model.cfg_path}: OpenCV's Darknet importer cannot load this cfg: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def bench(cfg: str, weights: str | None = None, batch: int = 1, threads: int = 2, repeats: int = 10,
          warmup: int = 2, memory: bool = False) -> dict:
    from ..engine.network import Network
    model = load(cfg, weights)
    set_threads(threads)
    c, h, w = model.input_shape
    x = np.random.default_rng(0).random((batch, c, h, w), dtype=np.float32)
    network = Network(model)
    ours = _median_ms(lambda: network.forward(x), repeats, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        net = _opencv_net(model, Path(tmp))
        names = net.getUnconnectedOutLayersNames()

        def opencv_run():
            net.setInput(x)
            net.forward(names)
        theirs = _median_ms(opencv_run, repeats, warmup)
    result = {"cfg": str(cfg), "weights": weights, "batch": batch, "threads": threads,
              "ours_ms": round(ours, 3), "opencv_ms": round(theirs, 3), "ratio": round(ours / theirs, 3),
              "repeats": repeats}
    if memory:
        result["ours_peak_mb"] = peak_memory_mb("ours", cfg, weights, batch, threads)
        result["opencv_peak_mb"] = peak_memory_mb("opencv", cfg, weights, batch, threads)
        result["memory_ratio"] = round(result["ours_peak_mb"] / max(result["opencv_peak_mb"], 1e-9), 3)
    return result


def latencies(models: list, repeats: int = 15, threads: int | None = None, opencv: bool = True) -> list[dict]:
    """Batch-1 latency (ms, median and fastest run) of each model in our engine and in OpenCV, timed round-robin
    (model 1, 2, ..., then again) after two warm-up runs each, on the same number of threads for both engines."""
    import cv2
    from ..engine.network import Network
    set_threads(threads or os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    entries = []
    with tempfile.TemporaryDirectory(prefix="darkprune-latency-") as tmp:
        for k, model in enumerate(models):
            c, h, w = model.input_shape
            x = rng.random((1, c, h, w), dtype=np.float32)
            network = Network(model)
            entry = {"ours": [], "opencv": [], "run_ours": (lambda n=network, x=x: n.forward(x)), "run_cv": None}
            if opencv:
                cfg, weights = Path(tmp) / f"m{k}.cfg", Path(tmp) / f"m{k}.weights"
                model.save(cfg, weights)
                try:
                    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
                    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
                    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
                    names = net.getUnconnectedOutLayersNames()

                    def run_cv(net=net, x=x, names=names):
                        net.setInput(x)
                        net.forward(names)
                    entry["run_cv"] = run_cv
                except cv2.error:
                    pass
            entries.append(entry)
        for entry in entries:
            for _ in range(2):
                entry["run_ours"]()
                if entry["run_cv"]:
                    entry["run_cv"]()
        for _ in range(repeats):
            for entry in entries:
                t0 = time.perf_counter()
                entry["run_ours"]()
                entry["ours"].append((time.perf_counter() - t0) * 1000)
                if entry["run_cv"]:
                    t0 = time.perf_counter()
                    entry["run_cv"]()
                    entry["opencv"].append((time.perf_counter() - t0) * 1000)
    return [{"ours_ms": statistics.median(e["ours"]), "ours_min_ms": min(e["ours"]),
             "opencv_ms": statistics.median(e["opencv"]) if e["opencv"] else None,
             "opencv_min_ms": min(e["opencv"]) if e["opencv"] else None} for e in entries]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to /proc/self/clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_peak_child(engine: str, cfg: str, weights: str | None, batch: int, threads: int) -> float:
    """Runs inside the child: the rise of peak RSS (MB) while running `batch`-image inferences, over the RSS after a
    one-image warm-up (JIT code and the model itself are then loaded; what is measured is the working memory of
    inference at this batch size: activations, workspaces, and for OpenCV its re-allocated blobs)."""
    model = load(cfg, weights)
    set_threads(threads)
    c, h, w = model.input_shape
    warm = np.random.default_rng(1).random((1, c, h, w), dtype=np.float32)
    x = np.random.default_rng(0).random((batch, c, h, w), dtype=np.float32)
    if engine == "ours":
        from ..engine.network import Network
        network = Network(model)
        run = network.forward
    else:
        tmp = tempfile.mkdtemp()
        net = _opencv_net(model, Path(tmp))
        names = net.getUnconnectedOutLayersNames()

        def run(inputs):
            net.setInput(inputs)
            return net.forward(names)
    run(warm)
    before = _status_kb("VmRSS")
    _reset_peak()
    for _ in range(2):
        out = run(x)
        del out
    peak = _status_kb("VmHWM")
    return max(peak - before, 0) / 1024.0


def peak_memory_mb(engine: str, cfg: str, weights: str | None, batch: int, threads: int) -> float:
    code = ("import json,sys; from darkprune.workflow.timing import measure_peak_child as m; "
            "print(json.dumps(m(*json.loads(sys.argv[1]))))")
    args = json.dumps([engine, str(cfg), str(weights) if weights else None, batch, threads])
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DarkpruneError(f"memory measurement of {engine} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return round(float(proc.stdout.strip().splitlines()[-1]), 1)


def format_bench(r: dict) -> str:
    lines = [f"{Path(r['cfg']).name}: batch {r['batch']}, {r['threads']} thread(s), median of {r['repeats']}",
             f"  darkprune : {r['ours_ms']:9.2f} ms",
             f"  OpenCV    : {r['opencv_ms']:9.2f} ms",
             f"  ratio     : {r['ratio']:9.3f}  (ours / OpenCV; < 1 means we are faster)"]
    if "ours_peak_mb" in r:
        lines.append(f"  peak memory during inference: ours {r['ours_peak_mb']} MB, OpenCV {r['opencv_peak_mb']} MB "
                     f"(ratio {r['memory_ratio']})")
    return "\n".join(lines)

