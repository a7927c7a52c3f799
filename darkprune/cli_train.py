"""`darkprune finetune` (registered into `darkprune.cli`): step 3 of the pruning workflow.

With a workspace made by `darkprune prune` (it holds masks.json), WEIGHTS defaults to WORKSPACE/pruned.weights (and
CFG to WORKSPACE/pruned.cfg) and the masks are held: pruned channels stay exactly zero. The numba engine trains on
this machine's CPU; `--engine darknet` hands the job to a Darknet build (GPUs), see train/darknet_handoff.py.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cli import _EXTRA_PARSERS, _common, command, emit, log
from . import cli_prune as _prune   # a module reference: cli_prune may still be initialising (import cycle)
from .errors import DarkpruneError

KEYS = ["iters", "lr", "batch", "subdivisions", "checkpoint_every", "eval_every", "limit", "resume", "seed",
        "bn_momentum", "engine", "darknet", "gpus", "transformed", "threads"]
FINETUNE_DEFAULTS = {"checkpoint_every": 100, "engine": "numba", "seed": 0, "resume": False, "transformed": False}


def _float(value, flag: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DarkpruneError(f"{flag} {value}: expected a number") from None


def _flag(value) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


@command("finetune")
def cmd_finetune(args) -> int:
    from .darknet import load
    from .prune.masks import Masks, apply_masks
    from .prune.workspace import Workspace

    ws_path = args.workspace or (None if args.config else _prune.DEFAULTS["workspace"])
    if not args.cfg and not args.config and ws_path and (Path(ws_path) / "pruned.cfg").is_file():
        args.cfg = str(Path(ws_path) / "pruned.cfg")
    s = _prune.settings(args, KEYS)
    if args.batch is None:      # settings() would fill in `ana`'s forward batch (16); here the cfg's batch is meant
        from .prune.workspace import read_config
        s["batch"] = read_config(args.config).get("batch") if args.config else None
    for key, value in FINETUNE_DEFAULTS.items():
        if s.get(key) in (None, ""):
            s[key] = value
    if not s.get("data"):
        raise DarkpruneError("darkprune finetune: --data F.data is required (its train= list is trained on, its "
                             "valid= list measured)")
    ws = Workspace(s["workspace"])
    has_masks = ws.exists("masks.json")
    weights = s.get("weights")
    if not weights:
        if not ws.exists("pruned.weights"):
            raise DarkpruneError(f"darkprune finetune: give WEIGHTS ({ws.path} holds no pruned.weights from "
                                 f"`darkprune prune`)")
        weights = str(ws.file("pruned.weights"))
        s["weights"] = weights
    model = load(s["cfg"], weights)
    masks = None
    if has_masks:
        masks = Masks.load(ws.file("masks.json"), model)
        model = apply_masks(model, masks)
        log(args, f"holding the masks of {ws.file('masks.json')}: {masks.total_pruned} channels in "
                  f"{len(masks.pruned)} groups stay zero")
    iters = _prune._int(s["iters"], "--iters")
    lr = _float(s["lr"], "--lr")
    batch = _prune._int(s["batch"], "--batch")
    subdivisions = _prune._int(s["subdivisions"], "--subdivisions")
    limit = _prune._int(s["limit"], "--limit")
    threads = _prune._int(s["threads"], "--threads")
    if threads:
        from .engine.blas import set_threads
        set_threads(threads)
    ws.save_config("finetune", {k: s.get(k) for k in ["cfg", "weights", "data", "workspace"] + KEYS})
    show = not args.quiet and not args.json

    if s["engine"] == "darknet":
        return _darknet(args, s, model, masks, ws, iters, lr, batch, subdivisions)
    if s["engine"] != "numba":
        raise DarkpruneError(f"--engine {s['engine']}: expected numba or darknet")
    if _flag(s["transformed"]):
        raise DarkpruneError("--transformed is for --engine darknet (the numba engine holds the masks exactly)")
    from .train.finetune import finetune
    started = time.perf_counter()
    result = finetune(model, s["data"], iters=iters, batch=batch, subdivisions=subdivisions, learning_rate=lr,
                      workspace=ws.path, checkpoint_every=_prune._int(s["checkpoint_every"], "--checkpoint-every"),
                      eval_every=_prune._int(s["eval_every"], "--eval-every"), eval_data=s["data"], eval_limit=limit,
                      resume=_flag(s["resume"]), seed=_prune._int(s["seed"], "--seed", low=0) or 0, progress=show,
                      bn_momentum=_float(s["bn_momentum"], "--bn-momentum"))
    payload = result.to_json()
    payload.update({"engine": "numba", "masks_held": masks is not None,
                    "channels_pruned": masks.total_pruned if masks is not None else 0,
                    "weights_in": weights, "wall_seconds": round(time.perf_counter() - started, 2)})
    if masks is not None:
        payload["pruned_still_zero"] = _pruned_zero(result.model, masks)
    ws.update_summary("finetune", payload)
    emit(args, payload, format_finetune(payload))
    return 0


def _pruned_zero(model, masks) -> bool:
    from .train.finetune import parameter_masks
    keep, _ = parameter_masks(model, masks)
    return all(not model.params[i][n][~m].any() for (i, n), m in keep.items())


def _darknet(args, s, model, masks, ws, iters, lr, batch, subdivisions) -> int:
    from .evaluate import evaluate
    from .train.darknet_handoff import darknet_finetune
    limit = _prune._int(s["limit"], "--limit")
    show = not args.quiet and not args.json
    before = evaluate(model, s["data"], limit=limit, progress=show)
    result = darknet_finetune(model, s["data"], ws.path, iters=iters, darknet=s.get("darknet"), learning_rate=lr,
                              batch=batch, subdivisions=subdivisions, gpus=s.get("gpus"), masks=masks,
                              transformed=_flag(s["transformed"]),
                              log=(lambda line: None) if args.quiet else (lambda line: log(args, line)))
    from .darknet import load
    trained = load(result.files["cfg"], result.files["weights"])
    after = evaluate(trained, s["data"], limit=limit, progress=show)
    metric = "map50" if "map50" in before else "top1"
    payload = {"engine": "darknet", "metric": metric, "metric_before": before[metric], "metric_after": after[metric],
               "iterations": iters, "masks_held": False, "masks_reapplied": masks is not None and
               not result.transformed, **result.to_json()}
    ws.update_summary("finetune", payload)
    text = [f"finetune with Darknet ({' '.join(result.command[1:3])}): weights from {result.weights_from}"]
    if result.revived:
        text.append(f"masks applied again: {result.revived['weights']} weights Darknet had revived were cleared "
                    f"(largest |w| {result.revived['max_abs']:.3g})")
    text.append(f"{metric:>10}: {before[metric]:.4f} -> {after[metric]:.4f} ({after[metric] - before[metric]:+.4f})")
    text.append("written: " + ", ".join(result.files[k] for k in ("cfg", "weights")))
    emit(args, payload, "\n".join(text))
    return 0


def format_finetune(p: dict) -> str:
    lines = [f"finetune: {p['iterations'] - p['start_iteration']} iterations"
             + (f" (resumed at {p['start_iteration']})" if p["start_iteration"] else "")
             + f", {p['images_seen']} images, {p['images_per_second']:.1f} images/s"
             + (f", {p['channels_pruned']} pruned channels held" if p.get("masks_held") else "")]
    sched = p["schedule"]
    lines.append(f"{'schedule':>10}: lr {sched['learning_rate']:g}, policy {sched['policy']}, burn_in "
                 f"{sched['burn_in']}" + (f", steps {sched['steps']}" if sched["steps"] else ""))
    if p.get("final_loss") is not None:
        lines.append(f"{'loss':>10}: {p['final_loss']:.4f} (avg {p['final_avg_loss']:.4f})")
    m = p.get("metric")
    if m and p.get("metric_before") is not None and p.get("metric_after") is not None:
        lines.append(f"{m:>10}: {p['metric_before']:.4f} -> {p['metric_after']:.4f} "
                     f"({p['metric_after'] - p['metric_before']:+.4f}; kept the {p['kept']} weights"
                     + (f", iteration {p['best_iteration']}" if p["kept"] == "best" else "") + ")")
    if p.get("pruned_still_zero") is not None:
        lines.append(f"{'masks':>10}: pruned weights still exactly zero: {'yes' if p['pruned_still_zero'] else 'NO'}")
    files = p.get("files", {})
    if files:
        lines.append("written: " + ", ".join(str(files[k]) for k in ("cfg", "weights", "loss_plot") if k in files)
                     + f" (checkpoints in {files.get('checkpoints')})")
    return "\n".join(lines)


def _add_parser(sub) -> None:
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
    _common(p)


_EXTRA_PARSERS.append(_add_parser)
