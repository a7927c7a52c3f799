"""What the prefix cache buys `darkprune ana`: the same sensitivity analysis with and without it, in one run.

    .venv/bin/python benchmarks/bench_ana.py [--cfg CFG --weights W --data F.data] [--limit 32] [--rates 0.1,...,0.9]
        [--repeats 2] [--json]

Defaults: the bundled Yolo-Fastest 1.1 on the first 32 of the bundled coco128 val2017 images, at `darkprune ana`'s
default rates (0.1 to 0.9: nine evaluations per group), about 3 minutes on 2 cores.
Both runs evaluate every group at every rate; with the cache only the layers from each group's divergence layer on
are recomputed (see darkprune/prune/analysis.py). The two runs alternate `--repeats` times (with, without, with,
...) and the fastest of each counts, so that the load of other processes on a shared machine hits both alike.
Prints wall time and CPU time (all threads) of each, their ratios (and each repeat's), the ratio an ideal cache
could reach on this network (the share of the forward pass before each group's divergence layer, timed layer by
layer), and checks that both runs measured exactly the same curves. `--json` prints the figures as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import darkprune as dp  # noqa: E402
from darkprune.evaluate import evaluate, load_dataset  # noqa: E402
from darkprune.prune.analysis import DEFAULT_RATES, analyze  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def ideal_speedup(model, batch: int) -> float:
    """Sum over groups of the full forward time / sum of the time from each group's divergence layer on."""
    import numpy as np
    from darkprune.engine.network import Network
    from darkprune.prune.analysis import divergence_layer, prunable_groups
    from darkprune.prune.groups import build_grouping
    network = Network(model)
    c, h, w = model.input_shape
    x = np.random.default_rng(0).random((batch, c, h, w), dtype=np.float32)
    acts, times = {-1: x}, []
    for layer in model.graph:
        inputs = [acts[i] for i in layer.inputs]
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            out = network._run(layer, inputs)
            best = min(best, time.perf_counter() - t0)
        acts[layer.index] = out
        times.append(best)
    total = sum(times)
    grouping = build_grouping(model.graph)
    starts = [divergence_layer(grouping, g)[0] for g in prunable_groups(model)]
    return len(starts) * total / sum(sum(times[d:]) for d in starts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default=str(ROOT / "cfg" / "yolo-fastest-1.1.cfg"))
    parser.add_argument("--weights", default=str(ROOT / "weights" / "yolo-fastest-1.1.weights"))
    parser.add_argument("--data", default=str(ROOT / "data" / "coco128-val" / "coco128-val.data"))
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DARKPRUNE_QUIET", "1")

    model = dp.load(args.cfg, args.weights)
    data = load_dataset(args.data, args.limit)
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="darkprune-bench-ana-") as cache:
        # numba's JIT and the input cache are warmed first, so neither run pays them
        evaluate(model, data, batch=args.batch, cache_dir=cache, progress=False)

        def run(prefix_cache: bool):
            return analyze(model, data, rates=rates, batch=args.batch, prefix_cache=prefix_cache, progress=False,
                           cache_dir=cache)
        runs = {True: [], False: []}
        for _ in range(max(1, args.repeats)):
            for prefix_cache in (True, False):
                runs[prefix_cache].append(timed(lambda: run(prefix_cache)))
        cached, cached_wall, _ = min(runs[True], key=lambda r: r[1])
        plain, plain_wall, _ = min(runs[False], key=lambda r: r[1])
        cached_cpu = min(r[2] for r in runs[True])
        plain_cpu = min(r[2] for r in runs[False])
        same = all(r[0].curves == plain.curves and r[0].baseline == plain.baseline
                   for r in runs[True] + runs[False])
        bound = ideal_speedup(model, args.batch)
    evaluations = len(cached.curves) * len(rates)
    figures = {
        "cfg": args.cfg, "images": len(data), "rates": rates, "groups": len(cached.curves),
        "evaluations": evaluations,
        "with_cache_s": round(cached_wall, 2), "without_cache_s": round(plain_wall, 2),
        "speedup_wall": round(plain_wall / cached_wall, 2),
        "with_cache_cpu_s": round(cached_cpu, 2), "without_cache_cpu_s": round(plain_cpu, 2),
        "speedup_cpu": round(plain_cpu / cached_cpu, 2),
        # each repeat's pair (with, without) run back to back: the spread of their ratios shows the machine's noise
        "pair_speedups": [round(b[1] / a[1], 2) for a, b in zip(runs[True], runs[False])],
        "ideal_forward_speedup": round(bound, 2), "repeats": args.repeats,
        "same_curves": same,
        "cpu_count": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"ana on {Path(args.cfg).name}: {figures['groups']} groups x {len(rates)} rates = {evaluations} "
              f"evaluations of {len(data)} images")
        print(f"{'':>22}{'wall s':>10}{'CPU s':>10}")
        print(f"{'without prefix cache':>22}{plain_wall:10.1f}{plain_cpu:10.1f}")
        print(f"{'with prefix cache':>22}{cached_wall:10.1f}{cached_cpu:10.1f}")
        print(f"{'speedup':>22}{figures['speedup_wall']:9.2f}x{figures['speedup_cpu']:9.2f}x")
        print(f"{'each repeat':>22}  " + ", ".join(f"{r:.2f}x" for r in figures["pair_speedups"]))
        print(f"ideal for this network (forward pass only, no decoding): {bound:.2f}x")
        print(f"identical curves: {figures['same_curves']}; load average {figures['load_average']} on "
              f"{figures['cpu_count']} CPUs")
    return 0 if figures["same_curves"] else 1


if __name__ == "__main__":
    sys.exit(main())
