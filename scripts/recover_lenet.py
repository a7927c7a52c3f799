"""Prune the bundled LeNet-5 to at most 30% of its parameters and recover its accuracy: a recipe, end to end.

    .venv/bin/python scripts/recover_lenet.py [--data ~/.cache/darkprune/mnist/mnist.data] [--keep 0.3]
                                              [--steps 3] [--iters 6000] [--out-dir benchmarks/results] [--quick]

Starts from cfg/lenet.cfg + weights/lenet.weights (scripts/train_lenet.py; 431,080 parameters, 99.14%) and runs:
  1. a sensitivity analysis of its three channel groups (conv0's filters, conv2's filters, connected4's neurons;
     connected5 gives the 10 classes) on CALIB training digits (the last ones of the 60,000; no labels of the test
     set are read before the end);
  2. --steps K rounds of: plan by a share of the PARAMETERS (plan_by_rate(..., cost="params"); Darknet's BFLOPs count
     gives connected layers none, and connected4 holds 93% of LeNet's parameters), the kept share going geometrically
     from 1 to --keep (step k keeps keep^(k/K)); mask the lowest-L1 channels (a superset of the previous step's);
     bias compensation (prune/compensate.py: a pruned channel's constant output folded into its readers' biases);
     finetune on the 60,000 training digits with the masks held (the cfg's SGD: lr --lr, momentum 0.9, decay
     0.0005, its steps policy x0.1 at 70% and 90% compressed to the step's iterations; no augmentation, as the cfg
     says). The intermediate steps run --step-iters iterations, the last --iters;
  3. transform: the masked channels removed for real (a smaller .cfg/.weights, outputs checked equal);
  4. top-1 on the 10,000 test digits, with darkprune's engine (dp.evaluate, Darknet's classifier preprocessing) and
     with OpenCV's Darknet importer (cv2.dnn.readNetFromDarknet on the transformed pair, the PNGs read by cv2 and
     divided by 255), and the share of digits on which the two predict the same class.
The test digits are measured for the table only (before finetuning and after each step), never to choose anything:
no early stopping, no best-checkpoint pick (the last weights of each finetune are kept).

Writes OUT_DIR/recover_lenet.json and .md (the table: params, BFLOPs, top-1 at each stage, ours vs OpenCV; with
--quick recover_lenet_quick.*) and, in the workspace (-w, default ./workspace-recover-lenet), the analysis, every
round's masks, checkpoints and weights, and the pruned pair lenet-pruned.cfg/.weights. Deterministic for a --seed; rerun with --resume to continue an interrupted
run (a finished step is taken from its saved weights, a finetune from its newest checkpoint).

--quick: a short run for tests (2 analysis rates on 200 digits, one step of 40 iterations of 32, measured on the
first 500 test digits only).

Threads: as scripts/train_lenet.py, --threads 1 (the default) is fastest on a busy 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path.home() / ".cache" / "darkprune" / "mnist" / "mnist.data"
GROUP_NAMES = {"conv0": "conv1", "conv2": "conv2", "connected4": "ip1"}        # Darknet's name -> Caffe's


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", type=Path, default=ROOT / "cfg" / "lenet.cfg")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "lenet.weights")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"MNIST in Darknet's layout ({DEFAULT_DATA})")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results", help="the table goes here")
    parser.add_argument("-w", "--workspace", type=Path, help="analysis, checkpoints, each round's weights and the "
                        "pruned pair (default: ./workspace-recover-lenet, or OUT_DIR/recover_lenet with --quick)")
    parser.add_argument("--keep", type=float, default=0.3, help="largest share of the parameters kept (default 0.3)")
    parser.add_argument("--steps", type=int, default=3, help="pruning rounds to reach --keep (default 3)")
    parser.add_argument("--iters", type=int, default=6000, help="finetuning iterations after the last round")
    parser.add_argument("--step-iters", type=int, default=1500, help="finetuning iterations after the other rounds")
    parser.add_argument("--lr", type=float, default=0.01, help="finetuning learning rate (the cfg's: 0.01)")
    parser.add_argument("--batch", type=int, help="images per iteration (default: the cfg's 64)")
    parser.add_argument("--rates", default="0.1,0.2,0.3,0.4,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9",
                        help="analysed rates per group")
    parser.add_argument("--calib", type=int, default=2000, help="training digits the analysis measures on")
    parser.add_argument("--exclude", default="", help="comma list of layers never pruned (conv0, conv2, connected4)")
    parser.add_argument("--no-compensate", dest="compensate", action="store_false")
    parser.add_argument("--test-limit", type=int, help="measure on the first N test digits only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a short run for tests (see the module doc)")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.iters, args.step_iters = 1, 40, 0
        args.batch, args.rates, args.calib = args.batch or 32, "0.5,0.8", 200
        args.test_limit = args.test_limit or 500
    if not 0 < args.keep < 1 or args.steps < 1 or args.iters < 1:
        parser.error("--keep must lie in (0, 1), --steps and --iters be at least 1")
    return args


def ensure_data(path: Path) -> Path | None:
    if path.exists():
        return path
    if path != DEFAULT_DATA or not (ROOT.parent / "shared" / "assets" / "mnist").exists():
        return None
    subprocess.run([sys.executable, str(ROOT / "scripts" / "mnist_to_darknet.py"), "--out", str(path.parent)],
                   check=True)
    return path


def keep_schedule(keep: float, steps: int) -> list[float]:
    """The kept share of the parameters after each round: geometric from 1 to `keep`."""
    return [keep ** ((k + 1) / steps) for k in range(steps)]


def grow_masks(model, plan, previous, grouping):
    """The plan's masks, joined with the previous round's (a channel once pruned stays pruned)."""
    from darkprune.prune.masks import Masks
    from darkprune.prune.plan import masks_for_plan
    new = masks_for_plan(model, plan, (), grouping).pruned
    pruned = {}
    for gid in set(new) | set(previous.pruned if previous else {}):
        old = previous.pruned.get(gid, []) if previous else []
        pruned[gid] = np.union1d(np.asarray(new.get(gid, []), np.int64), np.asarray(old, np.int64))
    return Masks.for_model(model, pruned, (), grouping)


def layer_counts(model, masks) -> dict:
    from darkprune.prune.masks import live_stats
    stats = live_stats(model, masks)
    return {"params": stats["total_params"], "bflops": round(stats["total_bflops"], 6),
            "channels": {r["name"]: r["out_channels"] for r in stats["layers"] if r["name"] in GROUP_NAMES}}


def run_round(k, keep, current, sens, grouping, previous, train, test, ws, args, log) -> tuple:
    """One round: plan to `keep` of the parameters, mask, compensate, finetune. (model, masks, record)."""
    import darkprune as dp
    from darkprune.darknet import load
    from darkprune.prune.masks import Masks, apply_masks
    from darkprune.prune.plan import plan_by_rate
    from darkprune.train.finetune import finetune
    from darkprune.util.files import atomic_write_text
    folder = ws / f"step-{k}"
    done = folder / "done.json"
    iters = args.iters if k == args.steps else args.step_iters
    if args.resume and done.exists():
        record = json.loads(done.read_text())
        model = load(folder / "finetuned.cfg", folder / "finetuned.weights")
        log(f"round {k}: taken from {folder} (top-1 {record['top1_after']:.4f})")
        return model, Masks.load(folder / "masks.json", model), record
    plan = plan_by_rate(current, sens, 1 - keep, cost="params", grouping=grouping)
    masks = grow_masks(current, plan, previous, grouping)
    masked = apply_masks(current, masks, grouping=grouping)
    if args.compensate:
        from darkprune.prune.compensate import compensate
        masked = compensate(current, masked, masks, grouping)
    counts = layer_counts(current, masks)
    before = dp.evaluate(masked, test, progress=False)["top1"]
    log(f"round {k}: {counts['params']:,} params ({counts['params'] / current.graph.total_params:.1%}), "
        f"channels {counts['channels']}, top-1 {before:.4f} before finetuning; finetuning {iters} iterations")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if iters > 0:
        result = finetune(masked, train, iters=iters, masks=masks, batch=args.batch, learning_rate=args.lr,
                          workspace=folder, checkpoint_every=250, resume=args.resume, seed=args.seed + k,
                          keep="last", progress=args.progress)
        iters_run, loss = result.iterations, result.avg_losses[-1]
    else:
        masked.save(folder / "finetuned.cfg", folder / "finetuned.weights")
        iters_run, loss = 0, None
    seconds = time.perf_counter() - started
    after = dp.evaluate(masked, test, progress=False)["top1"]
    log(f"round {k}: top-1 {after:.4f} after {iters_run} iterations ({seconds:.0f} s, avg loss {loss})")
    masks.save(folder / "masks.json")
    record = {"round": k, "keep_target": keep, **counts, "rates": {str(g): r for g, r in plan.rates.items()},
              "predicted_loss": plan.predicted_loss, "top1_before": before, "iterations": iters_run,
              "top1_after": after, "final_avg_loss": loss, "seconds": round(seconds, 1)}
    atomic_write_text(done, json.dumps(record, indent=1) + "\n")      # last: marks the round as finished
    return masked, masks, record


def read_test_digits(test) -> tuple[np.ndarray, np.ndarray]:
    """The test PNGs as OpenCV sees them: grey, /255, NCHW float32; and their labels."""
    import cv2
    images = np.empty((len(test), 1, 28, 28), np.float32)
    for i, path in enumerate(test.image_paths):
        pixels = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if pixels is None or pixels.shape != (28, 28):
            raise SystemExit(f"error: {path}: not a 28x28 grey image")
        images[i, 0] = pixels / np.float32(255)
    return images, np.asarray(test.labels)


def opencv_predictions(cfg: Path, weights: Path, images: np.ndarray, batch: int = 500) -> np.ndarray:
    import cv2
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    out = []
    for start in range(0, len(images), batch):
        net.setInput(images[start:start + batch])
        out.append(np.asarray(net.forward()).reshape(len(images[start:start + batch]), -1).argmax(1))
    return np.concatenate(out)


def our_predictions(model, images: np.ndarray, batch: int = 500) -> np.ndarray:
    from darkprune.engine.network import Network
    network = Network(model)
    last = len(model.graph) - 1
    out = []
    for start in range(0, len(images), batch):
        scores = network.forward(np.ascontiguousarray(images[start:start + batch]))[last]
        out.append(scores.reshape(len(images[start:start + batch]), -1).argmax(1))
    return np.concatenate(out)


def measure_pair(small, cfg: Path, weights: Path, test) -> dict:
    import darkprune as dp
    images, labels = read_test_digits(test)
    ours = our_predictions(small, images)
    theirs = opencv_predictions(cfg, weights, images)
    return {"top1_ours": dp.evaluate(small, test, progress=False)["top1"],
            "top1_ours_cv2_pixels": float((ours == labels).mean()), "top1_opencv": float((theirs == labels).mean()),
            "same_prediction": float((ours == theirs).mean()), "images": len(test)}


def table(report: dict) -> str:
    o, f = report["original"], report["final"]
    lines = ["| model | params (share) | BFLOPs | conv1 / conv2 / ip1 channels | top-1 before finetuning | "
             "top-1 after finetuning | OpenCV top-1 | ours = OpenCV |", "|---|---|---|---|---|---|---|---|",
             f"| original | {o['params']:,} (100%) | {o['bflops']:.5f} | 20 / 50 / 500 | - | {o['top1']:.4f} | "
             f"{o['top1_opencv']:.4f} | |"]
    for r in report["rounds"]:
        ch = r["channels"]
        lines.append(f"| round {r['round']} (keep <= {r['keep_target']:.1%}) | {r['params']:,} "
                     f"({r['params'] / o['params']:.1%}) | {r['bflops']:.5f} | {ch.get('conv0', 20)} / "
                     f"{ch.get('conv2', 50)} / {ch.get('connected4', 500)} | {r['top1_before']:.4f} | "
                     f"{r['top1_after']:.4f} ({r['iterations']} it.) | | |")
    lines.append(f"| **transformed pair** | {f['params']:,} ({f['params'] / o['params']:.1%}) | {f['bflops']:.5f} | "
                 f"{f['channels']} | {report['one_shot']['top1']:.4f} (one cut, compensated) | "
                 f"**{f['top1_ours']:.4f}** | **{f['top1_opencv']:.4f}** | {f['same_prediction']:.2%} |")
    return "\n".join(lines)


def one_shot(original, masks, test, compensate: bool) -> dict:
    """The final masks cut into the unpruned model at once (compensated as the rounds are), before finetuning."""
    import darkprune as dp
    from darkprune.prune.masks import apply_masks
    masked = apply_masks(original, masks)
    if compensate:
        from darkprune.prune.compensate import compensate as fold
        masked = fold(original, masked, masks)
    return {"top1": dp.evaluate(masked, test, progress=False)["top1"]}


def recover(args, log) -> dict:
    import darkprune as dp
    from darkprune.data import load_data
    from darkprune.prune.groups import build_grouping
    from darkprune.workflow.steps import transform_and_check
    started = time.perf_counter()
    out = args.workspace or (args.out_dir / "recover_lenet" if args.quick else ROOT / "workspace-recover-lenet")
    out.mkdir(parents=True, exist_ok=True)
    original = dp.load(args.cfg, args.weights)
    grouping = build_grouping(original.graph)
    train = load_data(args.data, split="train")
    test = load_data(args.data, split="valid", limit=args.test_limit)
    calib = train.subset(range(len(train) - args.calib, len(train)))
    rates = [float(r) for r in args.rates.split(",")]
    exclude = [e.strip() for e in args.exclude.split(",") if e.strip()]
    sens = dp.analyze(original, calib, rates=rates, exclude=exclude, out_path=out / "sensitivity.json",
                      resume=args.resume, progress=args.progress)
    log(f"analysis on {len(calib)} training digits: baseline {sens.baseline:.4f}\n{sens.table()}")
    current, masks, rounds = original, None, []
    for k, keep in enumerate(keep_schedule(args.keep, args.steps), start=1):
        current, masks, record = run_round(k, keep, current, sens, grouping, masks, train, test, out, args, log)
        rounds.append(record)
    small, worst = transform_and_check(current, masks)
    cfg_out, weights_out = out / "lenet-pruned.cfg", out / "lenet-pruned.weights"
    small.save(cfg_out, weights_out)
    final = {**measure_pair(small, cfg_out, weights_out, test), "params": small.graph.total_params,
             "bflops": round(small.graph.total_bflops, 6), "transform_max_error": worst,
             "channels": " / ".join(str(small.graph[i].out_shape[0]) for i in (0, 2, 4)),
             "cfg": str(cfg_out), "weights": str(weights_out)}
    orig_pair = measure_pair(original, args.cfg, args.weights, test)
    report = {"original": {"params": original.graph.total_params, "bflops": round(original.graph.total_bflops, 6),
                           "top1": orig_pair["top1_ours"], "top1_opencv": orig_pair["top1_opencv"]},
              "analysis": {"images": len(calib), "baseline_top1": sens.baseline, "rates": rates,
                           "curves": {str(g): {str(r): v for r, v in c.items()} for g, c in sens.curves.items()}},
              "rounds": rounds, "one_shot": one_shot(original, masks, test, args.compensate), "final": final,
              "test_images": len(test), "seconds": round(time.perf_counter() - started, 1),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    report["final"]["params_share"] = final["params"] / report["original"]["params"]
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    import numba
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    from darkprune.util.files import atomic_write_text
    data = ensure_data(args.data)
    if data is None:
        print(f"error: {args.data}: no such file (run scripts/mnist_to_darknet.py)", file=sys.stderr)
        return 1
    args.data = data
    t0 = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {text}", flush=True)

    report = recover(args, log)
    text = table(report)
    f = report["final"]
    summary = (f"LeNet-5 pruned to {f['params_share']:.1%} of its parameters: top-1 {f['top1_ours']:.4f} (ours), "
               f"{f['top1_opencv']:.4f} (OpenCV) on {report['test_images']:,} MNIST test digits; "
               f"{report['seconds'] / 60:.1f} min")
    print(f"\n{summary}\n{text}")
    name = "recover_lenet_quick" if args.quick else "recover_lenet"
    atomic_write_text(args.out_dir / f"{name}.json", json.dumps(report, indent=1, default=str) + "\n")
    command = " ".join(["scripts/recover_lenet.py"] + [a for a in (argv if argv is not None else sys.argv[1:])])
    atomic_write_text(args.out_dir / f"{name}.md", f"# {summary}\n\n`{command}`\n\n{text}\n")
    print(f"written: {args.out_dir / (name + '.md')}, {args.out_dir / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
