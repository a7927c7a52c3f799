"""What reconstruction buys before any finetuning: Yolo-Fastest 1.1 pruned by `plan_by_rate` at 10/20/30/40% fewer
BFLOPs, mAP@0.5 of plain masking, + bias compensation, + compensation and reconstruction, and the time of
`darkprune prune --reconstruct` with 256 calibration images.

    .venv/bin/python benchmarks/bench_reconstruct.py [--workspace /work/exp/recon/yf] [--rates 0.1,0.2,0.3,0.4]
        [--calib-images 256] [--layers readers|all] [--ridge 1e-3] [--no-timing]

Calibration images come from coco128.data's train= list (128 train2017 images, mirrored copies fill up to 256);
every mAP is measured on its valid= list (the 128 full-size val2017 images; the unpruned model scores 0.3291). The
sensitivity analysis (and, when `ana --reconstruct` was run there, its second curve set) is kept in the workspace
outside the repository, so reruns reuse it; a missing analysis is run first (`darkprune ana`, default rates).
Every plan is made on the plain curves, so the three columns prune the same channels; when the workspace holds the
reconstructed curves, a fourth column plans on those (what `prune --reconstruct` does) and reconstructs.
Writes benchmarks/results/reconstruct.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import darkprune as dp  # noqa: E402
from darkprune.evaluate import evaluate  # noqa: E402
from darkprune.prune.analysis import Sensitivity  # noqa: E402
from darkprune.prune.calibration import calibration_inputs, train_list  # noqa: E402
from darkprune.prune.compensate import compensate  # noqa: E402
from darkprune.prune.masks import apply_masks, live_stats  # noqa: E402
from darkprune.prune.plan import masks_for_plan  # noqa: E402
from darkprune.prune.reconstruct import reconstruct  # noqa: E402

CFG = ROOT / "cfg" / "yolo-fastest-1.1.cfg"
WEIGHTS = ROOT / "weights" / "yolo-fastest-1.1.weights"
DATA = ROOT.parent / "shared" / "assets" / "coco128" / "coco128.data"
OUT = ROOT / "benchmarks" / "results"


def cli(*argv) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DARKPRUNE_QUIET="1")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "darkprune", *map(str, argv)], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"darkprune {' '.join(map(str, argv))} failed:\n{done.stderr}")
    return time.perf_counter() - started, done.stdout


def ensure_analysis(workspace: Path) -> None:
    if not (workspace / "sensitivity.json").exists():
        print(f"no analysis in {workspace}: running darkprune ana (resumable)", flush=True)
        cli("ana", CFG, WEIGHTS, "--data", DATA, "-w", workspace, "-q")


def map50(model) -> float:
    return round(float(evaluate(model, str(DATA), progress=False)["map50"]), 4)


def row(model, sens, rate, calib, layers, ridge) -> dict:
    plan = sens.plan(rate=rate)
    masks = masks_for_plan(model, plan)
    masked = apply_masks(model, masks)
    folded = compensate(model, masked, masks)
    started = time.perf_counter()
    rebuilt = reconstruct(model, folded, calib, masks, ridge=ridge, layers=layers, progress=False)
    seconds = time.perf_counter() - started
    stats = live_stats(model, masks)
    out = {"target": rate, "bflops": round(stats["total_bflops"], 4),
           "fewer_bflops": round(1 - stats["total_bflops"] / stats["total_bflops_before"], 4),
           "groups": len(masks.pruned), "masked": map50(masked), "compensated": map50(folded),
           "reconstructed": map50(rebuilt), "reconstruct_seconds": round(seconds, 1)}
    if sens.complete_reconstructed:
        second = masks_for_plan(model, sens.with_reconstructed().plan(rate=rate))
        again = reconstruct(model, compensate(model, apply_masks(model, second), second), calib, second,
                            ridge=ridge, layers=layers, progress=False)
        out["reconstructed_own_plan"] = map50(again)
        out["own_plan_fewer_bflops"] = round(1 - live_stats(model, second)["total_bflops"] /
                                             stats["total_bflops_before"], 4)
    print(json.dumps(out), flush=True)
    return out


def markdown(result: dict) -> str:
    own = any("reconstructed_own_plan" in r for r in result["rows"])
    head = "| target | fewer BFLOPs | BFLOPs | groups | masked | + compensation | + reconstruction |"
    head += " planned on reconstructed curves |" if own else ""
    lines = [f"Yolo-Fastest 1.1, mAP@0.5 on the 128 full-size coco128 val2017 images before any finetuning "
             f"(unpruned {result['baseline']:.4f}); reconstruction on {result['calib_images']} calibration images "
             f"of the train= list (layers={result['layers']}, ridge={result['ridge']:g}). Plans by "
             f"`plan_by_rate` on the plain curves.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        line = (f"| {r['target']:.0%} | {r['fewer_bflops']:.1%} | {r['bflops']:.4f} | {r['groups']} | "
                f"{r['masked']:.4f} | {r['compensated']:.4f} | {r['reconstructed']:.4f} |")
        if own:
            line += (f" {r['reconstructed_own_plan']:.4f} ({r['own_plan_fewer_bflops']:.1%} fewer) |"
                     if "reconstructed_own_plan" in r else " |")
        lines.append(line)
    if result.get("prune_seconds") is not None:
        lines += ["", f"`{result['prune_command']}`: {result['prune_seconds']:.1f} s wall (process start, model and "
                      f"image loading, reconstruction {result['prune_reconstruct_seconds']:.1f} s, evaluation on "
                      f"the 128 val images and writing included) on the shared 2-core machine "
                      f"(load average {result['load_average']:.1f} when it started)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", default="/work/exp/recon/yf")
    ap.add_argument("--rates", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--layers", default="readers", choices=["readers", "all"])
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--no-timing", action="store_true", help="skip timing `darkprune prune --reconstruct`")
    ap.add_argument("--out", default=str(OUT / "reconstruct"), help="results prefix (.json and .md)")
    args = ap.parse_args()
    workspace = Path(args.workspace)
    ensure_analysis(workspace)
    model = dp.load(CFG, WEIGHTS)
    sens = Sensitivity.load(workspace / "sensitivity.json", model)
    result = {"baseline": sens.baseline, "calib_images": args.calib_images, "layers": args.layers,
              "ridge": args.ridge, "calib_list": len(train_list(DATA)), "rows": []}
    if not args.no_timing:
        command = ["prune", CFG, WEIGHTS, "-w", workspace, "--rate", 0.2, "--reconstruct", "--calib-images",
                   args.calib_images, "--json"]
        result["load_average"] = os.getloadavg()[0]
        seconds, out = cli(*command)
        summary = json.loads(out)
        result.update({"prune_seconds": round(seconds, 1), "prune_reconstruct_seconds":
                       summary["reconstruct_seconds"], "prune_map50": summary["metric_after"],
                       "prune_planned_on": summary["planned_on"],
                       "prune_command": "darkprune prune YF.cfg YF.weights -w WS --rate 0.2 --reconstruct "
                                        f"--calib-images {args.calib_images}"})
        print(f"prune --reconstruct: {seconds:.1f} s ({summary['reconstruct_seconds']} s reconstructing), "
              f"map50 {summary['metric_after']:.4f} (planned on the {summary['planned_on']} curves)", flush=True)
    calib = calibration_inputs(model, str(DATA), args.calib_images)
    for rate in (float(r) for r in args.rates.split(",")):
        result["rows"].append(row(model, sens, rate, calib, args.layers, args.ridge))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown(result))):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_name(out.name + suffix))
    print(markdown(result))


if __name__ == "__main__":
    main()
