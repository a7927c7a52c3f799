"""Our engine against OpenCV's Darknet importer: four reference models x batch 1 and 8 x 1 and 2 threads, peak memory,
and the speed-up of a transformed (pruned) model against its BFLOPs ratio.

Every measurement runs in a fresh child process (thread pools are sized once per process):
- time: both engines built on the same model and input, warm-up excluded, then `--repeats` rounds each timing ours
  once and OpenCV once (interleaved, so that the shared machine's load hits both alike); the medians and their ratio
  (ours / OpenCV: < 1 means we are faster).
- memory: one child per engine; after a one-image warm-up, the rise of the peak resident set (VmHWM, reset through
  /proc/self/clear_refs; ru_maxrss when it cannot be reset) over the resident set before, during two inferences of the
  batch: activations, workspaces, thread scratch (not the model or the compiled code, loaded before).
- pruned: the model pruned at one uniform rate per channel group (dp.prune with a Plan), found so that it loses about
  30% of its BFLOPs, then dp.transform; both timed interleaved in our engine; speed-up = t(original) / t(transformed)
  against the BFLOPs ratio (goal: speed-up >= 0.8 x BFLOPs ratio).
Thread policy: N threads = numba's pool N, BLAS 1 (engine/blas.set_threads), cv2.setNumThreads(N).
The models: yolov4-tiny and yolov3-tiny at 416 (He-initialised: no weights here), Yolo-Fastest 1.1 and -xl (real
COCO weights). The darkprune used is whatever `import darkprune` finds (run with PYTHONPATH=. for this tree).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_engine.py [--repeats 15] [--quick] [--models yf,v4t]
Writes benchmarks/results/engine.json and engine.md (the table, the load averages before and after).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
YF = ASSETS / "models" / "yolo-fastest-1.1"
MODELS = {
    "v4t": ("yolov4-tiny 416", ASSETS / "cfg" / "yolov4-tiny.cfg", None),
    "v3t": ("yolov3-tiny 416", ASSETS / "cfg" / "yolov3-tiny.cfg", None),
    "yf": ("Yolo-Fastest 1.1", YF / "yolo-fastest-1.1.cfg", YF / "yolo-fastest-1.1.weights"),
    "yfxl": ("Yolo-Fastest 1.1-xl", YF / "yolo-fastest-1.1-xl.cfg", YF / "yolo-fastest-1.1-xl.weights"),
}
PRUNE_TARGET = 0.30    # share of BFLOPs the pruned model loses


# ----------------------------------------------------------------------------------------------------------------
# children

def _setup(cfg, weights, threads):
    import cv2
    from darkprune.darknet import load
    from darkprune.engine import blas
    model = load(cfg, weights)
    blas.set_threads(threads)
    cv2.setNumThreads(threads)
    return model


def _opencv_runner(model, folder):
    import cv2
    cfg, weights = Path(folder) / "m.cfg", Path(folder) / "m.weights"
    model.save(cfg, weights)
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    names = net.getUnconnectedOutLayersNames()

    def run(x):
        net.setInput(x)
        return net.forward(names)
    return run


# Both engines' worker threads spin for a while after their last parallel region (ours ~0.5 ms, OpenCV's pool
# similarly) before they sleep; without a pause, one engine's spinning workers would take cycles from the other's
# timed run. The pause is kept short: on this VM a vCPU left idle for 20 ms or more is slow to get back (two-thread
# forwards after such pauses measured 6-50 ms against 5.6 back to back), the host's noise rather than either engine's.
GAP_S = 0.002


def _interleaved(runs, x, repeats, warmup=3):
    """Median ms of each runner, timed round-robin, GAP_S apart."""
    for _ in range(warmup):
        for run in runs:
            run(x)
    times = [[] for _ in runs]
    for _ in range(repeats):
        for k, run in enumerate(runs):
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            run(x)
            times[k].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def child_time(cfg, weights, batch, threads, repeats):
    import numpy as np
    from darkprune.engine.network import Network
    model = _setup(cfg, weights, threads)
    x = np.random.default_rng(0).random((batch,) + tuple(model.input_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = _interleaved([Network(model).forward, _opencv_runner(model, tmp)], x, repeats)
    return {"ours_ms": round(ours, 3), "opencv_ms": round(theirs, 3), "ratio": round(ours / theirs, 3)}


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_memory(engine, cfg, weights, batch, threads):
    import resource
    import numpy as np
    model = _setup(cfg, weights, threads)
    shape = tuple(model.input_shape)
    warm = np.random.default_rng(1).random((1,) + shape, dtype=np.float32)
    x = np.random.default_rng(0).random((batch,) + shape, dtype=np.float32)
    tmp = tempfile.mkdtemp()
    if engine == "ours":
        from darkprune.engine.network import Network
        run = Network(model).forward
    else:
        run = _opencv_runner(model, tmp)
    run(warm)
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current RSS
        peak_of = lambda: _status_kb("VmHWM")               # noqa: E731
    except OSError:
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    for _ in range(2):
        out = run(x)
        del out
    return round(max(peak_of() - before, 0) / 1024.0, 1)


def _uniform_prune(model, target):
    """dp.prune + dp.transform at one rate for every prunable group, the rate bisected so that the transformed model
    has `target` fewer BFLOPs (within 1%)."""
    import darkprune as dp
    from darkprune.prune.analysis import prunable_groups
    from darkprune.prune.plan import Plan
    groups = [g.id for g in prunable_groups(model)]
    base = model.graph.total_bflops
    lo, hi, best = 0.0, 0.9, None
    for _ in range(12):
        rate = (lo + hi) / 2
        small = dp.transform(dp.prune(model, Plan({g: rate for g in groups}, "rate", rate)))
        fewer = 1 - small.graph.total_bflops / base
        best = (rate, small, fewer)
        if abs(fewer - target) < 0.01:
            break
        lo, hi = (rate, hi) if fewer < target else (lo, rate)
    return best


def child_pruned(cfg, weights, batches, threads, repeats):
    import numpy as np
    from darkprune.engine.network import Network
    model = _setup(cfg, weights, threads)
    rate, small, fewer = _uniform_prune(model, PRUNE_TARGET)
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).random((batch,) + tuple(model.input_shape), dtype=np.float32)
        orig_ms, small_ms = _interleaved([Network(model).forward, Network(small).forward], x, repeats)
        flops_ratio = model.graph.total_bflops / small.graph.total_bflops
        speedup = orig_ms / small_ms
        rows.append({"batch": batch, "threads": threads, "rate": round(rate, 4), "bflops": model.graph.total_bflops,
                     "bflops_pruned": small.graph.total_bflops, "bflops_ratio": round(flops_ratio, 3),
                     "orig_ms": round(orig_ms, 3), "pruned_ms": round(small_ms, 3), "speedup": round(speedup, 3),
                     "speedup_per_bflops_ratio": round(speedup / flops_ratio, 3)})
    return rows


CHILDREN = {"time": child_time, "memory": child_memory, "pruned": child_pruned}


# ----------------------------------------------------------------------------------------------------------------
# parent

def _child(kind, *args):
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps([str(a) if isinstance(a, Path) else a
                                                                                  for a in args])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} benchmark failed for {args}: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load():
    return [round(v, 2) for v in os.getloadavg()]


def _markdown(doc):
    lines = [f"darkprune from {doc['darkprune']}; load average (1, 5, 15 min) before {doc['load_before']}, after "
             f"{doc['load_after']}; median of {doc['repeats']}, ours and OpenCV interleaved", "",
             "| model | batch | threads | ours ms | OpenCV ms | ours/OpenCV | peak MB ours / OpenCV |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        mem = f"{r['ours_peak_mb']} / {r['opencv_peak_mb']}" if "ours_peak_mb" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['ours_ms']:.2f} | {r['opencv_ms']:.2f} | "
                     f"{r['ratio']:.3f} | {mem} |")
    ratios = [r["ratio"] for r in doc["rows"]]
    if ratios:
        lines += ["", f"ratios: median {statistics.median(ratios):.3f}, max {max(ratios):.3f} ({len(ratios)} cases)"]
    if doc["pruned"]:
        lines += ["", "| pruned model | batch | threads | BFLOPs orig / pruned (ratio) | orig ms | pruned ms | speed-up "
                  "| speed-up / BFLOPs ratio |", "|---|---|---|---|---|---|---|---|"]
        for p in doc["pruned"]:
            lines.append(f"| {p['model']} (uniform rate {p['rate']}) | {p['batch']} | {p['threads']} | "
                         f"{p['bflops']:.3f} / {p['bflops_pruned']:.3f} ({p['bflops_ratio']:.2f}) | {p['orig_ms']:.2f} | "
                         f"{p['pruned_ms']:.2f} | {p['speedup']:.2f} | {p['speedup_per_bflops_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="v4t,v3t,yf,yfxl", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--memory", default="8", help="batches whose peak memory is measured (2 threads); '' none")
    parser.add_argument("--pruned", default="yf,v4t", help="models whose transformed speed-up is measured; '' none")
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 threads, no memory, no pruned model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine"), help="results stem")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](*json.loads(args.args))))
        return
    ints = lambda s: [int(v) for v in s.split(",") if v]   # noqa: E731
    batches, threads, memory = ints(args.batches), ints(args.threads), ints(args.memory)
    pruned = [m for m in args.pruned.split(",") if m]
    if args.quick:
        batches, threads, memory, pruned = [1], [2], [], []
    import darkprune
    doc = {"darkprune": str(Path(darkprune.__file__).parent), "repeats": args.repeats, "load_before": _load(),
           "rows": [], "pruned": []}
    for key in args.models.split(","):
        name, cfg, weights = MODELS[key]
        for batch in batches:
            for t in threads:
                r = {"model": name, "batch": batch, "threads": t,
                     **_child("time", cfg, weights, batch, t, args.repeats)}
                if batch in memory and t == 2:
                    r["ours_peak_mb"] = _child("memory", "ours", cfg, weights, batch, t)
                    r["opencv_peak_mb"] = _child("memory", "opencv", cfg, weights, batch, t)
                doc["rows"].append(r)
                mem = f"  peak MB ours {r['ours_peak_mb']} / OpenCV {r['opencv_peak_mb']}" if "ours_peak_mb" in r else ""
                print(f"{name:20s} batch {batch} threads {t}: ours {r['ours_ms']:8.2f} ms  OpenCV {r['opencv_ms']:8.2f}"
                      f" ms  ratio {r['ratio']:.3f}{mem}  (load {_load()[0]})", flush=True)
    for key in pruned:
        name, cfg, weights = MODELS[key]
        for t in threads:
            for p in _child("pruned", cfg, weights, batches, t, args.repeats):
                doc["pruned"].append({"model": name, **p})
                print(f"{name} pruned: batch {p['batch']} threads {t}: BFLOPs ratio {p['bflops_ratio']:.2f}, speed-up "
                      f"{p['speedup']:.2f} (x{p['speedup_per_bflops_ratio']:.2f} of it)", flush=True)
    doc["load_after"] = _load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(doc, indent=1) + "\n"), (".md", _markdown(doc))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(suffix))
    print(_markdown(doc))


if __name__ == "__main__":
    main()
