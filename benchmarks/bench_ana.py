"""Timing `darkprune ana`: the parallel variant path against the sequential one, or the prefix cache against none.

    .venv/bin/python benchmarks/bench_ana.py [--compare fast|prefix|before] [--before REV] [--quick] [--cfg CFG --weights W --data F.data]
        [--limit N] [--rates 0.1,...,0.9] [--workers N] [--json]

`--compare fast` (the default): the full default analysis of the bundled Yolo-Fastest 1.1 (36 groups x 9 rates) on
all 128 bundled coco128 val images, measured by the sequential path (DARKPRUNE_ANA_FAST=0: one variant after
another, numba's threads inside each kernel, scoring on a second thread) and by the new one
(prune/parallel_variants.py: the variants' batches on a worker pool, scored as they come; `--workers N` sets its
size, default 1), in one run. On a machine shared
with other processes the load changes by the minute, so the two paths take turns group by group (even groups: old
first, odd: new first) and each path's time is the sum of its groups plus its own baseline pass. Prints wall and CPU
time of each, their ratios, the load average at the start and the end, and checks that both measured the same
curves (the largest difference is printed). `--quick`: every fourth group only (9 of 36), for iterating.

`--compare prefix` (the older comparison, defaults --limit 32 --repeats 2): the same analysis with and without the
prefix cache, whole runs alternating `--repeats` times, the fastest of each counting. Prints wall and CPU time of
each, their ratios (and each repeat's), the ratio an ideal cache could reach on this network (the share of the
forward pass before each group's divergence layer, timed layer by layer), and checks that both runs measured
exactly the same curves. `--json` prints the figures as one JSON object.

`--compare before [--before REV]`: the whole `darkprune ana` command (the default 9 rates, all 128 images, a fresh
workspace) as a user runs it, by this tree and by the tree at REV (default 68dc748, main before the engine and
analysis work of issue 15), each in its own process with its own threading defaults, after a small warm-up run of
each (numba compiles into each tree's cache). `--repeats` runs of each alternate (old, new, new, old, ...); prints
each run's wall time, the medians and their ratio, and the largest difference between the two trees' curves.

Stacking the variants of a group into one larger batch through the shared suffix was tried first and measured
slower per image on this engine (one thread, per-image CPU of the rerun from layer 1 / 24 / 96 of Yolo-Fastest:
batch 16 0.457 / 0.287 / 0.099 s per 64 images, batch 32 0.514 / 0.335 / 0.098, batch 8 0.416 / 0.280 / 0.091):
the larger working set costs more than the fewer calls save, so the parallel path runs small batches instead.
"""
from __future__ import annotations

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
    parser.add_argument("--compare", choices=("fast", "prefix", "before"), default="fast")
    parser.add_argument("--before", default="68dc748", help="the old tree's git revision (--compare before)")
    parser.add_argument("--quick", action="store_true", help="every fourth group only (--compare fast)")
    parser.add_argument("--cfg", default=str(ROOT / "cfg" / "yolo-fastest-1.1.cfg"))
    parser.add_argument("--weights", default=str(ROOT / "weights" / "yolo-fastest-1.1.weights"))
    parser.add_argument("--data", default=str(ROOT / "data" / "coco128-val" / "coco128-val.data"))
    parser.add_argument("--limit", type=int, default=None, help="images (default: all for fast, 32 for prefix)")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None,
                        help="whole runs of each (--compare prefix: default 2; before: default 1)")
    parser.add_argument("--workers", type=int, default=None, help="the new path's workers (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DARKPRUNE_QUIET", "1")
    if args.compare == "prefix":
        args.limit = 32 if args.limit is None else args.limit
        args.repeats = 2 if args.repeats is None else args.repeats
        return compare_prefix(args)
    if args.compare == "before":
        args.repeats = 1 if args.repeats is None else args.repeats
        return compare_before(args)
    return compare_fast(args)


def compare_prefix(args) -> int:
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


