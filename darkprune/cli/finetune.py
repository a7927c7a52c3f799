"""`darkprune finetune`: step 3 of the pruning workflow (see darkprune.workflow.finetune_step)."""
from __future__ import annotations

import argparse

from .common import add_common, command, given, logger, option_keys, parsers, progress

KEYS = ["cfg", "weights", "data", "workspace", "config", "iters", "lr", "batch", "subdivisions", "checkpoint_every",
        "eval_every", "limit", "resume", "seed", "bn_momentum", "engine", "darknet", "gpus", "transformed", "threads",
        "teacher", "teacher_weights", "distill_weight", "distill_temperature"]


@command("finetune")
def cmd_finetune(args) -> tuple[dict, str]:
    from ..workflow.finetune_step import finetune_settings, run_finetune
    s = finetune_settings(given(args, KEYS), option_keys())
    return run_finetune(s, progress=progress(args), log=logger(args), darknet_log=logger(args))


@parsers
def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="step 3: retrain the pruned model to win back accuracy (masks held)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train CFG/WEIGHTS on the .data file's train= list with Darknet's procedure (the cfg's batch,\n"
                    "subdivisions, momentum, decay, learning-rate policy compressed to --iters, its augmentation).\n"
                    "With a workspace made by `darkprune prune`, WEIGHTS defaults to WORKSPACE/pruned.weights and\n"
                    "the masks in masks.json are held: pruned channels stay exactly zero. Checkpoints go to\n"
                    "WORKSPACE/finetune/ (--resume continues the last one); the result is WORKSPACE/finetuned.cfg/\n"
                    ".weights (the best evaluated weights, or the last). --engine darknet runs Darknet's own\n"
                    "`detector train` / `classifier train` instead (GPUs) and brings the weights back.")
    p.add_argument("cfg", nargs="?", help="Darknet .cfg (default WORKSPACE/pruned.cfg)")
    p.add_argument("weights", nargs="?", help="Darknet .weights (default WORKSPACE/pruned.weights)")
    p.add_argument("-w", "--workspace", help="workspace folder (default: ./workspace)")
    p.add_argument("--config", help="a file of key=value settings (the flags' names)")
    p.add_argument("--data", help="Darknet .data file (train= is trained on, valid= measured)")
    p.add_argument("--iters", type=int, help="iterations (Darknet batches; default: the cfg's max_batches)")
    p.add_argument("--lr", type=float, help="base learning rate (default: the cfg's learning_rate)")
    p.add_argument("--batch", type=int, help="images per iteration (default: the cfg's batch)")
    p.add_argument("--subdivisions", type=int, help="mini-batches per iteration (default: the cfg's)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="write a checkpoint every N iterations (default 100; always at the end)")
    p.add_argument("--eval-every", dest="eval_every", type=int,
                   help="evaluate on the validation list every N iterations and keep the best weights "
                        "(always before and at the end)")
    p.add_argument("--limit", type=int, help="evaluate on the first N validation images only")
    p.add_argument("--resume", action="store_true", help="continue from the workspace's last checkpoint")
    p.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    p.add_argument("--bn-momentum", dest="bn_momentum", type=float,
                   help="batch-norm rolling statistics momentum (default 0.1, as AlexeyAB's CPU training)")
    p.add_argument("--threads", type=int, help="CPU threads for the numba engine (default: all)")
    p.add_argument("--engine", choices=["numba", "darknet"], help="numba (default, this CPU) or darknet (GPUs)")
    p.add_argument("--darknet", help="path of the darknet executable (--engine darknet; default: `darknet` on PATH)")
    p.add_argument("--gpus", help="GPUs for Darknet, e.g. 0,1")
    p.add_argument("--transformed", action="store_true",
                   help="--engine darknet: train the transformed (smaller, dense) model; Darknet cannot hold "
                        "masks, the smaller model needs none")
    p.add_argument("--teacher", help="distil from a teacher: 'original' (the workspace's unpruned model) or a "
                                     "teacher .cfg (with --teacher-weights); train= may then list unlabeled images")
    p.add_argument("--teacher-weights", dest="teacher_weights", help="the teacher cfg's .weights")
    p.add_argument("--distill-weight", dest="distill_weight", type=float,
                   help="weight of the distillation term (default 1)")
    p.add_argument("--distill-temperature", dest="distill_temperature", type=float,
                   help="softmax temperature of a classifier's distillation (default 4; [yolo] heads use none)")
    add_common(p)

