"""The finetuning loop: Darknet's training procedure on our numba engine, holding pruning masks.

    result = finetune(masked_model, "coco.data", iters=300, learning_rate=1e-4, workspace="ws")

One iteration = one of Darknet's batches: the cfg's `batch` images in `subdivisions` mini-batches, each run forward
(batch-norm on the mini-batch's statistics) and backward, gradients summed, then one DarknetSGD update with the
schedule's rate for this iteration (k = 1, 2, ...: the schedule restarts, as `darknet ... train -clear` does).

What comes from the cfg unless given: batch/subdivisions, learning_rate, momentum, decay (and Adam), the policy and
its steps; the number of iterations defaults to max_batches. When `iters` differs from max_batches the schedule is
compressed to it: burn_in, steps, step and sgdr_cycle are scaled by iters / max_batches and max_batches becomes iters
(so a 300-iteration finetune of a cfg trained for 500,000 keeps the same shape: a short warm-up, the steps at the same
fractions). A layer's `learning_rate=` option scales its rate (Darknet's learning_rate_scale).

Data: Darknet's pipeline: each mini-batch draws its images uniformly at random (with replacement) from the train
list and augments them from the cfg (jitter, flip, hue/saturation/exposure for detectors; crop, aspect, angle, flip
and HSV for classifiers; see augment.py). All randomness is derived from (seed, iteration, subdivision[, image]), so
a run is deterministic for a seed, images can be prepared on background threads, and a resumed run draws exactly
what the uninterrupted run would have.

Masks held: channel masks (a prune.masks.Masks, or the `.masks` that apply_masks leaves on a model) and fine-grained
masks (`{layer: {name: bool array, True = kept}}`, or "zeros" for every weight that is zero now). A masked entry is
zeroed before training and after every update, its gradient and momentum are dropped (DarknetSGD masks), and a pruned
channel's batch-norm rolling statistics are held at mean 0 / variance 1 (what apply_masks writes), so the result is
exactly the masked model `transform` expects.

Checkpoints (with a workspace): WORKSPACE/finetune/checkpoint-NNNNNNN.npz (every parameter array including the
rolling statistics, the optimizer's buffers and masks, the iteration, images seen, the loss history, the evaluation
history, the best metric so far, the seed that drives every random draw) and beside it a `.sha256` file (sha256sum
format), both written atomically, every `checkpoint_every` iterations and at the end; the last 2 are kept.
`resume=True` continues from the newest one, bit for bit as the uninterrupted run; one whose checksum does not match
is refused (DarkpruneError), never silently skipped. The best evaluated weights are kept in finetune/best.weights.

Evaluation: with `eval_data` (or `eval_every`), before training, every `eval_every` iterations and at the end, on
the validation list (`eval_limit` images); the kept weights (`keep="best"`, default when evaluating) are the best
evaluated ones, including the starting point, else the last. With a workspace they are written as
finetuned.cfg / finetuned.weights.

Batch norm: training mode (batch statistics) with the rolling statistics moving by `bn_momentum` (default 0.1, as
AlexeyAB's CPU training; see FINETUNE_BN_MOMENTUM for why not the GPU's 0.01).

Callbacks (for a user's own retraining loop): an object with methods, or a dict of callables,
`on_iteration(state)` after every update and `on_evaluation(state, metrics)` after every evaluation; setting
`state.stop = True` ends the run after the current iteration (checkpointed as at the end).

The iteration itself is train.loop.TrainingLoop's; what is finetune's are three hooks on it: the masks held
(_HoldMasks), the user's callbacks (_Callbacks) and the evaluations with the best weights kept (_Evaluation).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..util.files import atomic_write_bytes
from ..darknet.heads import is_detector, metric_name
from ..darknet.model import Model
from ..errors import DarkpruneError
from .backprop import TrainingNetwork, trainable_parameters
from .checkpoint import (CHECKPOINTS_KEPT, FORMAT, VERSION, checkpoint_paths, latest_checkpoint,  # noqa: F401
                         read_checkpoint, sha256_hex, write_checkpoint)
from .feeder import IMAGE_CACHE_BYTES, BatchFeeder  # noqa: F401
from .loop import Hooks, LoopSettings, TrainingLoop, TrainState, darknet_optimizer, split_batch
from .schedule import finetune_schedule, schedule_json  # noqa: F401

# Batch-norm rolling statistics: rolling = (1 - m) * rolling + m * batch. AlexeyAB's CPU training uses m = 0.1, its
# GPU training (and pjreddie's) 0.01. A finetune runs a few hundred iterations, not hundreds of thousands: with 0.01
# the rolling statistics (what inference uses) lag far behind the weights. Measured on the pruned Yolo-Fastest
# (threshold 0.02), 30 iterations at lr 1e-4: mAP@0.5 0.074 -> 0.042 with 0.01, -> 0.197 with 0.1.
FINETUNE_BN_MOMENTUM = 0.1
CHECKPOINT_DIR = "finetune"
FinetuneState = TrainState          # what callbacks see (the loop's state of an iteration)


# ---------------------------------------------------------------------------------------------------------------
# result

@dataclass
class FinetuneResult:
    model: Model                         # the trained model, holding the kept weights (best or last)
    iterations: int                      # the last iteration run
    start_iteration: int                 # 0, or where a resumed run picked up
    losses: list[float]                  # Darknet's per-iteration loss, from iteration 1
    avg_losses: list[float]
    learning_rates: list[float]
    evaluations: list[dict]              # [{"iteration": k, metric: value, ...}]
    metric: str | None                   # "map50" or "top1"
    metric_before: float | None
    metric_after: float | None           # of the kept weights
    best_iteration: int | None
    kept: str                            # "best" or "last"
    images_seen: int
    seconds: float                       # this run's training time (without evaluations)
    images_per_second: float
    schedule: dict
    files: dict = field(default_factory=dict)
    distill: dict | None = None          # the teacher (cfg, weights, digest), distill_weight, temperature

    def to_json(self) -> dict:
        return {
            "iterations": self.iterations, "start_iteration": self.start_iteration, "metric": self.metric,
            "metric_before": self.metric_before, "metric_after": self.metric_after,
            "best_iteration": self.best_iteration, "kept": self.kept, "images_seen": self.images_seen,
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 3),
            "final_loss": self.losses[-1] if self.losses else None,
            "final_avg_loss": self.avg_losses[-1] if self.avg_losses else None,
            "evaluations": self.evaluations, "schedule": self.schedule, "files": self.files,
            "distill": self.distill,
        }


# ---------------------------------------------------------------------------------------------------------------
# masks

def parameter_masks(model: Model, masks) -> tuple[dict[tuple[int, str], np.ndarray], dict[int, np.ndarray]]:
    """({(layer, name): bool array, True = kept} for the trainable arrays that have masked entries,
    {layer: pruned channel indices whose batch-norm rolling statistics are held at 0 / 1}).

    `masks`: None (the model's `.masks` if it carries some), a Masks, {group id: channels}, "zeros", a fine-grained
    {layer: {name: bool array}}, or a list of these (combined)."""
    if masks is None:
        masks = getattr(model, "masks", None)
        if masks is None:
            return {}, {}
    items = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    keep: dict[tuple[int, str], np.ndarray] = {}
    stats: dict[int, set] = {}
    trainable = {(i, n) for i, n, _ in trainable_parameters(model)}

    def combine(key, mask):
        arr = model.params[key[0]][key[1]]
        try:
            mask = np.broadcast_to(np.asarray(mask, bool), arr.shape)
        except ValueError:
            raise DarkpruneError(f"layer {key[0]} ({model.graph[key[0]].name}) {key[1]}: mask of shape "
                                 f"{np.shape(mask)} does not fit the array's {arr.shape}") from None
        keep[key] = keep[key] & mask if key in keep else mask.copy()

    for item in items:
        if isinstance(item, str):
            if item != "zeros":
                raise DarkpruneError(f"masks={item!r}: expected a Masks, a dict or 'zeros'")
            for index, name in trainable:
                if name == "weights" and model.graph[index].type in ("convolutional", "connected"):
                    arr = model.params[index][name]
                    if not arr.all():
                        combine((index, name), arr != 0)
            continue
        if isinstance(item, dict) and item and all(isinstance(v, dict) for v in item.values()):
            for index, named in item.items():
                for name, mask in named.items():
                    if (int(index), name) not in trainable:
                        raise DarkpruneError(f"mask for layer {index} '{name}': not a trainable array of this model")
                    combine((int(index), name), mask)
            continue
        # channel masks: see which entries apply_masks clears on an all-ones copy of the model
        from ..prune.masks import apply_masks
        ones = model.copy()
        for arrays in ones.params.values():
            for arr in arrays.values():
                arr[...] = 1.0
        cleared = apply_masks(ones, item)
        for index, arrays in cleared.params.items():
            for name, arr in arrays.items():
                if name == "rolling_mean":
                    dead = np.flatnonzero(arr == 0)
                    if len(dead):
                        stats.setdefault(index, set()).update(dead.tolist())
                elif (index, name) in trainable and not arr.all():
                    combine((index, name), arr != 0)
    return keep, {i: np.array(sorted(s), np.int64) for i, s in stats.items()}


def _hold(model: Model, keep: dict, stats: dict) -> None:
    """Zero every masked entry and hold pruned channels' rolling statistics at mean 0, variance 1."""
    for (index, name), mask in keep.items():
        model.params[index][name][~mask] = 0
    for index, channels in stats.items():
        p = model.params[index]
        p["rolling_mean"][channels] = 0
        p["rolling_variance"][channels] = 1


def _mask_digest(keep: dict, stats: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(keep):
        h.update(f"{key}".encode())
        h.update(np.packbits(keep[key].reshape(-1)).tobytes())
    for key in sorted(stats):
        h.update(f"stats{key}".encode())
        h.update(stats[key].tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# finetune's hooks on the training loop

class _HoldMasks(Hooks):
    """After every update: pruned channels' rolling statistics back to 0 / 1 (DarknetSGD's masks hold the
    masked weights themselves)."""

    def __init__(self, stats: dict):
        self.stats = stats

    def after_step(self, loop, rate):
        _hold(loop.model, {}, self.stats)


def _callbacks(callbacks) -> list:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _call(callbacks: list, name: str, *args) -> None:
    for cb in callbacks:
        fn = cb.get(name) if isinstance(cb, dict) else getattr(cb, name, None)
        if fn is not None:
            fn(*args)


class _Callbacks(Hooks):
    """The user's on_iteration callbacks after every iteration."""

    def __init__(self, callbacks: list):
        self.callbacks = callbacks

    def after_iteration(self, loop, state):
        _call(self.callbacks, "on_iteration", state)


class _Evaluation(Hooks):
    """Evaluations before training, every `every` iterations and at the end (when `data` is given), the best
    metric and (keep="best") the best weights, in memory and as finetune/best.weights in the workspace."""

    def __init__(self, data, limit, every, metric: str, keep: str, ws, callbacks: list):
        self.data, self.limit, self.every, self.metric, self.keep, self.ws = data, limit, every, metric, keep, ws
        self.callbacks = callbacks
        self.evaluations: list[dict] = []
        self.best: dict = {"value": None, "iteration": None}
        self.best_params = None

    def run(self, model: Model, k: int, state) -> None:
        from ..evaluate import evaluate
        metrics = evaluate(model, self.data, limit=self.limit, progress=False)
        value = float(metrics[self.metric])
        self.evaluations.append({"iteration": k, self.metric: value,
                                 **{m: float(metrics[m]) for m in ("map50", "map50_95", "top1", "top5")
                                    if m in metrics and m != self.metric}})
        if self.best["value"] is None or value > self.best["value"]:
            self.best["value"], self.best["iteration"] = value, k
            if self.keep == "best":
                self.best_params = _snapshot(model)
                if self.ws is not None:
                    self.best["sha256"] = _save_best(self.ws, model)
        if state is not None:
            _call(self.callbacks, "on_evaluation", state, metrics)

    def on_resume(self, loop, meta):
        self.evaluations, self.best = meta["evaluations"], meta["best"]
        self.best["sha256"] = meta.get("best_sha256")
        if self.best["iteration"] is not None and self.keep == "best":
            self.best_params = _load_best(self.ws, loop.model, meta.get("best_sha256"))

    def before_training(self, loop):
        if self.data is not None and loop.start == 0:
            self.run(loop.model, 0, None)

    def after_iteration(self, loop, state):
        k = state.iteration
        if self.data is not None and ((self.every and k % self.every == 0) or k == state.iters or state.stop):
            self.run(loop.model, k, state)

    def checkpoint_meta(self, loop):
        return {"evaluations": self.evaluations,
                "best": {"value": self.best["value"], "iteration": self.best["iteration"]},
                "best_sha256": self.best.get("sha256")}


# ---------------------------------------------------------------------------------------------------------------
# finetune

def _resolve_data(data, split: str):
    from ..data import Dataset, load_data
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, split=split)
    raise DarkpruneError(f"data must be a Dataset or the path of a .data file, not {type(data).__name__}")


def _train_data(data, distilling: bool):
    """The training Dataset; with a teacher, load_data's note on images without a label file says what they get."""
    import warnings
    if not distilling:
        return _resolve_data(data, "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_set = _resolve_data(data, "train")
    for w in caught:
        text = str(w.message).replace("(counted as images without objects)",
                                      "(with the teacher: distillation only, no task loss)")
        warnings.warn(text, w.category, stacklevel=3)
    return train_set


def _metric_name(model: Model) -> str:
    return metric_name(model.graph)


def _snapshot(model: Model) -> dict:
    return {i: {k: v.copy() for k, v in p.items()} for i, p in model.params.items()}


def _restore(model: Model, params: dict) -> None:
    for i, p in params.items():
        for k, v in p.items():
            model.params[i][k][...] = v


def _iteration_count(model: Model, iters, checkpoint_every, eval_every) -> int:
    iters = int(iters if iters is not None else model.graph.net["max_batches"])
    if iters <= 0:
        raise DarkpruneError(f"{model.cfg_path}: no iteration count: give iters (the cfg's max_batches is "
                             f"{model.graph.net['max_batches']})")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise DarkpruneError("checkpoint_every must be >= 1")
    if eval_every is not None and eval_every < 1:
        raise DarkpruneError("eval_every must be >= 1")
    return iters


def _evaluation_data(data, train_set, eval_data, eval_every, keep):
    """(the validation Dataset or None, the kept weights: "best" or "last")."""
    evaluating = eval_data is not None or eval_every is not None
    if evaluating and eval_data is None:
        source = data if isinstance(data, (str, os.PathLike)) else getattr(train_set, "source", None)
        if not source:
            raise DarkpruneError("eval_every needs eval_data (a Dataset without a .data source cannot give one)")
        eval_data = _resolve_data(source, "valid")
    elif eval_data is not None:
        eval_data = _resolve_data(eval_data, "valid")
    keep = keep or ("best" if evaluating else "last")
    if keep not in ("best", "last"):
        raise DarkpruneError(f"keep={keep!r}: expected 'best' or 'last'")
    return eval_data, keep


def finetune(model: Model, data, iters: int | None = None, masks=None, batch: int | None = None,
             subdivisions: int | None = None, learning_rate: float | None = None, workspace=None,
             checkpoint_every: int = 100, eval_every: int | None = None, eval_data=None,
             eval_limit: int | None = None, resume: bool = False, seed: int = 0, callbacks=None,
             progress: bool = True, keep: str | None = None, bn_momentum: float | None = None,
             data_threads: int = 2, teacher: Model | None = None, distill_weight: float = 1.0,
             distill_temperature: float | None = None) -> FinetuneResult:
    """Finetune `model` in place on `data` (a .data path, whose train= list is used, or a Dataset); see the module
    doc. Returns a FinetuneResult; `result.model` is `model`, holding the kept weights.

    teacher: a Model (typically the unpruned one) whose outputs the loss also pulls the student towards, times
    `distill_weight` (see train/distill.py; `distill_temperature`: classifiers only, default 4). With a teacher,
    images of the train list without ground truth get no task loss, only the distillation term."""
    from ..prune.masks import Masks, structure_fingerprint
    from ..util.folder import Folder as Workspace   # the run's output folder

    graph = model.graph
    iters = _iteration_count(model, iters, checkpoint_every, eval_every)
    mini_batch, subdivisions = split_batch(graph, batch, subdivisions)
    metric = _metric_name(model)
    train_set = _train_data(data, teacher is not None)
    eval_data, keep = _evaluation_data(data, train_set, eval_data, eval_every, keep)

    distill = _distillation(model, train_set, teacher, distill_weight, distill_temperature)
    held, held_stats = parameter_masks(model, masks)
    if isinstance(masks, Masks) and getattr(model, "masks", None) is None:
        model.masks = masks                # what `transform` uses by default, as apply_masks leaves it
    net = TrainingNetwork(model, np.float32, FINETUNE_BN_MOMENTUM if bn_momentum is None else bn_momentum, seed)
    _hold(model, held, held_stats)
    opt = darknet_optimizer(model, mini_batch * subdivisions, held)
    schedule = finetune_schedule(graph, iters, learning_rate)

    ws = Workspace(workspace) if workspace is not None else None
    ckpt_dir = ws.file(CHECKPOINT_DIR) if ws else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(exist_ok=True)
        if not resume:
            (ckpt_dir / "best.weights").unlink(missing_ok=True)
    settings = LoopSettings(
        iters=iters, mini_batch=mini_batch, subdivisions=subdivisions, seed=int(seed), checkpoint_dir=ckpt_dir,
        checkpoint_every=checkpoint_every, resume=resume, progress=progress, settings={
            "structure": structure_fingerprint(graph), "batch": mini_batch * subdivisions,
            "subdivisions": subdivisions, "bn_momentum": net.bn_momentum, "learning_rate": schedule.learning_rate,
            "seed": int(seed), "masks": _mask_digest(held, held_stats), "iters": iters,
            **_distill_settings(distill)})
    cbs = _callbacks(callbacks)
    evaluation = _Evaluation(eval_data, eval_limit, eval_every, metric, keep, ws, cbs)
    feeder = BatchFeeder(train_set, graph, mini_batch, seed, data_threads, unlabeled=distill is not None)
    hooks = [_HoldMasks(held_stats), _Callbacks(cbs), evaluation] + ([distill] if distill is not None else [])
    loop = TrainingLoop(model, net, opt, schedule, feeder, settings, hooks=hooks)
    result = _finish(model, loop.run(), evaluation, schedule, ws, ckpt_dir)
    result.distill = distill.describe() if distill is not None else None
    return result


def _distillation(model: Model, train_set, teacher, weight, temperature):
    """The Distillation hook (None without a teacher). Without one, a train list without any ground truth is
    refused (each image would teach "no objects"); a partly unlabeled one keeps Darknet's reading (load_data warns)."""
    from .distill import Distillation
    from .feeder import labeled_images
    if teacher is None:
        if len(train_set) and not labeled_images(train_set).any():
            what = "label file" if train_set.kind == "detection" else "label name in its path"
            raise DarkpruneError(f"{train_set.source or 'the training set'}: no training image has a {what}; give a teacher to train "
                                 f"on unlabeled images (distillation), or the labels")
        return None
    return Distillation(teacher, model.graph, weight, temperature)


def _distill_settings(distill) -> dict:
    """What a checkpoint records of the distillation (a resume must use the same teacher and weight)."""
    if distill is None:      # also what a checkpoint without these keys (made before distillation existed) reads
        return {"teacher": None, "distill_weight": None, "distill_temperature": None}
    d = distill.describe()
    return {"teacher": d["teacher_digest"], "distill_weight": d["distill_weight"],
            "distill_temperature": d["distill_temperature"]}


def _finish(model: Model, run, evaluation: _Evaluation, schedule, ws, ckpt_dir) -> FinetuneResult:
    """The kept weights back into the model, the workspace's files, the result."""
    evaluations, best, keep, metric = evaluation.evaluations, evaluation.best, evaluation.keep, evaluation.metric
    metric_before = evaluations[0][metric] if evaluations and evaluations[0]["iteration"] == 0 else None
    if keep == "best" and evaluation.best_params is not None and best["iteration"] != run.iterations:
        _restore(model, evaluation.best_params)
    metric_after = None
    if evaluations:
        metric_after = best["value"] if keep == "best" else evaluations[-1][metric]
    files = {}
    if ws is not None:
        cfg_out, weights_out = ws.file("finetuned.cfg"), ws.file("finetuned.weights")
        model.save(cfg_out, weights_out)
        files = {"cfg": str(cfg_out), "weights": str(weights_out), "checkpoints": str(ckpt_dir)}
        curve = ws.file("finetune_loss.png")
        plot_history(curve, run.history, evaluations, metric, start_at=1)
        files["loss_plot"] = str(curve)
        if evaluations:
            files["metric_plot"] = str(ws.file("finetune_metric.png"))
    history = run.history
    return FinetuneResult(
        model=model, iterations=run.iterations, start_iteration=run.start_iteration, losses=list(history["loss"]),
        avg_losses=list(history["avg_loss"]), learning_rates=list(history["lr"]), evaluations=evaluations,
        metric=metric if evaluations else None, metric_before=metric_before, metric_after=metric_after,
        best_iteration=best["iteration"], kept=keep, images_seen=run.seen, seconds=run.seconds,
        images_per_second=run.images_per_second, schedule=schedule_json(schedule), files=files)


def _save_best(ws, model: Model) -> str:
    data = model.weights_bytes()
    atomic_write_bytes(ws.file(CHECKPOINT_DIR) / "best.weights", data)
    return sha256_hex(data)


def _load_best(ws, model: Model, sha: str | None) -> dict:
    from ..darknet.weights import read_weights
    path = ws.file(CHECKPOINT_DIR) / "best.weights"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DarkpruneError(f"{path}: missing; the best weights of the interrupted run are needed to resume "
                             f"(or resume with keep='last')") from None
    if sha and sha256_hex(data) != sha:
        raise DarkpruneError(f"{path}: checksum mismatch: the best weights of the interrupted run are corrupt")
    _, params = read_weights(str(path), model.graph)
    return {i: {k: np.ascontiguousarray(v, np.float32) for k, v in p.items()} for i, p in params.items()}


def plot_history(path, history: dict, evaluations: list[dict], metric: str | None, start_at: int = 1) -> None:
    """The loss and average loss per iteration (and the metric at each evaluation, scaled onto the loss axis's
    range when both are drawn: see the legend) as a PNG."""
    from ..util.plot import line_chart
    xs = list(range(start_at, start_at + len(history["loss"])))
    series = [{"label": "avg loss", "x": xs, "y": history["avg_loss"], "marker": False, "highlight": True},
              {"label": "loss", "x": xs, "y": history["loss"], "marker": False}]
    line_chart(path, series, "finetune: Darknet's loss per iteration", "iteration", "loss")
    if evaluations and metric:
        metric_path = Path(path).with_name(Path(path).stem.replace("loss", "metric") + ".png")
        line_chart(metric_path, [{"label": metric, "x": [e["iteration"] for e in evaluations],
                                  "y": [e[metric] for e in evaluations]}],
                   f"finetune: {metric} on the validation images", "iteration", metric)
