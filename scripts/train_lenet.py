"""Train LeNet-5 (cfg/lenet.cfg) on MNIST from a seeded random start with darkprune's training engine.

    .venv/bin/python scripts/train_lenet.py [--data ~/.cache/darkprune/mnist/mnist.data] [--out weights/lenet.weights]

The MNIST folder is made by scripts/mnist_to_darknet.py (run first when --data does not exist). Training is Darknet's
procedure as darkprune.train.finetune runs it: the cfg's batch 64, learning rate 0.01 with momentum 0.9 and weight
decay 0.0005, `steps` policy, max_batches iterations, images drawn at random from the 60,000 training digits, no
augmentation (the cfg's crop equals the image, flip=0). The start is darkprune's seeded He-scaled initialisation
(`darkprune.load(cfg, seed=SEED)`). At the end the model is measured on the 10,000 test digits (which play no part in
training: no early stopping or checkpoint selection on them) and the weights are written atomically. The script
fails (exit 1) below --min-top1 (default 0.99) unless --allow-below is given.

Threads: numba's thread pool spins at each parallel kernel's barrier; on a machine shared with other busy processes
that costs a scheduler slice per kernel launch, which dominates on a net this small. `--threads 1` (the default) is
then several times faster than 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path.home() / ".cache" / "darkprune" / "mnist" / "mnist.data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", type=Path, default=ROOT / "cfg" / "lenet.cfg")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"MNIST in Darknet's layout ({DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=ROOT / "weights" / "lenet.weights")
    parser.add_argument("--iters", type=int, help="iterations (default: the cfg's max_batches)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and every batch draw")
    parser.add_argument("--threads", type=int, default=1, help="numba threads (see the module doc)")
    parser.add_argument("-w", "--workspace", type=Path, help="checkpoints (resumable with --resume)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--min-top1", type=float, default=0.99)
    parser.add_argument("--allow-below", action="store_true", help="write the weights even below --min-top1")
    args = parser.parse_args(argv)

    import numba
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    import darkprune as dp
    from darkprune.util.files import atomic_write_bytes
    from darkprune.train.finetune import finetune

    if not args.data.exists():
        if args.data != DEFAULT_DATA:
            print(f"error: {args.data}: no such file", file=sys.stderr)
            return 1
        subprocess.run([sys.executable, str(ROOT / "scripts" / "mnist_to_darknet.py"), "--out",
                        str(args.data.parent)], check=True)

    model = dp.load(args.cfg, seed=args.seed)
    started = time.perf_counter()
    result = finetune(model, str(args.data), iters=args.iters, seed=args.seed, workspace=args.workspace,
                      resume=args.resume, keep="last", progress=True)
    train_seconds = time.perf_counter() - started
    print(f"trained {result.iterations} iterations ({result.images_seen} images) in {train_seconds:.0f} s "
          f"({result.images_per_second:.0f} img/s), final avg loss {result.avg_losses[-1]:.4f}")
    t0 = time.perf_counter()
    metrics = dp.evaluate(model, str(args.data), progress=False)
    print(f"test: top-1 {metrics['top1']:.4f} ({metrics['images']} images, {time.perf_counter() - t0:.0f} s)")
    if metrics["top1"] < args.min_top1 and not args.allow_below:
        print(f"error: top-1 {metrics['top1']:.4f} is below {args.min_top1}; weights not written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, model.weights_bytes())
    print(f"written: {args.out} ({os.path.getsize(args.out)} bytes, seen {model.header.seen})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