def compare_fast(args) -> int:
    """The sequential and the parallel variant paths, taking turns group by group (see the module doc)."""
    from darkprune.engine.network import Network
    from darkprune.prune.analysis import divergence_layer, evaluation_outputs, prunable_groups
    from darkprune.prune.curves import CurveMeasurer
    from darkprune.prune.groups import build_grouping
    from darkprune.prune.variants import PrefixCache
    if args.workers:
        os.environ["DARKPRUNE_ANA_WORKERS"] = str(args.workers)
    model = dp.load(args.cfg, args.weights)
    data = load_dataset(args.data, args.limit)
    rates = [float(r) for r in args.rates.split(",")]
    grouping = build_grouping(model.graph)
    groups = sorted(prunable_groups(model, (), grouping), key=lambda g: (divergence_layer(grouping, g)[0], g.id))
    groups = groups[::4] if args.quick else groups
    load_start = os.getloadavg()
    paths = {}
    with tempfile.TemporaryDirectory(prefix="darkprune-bench-ana-") as cache:
        evaluate(model, data, batch=args.batch, cache_dir=cache, progress=False)   # numba's JIT, the input cache
        first = divergence_layer(grouping, groups[0])[0]
        for fast in (False, True):
            network = Network(model)
            prefix = PrefixCache(network, evaluation_outputs(network), len(data))
            base, wall, cpu = timed(lambda: evaluate(None, data, network=network, forward=prefix.base_runner(first),
                                                     progress=False, batch=args.batch, cache_dir=cache)["map50"])
            measurer = CurveMeasurer(model, data, rates, "l1", 1, args.batch, True, cache, grouping, network, prefix,
                                     fast=fast)
            paths[fast] = {"measurer": measurer, "wall": wall, "cpu": cpu, "curves": {}, "baseline": base}
        for k, group in enumerate(groups):
            for fast in ((False, True) if k % 2 == 0 else (True, False)):
                path = paths[fast]
                path["curves"][group.id], wall, cpu = timed(lambda: path["measurer"].curve(group))
                path["wall"] += wall
                path["cpu"] += cpu
            if not args.json:
                print(f"  group {k + 1}/{len(groups)} (id {group.id}): old {paths[False]['wall']:.1f} s, new "
                      f"{paths[True]['wall']:.1f} s so far; load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        for path in paths.values():
            path["measurer"].close()
    old, new = paths[False], paths[True]
    diff = max(abs(old["curves"][g][r] - new["curves"][g][r]) for g in old["curves"] for r in rates)
    diff = max(diff, abs(old["baseline"] - new["baseline"]))
    figures = {
        "cfg": args.cfg, "images": len(data), "rates": rates, "groups": len(groups), "quick": args.quick,
        "evaluations": len(groups) * len(rates),
        "old_s": round(old["wall"], 2), "new_s": round(new["wall"], 2), "ratio": round(old["wall"] / new["wall"], 3),
        "old_cpu_s": round(old["cpu"], 2), "new_cpu_s": round(new["cpu"], 2),
        "cpu_ratio": round(old["cpu"] / new["cpu"], 3),
        "identical_curves": old["curves"] == new["curves"] and old["baseline"] == new["baseline"],
        "max_difference": diff, "workers": args.workers or 1,
        "cpu_count": os.cpu_count(), "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"ana on {Path(args.cfg).name}: {figures['groups']} groups x {len(rates)} rates = "
              f"{figures['evaluations']} evaluations of {len(data)} images (+ one baseline pass each)")
        print(f"{'':>30}{'wall s':>10}{'CPU s':>10}")
        print(f"{'old (sequential variants)':>30}{old['wall']:10.1f}{old['cpu']:10.1f}")
        print(f"{'new (parallel_variants.py)':>30}{new['wall']:10.1f}{new['cpu']:10.1f}")
        print(f"{'old / new':>30}{figures['ratio']:9.2f}x{figures['cpu_ratio']:9.2f}x")
        print(f"identical curves: {figures['identical_curves']} (largest difference {diff:.3g}); load average "
              f"{figures['load_average_start']} at the start, {figures['load_average_end']} at the end, on "
              f"{figures['cpu_count']} CPUs")
    return 0 if diff <= 1e-9 else 1


def _ana_command(tree: Path, args, workspace: Path, limit, rates) -> tuple[float, dict]:
    """One `python -m darkprune ana` run by the darkprune in `tree`: (wall seconds, its sensitivity curves)."""
    command = [sys.executable, "-m", "darkprune", "ana", args.cfg, args.weights, "--data", args.data,
               "-w", str(workspace), "-q", "--batch", str(args.batch), "--rates", rates]
    if limit:
        command += ["--limit", str(limit)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=str(tree), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ana by {tree} failed: {proc.stderr.strip()[-600:]}")
    try:
        groups = json.loads((workspace / "sensitivity.json").read_text())["groups"]
        curves = {g["id"]: g["metric"] for g in groups}
    except (OSError, ValueError, KeyError, TypeError):
        curves = {}
    return wall, curves


def _curve_difference(a: dict, b: dict) -> float | None:
    """Largest |difference| between two runs' curves (None when their layouts differ)."""
    try:
        diffs = [abs(float(x) - float(y)) for g in a for x, y in zip(_values(a[g]), _values(b[g]), strict=True)]
        return max(diffs) if diffs and set(a) == set(b) else None
    except (KeyError, TypeError, ValueError):
        return None


def _values(curve):
    return list(curve.values()) if isinstance(curve, dict) else list(curve)


def compare_before(args) -> int:
    """This tree's `ana` against the tree at args.before, whole commands alternating (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="darkprune-bench-before-") as tmp:
        old_tree = Path(tmp) / "old"
        old_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"git archive {args.before}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
        trees = {"old": old_tree, "new": ROOT}
        for name, tree in trees.items():   # numba compiles each tree's kernels into its cache: not timed
            _ana_command(tree, args, Path(tmp) / f"warm-{name}", 2, "0.5")
        order = [("old", "new"), ("new", "old")]
        walls = {"old": [], "new": []}
        curves = {}
        for k in range(args.repeats):
            for name in order[k % 2]:
                wall, curves[name] = _ana_command(trees[name], args, Path(tmp) / f"ws-{name}-{k}", args.limit,
                                                  args.rates)
                walls[name].append(wall)
                if not args.json:
                    print(f"  {name} ({args.before if name == 'old' else 'this tree'}) run {k + 1}: {wall:.1f} s; "
                          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    old, new = statistics.median(walls["old"]), statistics.median(walls["new"])
    figures = {"cfg": args.cfg, "data": args.data, "limit": args.limit, "rates": args.rates, "before": args.before,
               "old_s": [round(w, 1) for w in walls["old"]], "new_s": [round(w, 1) for w in walls["new"]],
               "old_median_s": round(old, 1), "new_median_s": round(new, 1), "ratio": round(old / new, 2),
               "max_curve_difference": _curve_difference(curves["old"], curves["new"]),
               "cpu_count": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"darkprune ana on {Path(args.cfg).name}, rates {args.rates}, "
              f"{args.limit or 'all'} images: median of {args.repeats} run(s) each")
        print(f"  before ({args.before}): {old:.1f} s ({old / 60:.2f} min)")
        print(f"  this tree:          {new:.1f} s ({new / 60:.2f} min)")
        print(f"  before / now: {old / new:.2f}x; largest curve difference "
              f"{figures['max_curve_difference']}; load average {figures['load_average']} on "
              f"{figures['cpu_count']} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
