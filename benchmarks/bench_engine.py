"""Our engine against OpenCV's Darknet importer on the reference models, batch 1 and 8, 1 and 2 threads.

Each configuration runs in a fresh process (thread pools are sized once per process), with warm-up excluded and the
median of repeated runs; peak memory during one batch-8 inference is measured in separate child processes.
Prints a table and writes it as JSON (benchmarks/results/engine.json) and Markdown.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 15] [--quick]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
MODELS = [
    ("yolov4-tiny 416", ASSETS / "cfg" / "yolov4-tiny.cfg", None),
    ("Yolo-Fastest 1.1", ROOT / "cfg" / "yolo-fastest-1.1.cfg", ROOT / "weights" / "yolo-fastest-1.1.weights"),
]


def run_one(cfg, weights, batch, threads, repeats, memory):
    code = ("import json,sys; from darkprune.workflow.timing import bench; a=json.loads(sys.argv[1]); "
            "print(json.dumps(bench(*a)))")
    args = json.dumps([str(cfg), str(weights) if weights else None, batch, threads, repeats, 2, memory])
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark failed for {cfg}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 threads only")
    args = parser.parse_args()
    rows = []
    for name, cfg, weights in MODELS:
        if not cfg.exists():
            print(f"skipping {name}: {cfg} not found", file=sys.stderr)
            continue
        for batch in ((1,) if args.quick else (1, 8)):
            for threads in ((2,) if args.quick else (1, 2)):
                memory = batch == 8 and threads == 2
                r = run_one(cfg, weights, batch, threads, args.repeats, memory)
                r["model"] = name
                rows.append(r)
                mem = f"  memory ours {r['ours_peak_mb']} MB / OpenCV {r['opencv_peak_mb']} MB " \
                      f"(x{r['memory_ratio']})" if memory else ""
                print(f"{name:18s} batch {batch} threads {threads}: ours {r['ours_ms']:8.2f} ms  OpenCV "
                      f"{r['opencv_ms']:8.2f} ms  ratio {r['ratio']:.3f}{mem}", flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "engine.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | batch | threads | ours ms | OpenCV ms | ours/OpenCV | peak MB ours / OpenCV |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['ours_peak_mb']} / {r['opencv_peak_mb']}" if "ours_peak_mb" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['ours_ms']:.2f} | {r['opencv_ms']:.2f} | "
                     f"{r['ratio']:.3f} | {mem} |")
    (out / "engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
