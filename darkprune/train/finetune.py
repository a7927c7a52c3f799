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
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..util.files import atomic_write_bytes
from ..darknet.heads import is_detector, metric_name
from ..darknet.model import Model
from ..engine.blas import limit_threads
from ..errors import DarkpruneError
from . import losses
from .backprop import TrainBatch, TrainingNetwork, trainable_parameters
from .optimizer import DarknetSGD
from .schedule import LearningRateSchedule

# Batch-norm rolling statistics: rolling = (1 - m) * rolling + m * batch. AlexeyAB's CPU training uses m = 0.1, its
# GPU training (and pjreddie's) 0.01. A finetune runs a few hundred iterations, not hundreds of thousands: with 0.01
# the rolling statistics (what inference uses) lag far behind the weights. Measured on the pruned Yolo-Fastest
# (threshold 0.02), 30 iterations at lr 1e-4: mAP@0.5 0.074 -> 0.042 with 0.01, -> 0.197 with 0.1.
FINETUNE_BN_MOMENTUM = 0.1
CHECKPOINT_DIR = "finetune"
CHECKPOINTS_KEPT = 2
FORMAT = "darkprune-finetune-checkpoint"
VERSION = 1
IMAGE_CACHE_BYTES = 512 << 20      # decoded training images kept in memory (small datasets are read once)


# ---------------------------------------------------------------------------------------------------------------
# state and result

@dataclass
class FinetuneState:
    """What callbacks see. `model` is being trained in place (its params are the live arrays)."""
    iteration: int
    iters: int
    loss: float
    avg_loss: float
    learning_rate: float
    images_per_second: float
    seen: int
    seconds: float
    model: Model
    stats: dict = field(default_factory=dict)      # per head statistics of the last mini-batch (detectors)
    stop: bool = False


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

    def to_json(self) -> dict:
        return {
            "iterations": self.iterations, "start_iteration": self.start_iteration, "metric": self.metric,
            "metric_before": self.metric_before, "metric_after": self.metric_after,
            "best_iteration": self.best_iteration, "kept": self.kept, "images_seen": self.images_seen,
            "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 3),
            "final_loss": self.losses[-1] if self.losses else None,
            "final_avg_loss": self.avg_losses[-1] if self.avg_losses else None,
            "evaluations": self.evaluations, "schedule": self.schedule, "files": self.files,
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
# schedule

def finetune_schedule(graph, iters: int, learning_rate: float | None = None) -> LearningRateSchedule:
    """The cfg's schedule compressed to `iters` iterations (see the module doc), with an optional base rate."""
    sched = LearningRateSchedule.from_cfg(graph)
    if learning_rate is not None:
        sched.learning_rate = float(learning_rate)
    full = sched.max_batches
    if full > 0 and iters != full:
        f = iters / full
        sched.burn_in = int(sched.burn_in * f)
        sched.steps = tuple(max(1, int(round(s * f))) for s in sched.steps)
        sched.step = max(1, int(round(sched.step * f)))
        if sched.sgdr_cycle:
            sched.sgdr_cycle = max(1, int(round(sched.sgdr_cycle * f)))
    sched.max_batches = iters
    return sched


def schedule_json(s: LearningRateSchedule) -> dict:
    return {"learning_rate": s.learning_rate, "policy": s.policy, "burn_in": s.burn_in, "power": s.power,
            "max_batches": s.max_batches, "steps": list(s.steps), "scales": list(s.scales), "step": s.step,
            "scale": s.scale, "gamma": s.gamma}


# ---------------------------------------------------------------------------------------------------------------
# data

class BatchFeeder:
    """Darknet-style training mini-batches, each a pure function of (seed, iteration, subdivision): random images
    (with replacement) from the dataset, augmented from the cfg. Prepares the next mini-batch on a thread."""

    def __init__(self, dataset, graph, mini_batch: int, seed: int, threads: int = 2):
        from ..data import load_image
        from .augment import ClassifierAugment, DetectionAugment
        self.dataset = dataset
        self.mini_batch = int(mini_batch)
        self.seed = int(seed)
        self.channels = graph.net["channels"]
        self.detector = is_detector(graph)
        if self.detector:
            if dataset.kind != "detection" or dataset.boxes is None:
                raise DarkpruneError(f"{dataset.source}: a detector needs a detection dataset (label files with "
                                     f"boxes), this one is {dataset.kind}")
            self.augment = DetectionAugment.from_graph(graph)
        else:
            if dataset.kind != "classification" or dataset.labels is None:
                raise DarkpruneError(f"{dataset.source}: a classifier needs a classification dataset (a labels= "
                                     f"list in the .data file), this one is {dataset.kind}")
            self.augment = ClassifierAugment.from_graph(graph)
        if len(dataset) == 0:
            raise DarkpruneError(f"{dataset.source}: the training list is empty")
        self._load_image = load_image
        self._cache: dict[int, np.ndarray] = {}
        self._cache_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self._pending: dict[tuple[int, int], Any] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _image(self, index: int) -> np.ndarray:
        img = self._cache.get(index)
        if img is None:
            img = self._load_image(self.dataset.image_paths[index], self.channels)
            if self._cache_bytes + img.nbytes <= IMAGE_CACHE_BYTES:
                self._cache[index] = img
                self._cache_bytes += img.nbytes
        return img

    def _one(self, index: int, seed: int):
        rng = np.random.default_rng(seed)
        image = self._image(index)
        if self.detector:
            return self.augment(image, self.dataset.boxes[index], rng)
        return self.augment(image, rng), int(self.dataset.labels[index])

    def _build(self, iteration: int, subdivision: int) -> TrainBatch:
        rng = np.random.default_rng([self.seed, iteration, subdivision, 0])
        picks = rng.integers(0, len(self.dataset), self.mini_batch)
        seeds = rng.integers(0, 2 ** 63 - 1, self.mini_batch)
        items = list(self._pool.map(self._one, picks.tolist(), seeds.tolist()))
        images = np.stack([it[0] for it in items]).astype(np.float32, copy=False)
        if self.detector:
            return TrainBatch(images, truths=[np.asarray(it[1], np.float32).reshape(-1, 5) for it in items])
        return TrainBatch(images, labels=np.array([it[1] for it in items], np.int64))

    def get(self, iteration: int, subdivision: int, following: tuple[int, int] | None = None) -> TrainBatch:
        """The mini-batch (iteration, subdivision); starts preparing `following` in the background."""
        key = (iteration, subdivision)
        future = self._pending.pop(key, None)
        if following is not None and following not in self._pending:
            self._pending[following] = _Background(self._build, following)
        if future is not None:
            return future.result()
        return self._build(*key)


class _Background:
    """Runs fn(*args) on its own thread (the pool's workers are used by fn itself for the images)."""

    def __init__(self, fn, args):
        import threading
        self._result = None
        self._error = None

        def run():
            try:
                self._result = fn(*args)
            except BaseException as exc:          # re-raised in the caller's thread
                self._error = exc
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


# ---------------------------------------------------------------------------------------------------------------
# checkpoints

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*.npz"))


def write_checkpoint(folder: Path, iteration: int, model: Model, opt: DarknetSGD, meta: dict) -> Path:
    arrays = {f"param/{i}/{name}": arr for i, p in model.params.items() for name, arr in p.items()}
    arrays.update({f"opt/{k}": v for k, v in opt.state_dict().items()})
    meta = dict(meta, format=FORMAT, version=VERSION, iteration=iteration)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    path = folder / f"checkpoint-{iteration:07d}.npz"
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_suffix(".sha256"), f"{_sha256(data)}  {path.name}\n".encode())
    for old in checkpoint_paths(folder)[:-CHECKPOINTS_KEPT]:
        for f in (old, old.with_suffix(".sha256")):
            try:
                f.unlink()
            except OSError:
                pass
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a checkpoint whose checksum matches; DarkpruneError otherwise."""
    sha_path = path.with_suffix(".sha256")
    try:
        data = path.read_bytes()
        expected = sha_path.read_text().split()[0]
    except FileNotFoundError as exc:
        raise DarkpruneError(f"{exc.filename}: missing; the checkpoint {path.name} cannot be verified") from None
    except (OSError, IndexError) as exc:
        raise DarkpruneError(f"{sha_path}: unreadable checksum file ({exc})") from None
    if _sha256(data) != expected:
        raise DarkpruneError(f"{path}: checksum mismatch ({len(data)} bytes): the checkpoint is corrupt or truncated; "
                             f"delete it (and its .sha256) to resume from an earlier one, or run without --resume")
    try:
        with np.load(io.BytesIO(data)) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as exc:       # the checksum matched, so the writer itself was at fault
        raise DarkpruneError(f"{path}: not a readable darkprune checkpoint ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DarkpruneError(f"{path}: not a darkprune finetune checkpoint of version {VERSION}")
    return meta, arrays


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was completely written (its .sha256 exists: it is written after the .npz)."""
    for path in reversed(checkpoint_paths(folder)):
        if path.with_suffix(".sha256").exists():
            return path
        warnings.warn(f"{path}: no checksum file beside it (the run stopped while writing it); ignored",
                      stacklevel=3)
    return None


# ---------------------------------------------------------------------------------------------------------------
# the loop

def _callbacks(callbacks) -> list:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _call(callbacks: list, name: str, *args) -> None:
    for cb in callbacks:
        fn = cb.get(name) if isinstance(cb, dict) else getattr(cb, name, None)
        if fn is not None:
            fn(*args)


def _resolve_data(data, split: str):
    from ..data import Dataset, load_data
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, split=split)
    raise DarkpruneError(f"data must be a Dataset or the path of a .data file, not {type(data).__name__}")


def _metric_name(model: Model) -> str:
    return metric_name(model.graph)


def _snapshot(model: Model) -> dict:
    return {i: {k: v.copy() for k, v in p.items()} for i, p in model.params.items()}


def _restore(model: Model, params: dict) -> None:
    for i, p in params.items():
        for k, v in p.items():
            model.params[i][k][...] = v


def finetune(model: Model, data, iters: int | None = None, masks=None, batch: int | None = None,
             subdivisions: int | None = None, learning_rate: float | None = None, workspace=None,
             checkpoint_every: int = 100, eval_every: int | None = None, eval_data=None,
             eval_limit: int | None = None, resume: bool = False, seed: int = 0, callbacks=None,
             progress: bool = True, keep: str | None = None, bn_momentum: float | None = None,
             data_threads: int = 2) -> FinetuneResult:
    """Finetune `model` in place on `data` (a .data path, whose train= list is used, or a Dataset); see the module
    doc. Returns a FinetuneResult; `result.model` is `model`, holding the kept weights."""
    from ..evaluate import evaluate
    from ..util.progress import progress_enabled
    from ..util.folder import Folder as Workspace   # the run's output folder
    from tqdm import tqdm

    graph = model.graph
    net_opts = graph.net
    iters = int(iters if iters is not None else net_opts["max_batches"])
    if iters <= 0:
        raise DarkpruneError(f"{model.cfg_path}: no iteration count: give iters (the cfg's max_batches is "
                             f"{net_opts['max_batches']})")
    subdivisions = max(1, int(subdivisions if subdivisions is not None else net_opts["subdivisions"]))
    full_batch = int(batch if batch is not None else net_opts["batch"])
    mini_batch = full_batch // subdivisions
    if mini_batch < 1:
        raise DarkpruneError(f"batch={full_batch} is smaller than subdivisions={subdivisions}")
    full_batch = mini_batch * subdivisions            # Darknet's update batch
    if checkpoint_every is not None and checkpoint_every < 1:
        raise DarkpruneError("checkpoint_every must be >= 1")
    if eval_every is not None and eval_every < 1:
        raise DarkpruneError("eval_every must be >= 1")
    metric = _metric_name(model)

    train_set = _resolve_data(data, "train")
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

    # masks, network, optimizer, schedule
    held, held_stats = parameter_masks(model, masks)
    from ..prune.masks import Masks
    if isinstance(masks, Masks) and getattr(model, "masks", None) is None:
        model.masks = masks                # what `transform` uses by default, as apply_masks leaves it
    net = TrainingNetwork(model, np.float32, FINETUNE_BN_MOMENTUM if bn_momentum is None else bn_momentum, seed)
    _hold(model, held, held_stats)
    opt = DarknetSGD.from_cfg(graph)
    opt.batch = full_batch
    for index, name, decayed in trainable_parameters(model):
        layer = graph[index]
        opt.add(f"{index}/{name}", model.params[index][name], decay=decayed, mask=held.get((index, name)),
                lr_scale=layer.section.get_float("learning_rate", 1.0))
    schedule = finetune_schedule(graph, iters, learning_rate)

    ws = Workspace(workspace) if workspace is not None else None
    ckpt_dir = ws.file(CHECKPOINT_DIR) if ws else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(exist_ok=True)
    from ..prune.masks import structure_fingerprint
    settings = {"structure": structure_fingerprint(graph), "batch": full_batch, "subdivisions": subdivisions,
                "bn_momentum": net.bn_momentum,
                "learning_rate": schedule.learning_rate, "seed": int(seed), "masks": _mask_digest(held, held_stats),
                "iters": iters}

    # state
    start = 0
    seen = 0
    avg_loss = None
    history = {"loss": [], "avg_loss": [], "lr": []}
    evaluations: list[dict] = []
    best = {"value": None, "iteration": None}
    best_params = None
    if resume:
        if ckpt_dir is None:
            raise DarkpruneError("resume needs the workspace the interrupted run wrote its checkpoints to")
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            warnings.warn(f"{ckpt_dir}: no checkpoint to resume from; starting from the beginning", stacklevel=2)
        else:
            meta, arrays = read_checkpoint(path)
            differ = [k for k in settings if k != "iters" and meta["settings"].get(k) != settings[k]]
            if differ:
                raise DarkpruneError(f"{path}: this checkpoint was made with other settings ("
                                     + ", ".join(f"{k}: {meta['settings'].get(k)} then, {settings[k]} now"
                                                 for k in differ) + "); resume with the same ones or start over")
            if meta["settings"].get("iters") != iters:
                warnings.warn(f"{path}: the run was started for {meta['settings'].get('iters')} iterations, now "
                              f"{iters}: the schedule changes, so the result will differ from either uninterrupted "
                              f"run", stacklevel=2)
            for key, arr in arrays.items():
                if key.startswith("param/"):
                    _, index, name = key.split("/", 2)
                    target = model.params.get(int(index), {}).get(name)
                    if target is None or target.shape != arr.shape:
                        raise DarkpruneError(f"{path}: array {key} does not fit this model")
                    target[...] = arr
            opt.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
            start, seen, avg_loss = meta["iteration"], meta["seen"], meta["avg_loss"]
            history, evaluations, best = meta["history"], meta["evaluations"], meta["best"]
            best["sha256"] = meta.get("best_sha256")
            if best["iteration"] is not None and keep == "best":
                best_params = _load_best(ws, model, meta.get("best_sha256"))
    elif ckpt_dir is not None:
        stale = checkpoint_paths(ckpt_dir)
        for old in stale:
            for f in (old, old.with_suffix(".sha256")):
                f.unlink(missing_ok=True)
        (ckpt_dir / "best.weights").unlink(missing_ok=True)
        if stale:
            warnings.warn(f"{ckpt_dir}: starting over, {len(stale)} old checkpoint(s) removed (use resume to "
                          f"continue one)", stacklevel=2)

    cbs = _callbacks(callbacks)
    show = progress_enabled(progress)

    def run_eval(k: int, state: FinetuneState | None) -> float:
        nonlocal best_params
        metrics = evaluate(model, eval_data, limit=eval_limit, progress=False)
        value = float(metrics[metric])
        evaluations.append({"iteration": k, metric: value,
                            **{m: float(metrics[m]) for m in ("map50", "map50_95", "top1", "top5") if m in metrics
                               and m != metric}})
        if best["value"] is None or value > best["value"]:
            best["value"], best["iteration"] = value, k
            if keep == "best":
                best_params = _snapshot(model)
                if ws is not None:
                    best["sha256"] = _save_best(ws, model)
        if state is not None:
            _call(cbs, "on_evaluation", state, metrics)
        return value

    if evaluating and start == 0:
        run_eval(0, None)

    feeder = BatchFeeder(train_set, graph, mini_batch, seed, data_threads) if start < iters else None
    bar = tqdm(total=iters, initial=start, desc="finetune", unit="it", file=sys.stderr, disable=not show,
               dynamic_ncols=True, leave=True)
    train_seconds = 0.0
    images_run = 0
    state = None
    k = start
    try:
        for k in range(start + 1, iters + 1):
            t0 = time.perf_counter()
            costs = []
            stats = {}
            for s in range(subdivisions):
                following = (k, s + 1) if s + 1 < subdivisions else ((k + 1, 0) if k < iters else None)
                mb = feeder.get(k, s, following)
                seen_now = seen + mini_batch * (s + 1)
                out = net.loss_and_gradients(mb, rng=np.random.default_rng([seed, k, s, 1]), seen=seen_now,
                                             iteration=k)
                # The optimizer's kernels are parallel; on a few hundred small tensors the wake-ups cost more than
                # the work (milliseconds each on a busy machine), so they run on this thread.
                with limit_threads(1):
                    for index, arrays in net.gradients().items():
                        for name, g in arrays.items():
                            opt.accumulate(f"{index}/{name}", g)
                costs.append(out.cost)
                stats = out.stats
            seen += full_batch
            lr = schedule.rate(k, np.random.default_rng([seed, k, 2]))
            with limit_threads(1):
                opt.update(lr, t=k)
            _hold(model, {}, held_stats)
            loss = losses.train_loss(costs, mini_batch)
            avg_loss = losses.update_avg_loss(avg_loss, loss)
            if not math.isfinite(loss):
                raise DarkpruneError(f"iteration {k}: the loss is {loss}: training diverged (lower the learning "
                                     f"rate: it was {lr:g})")
            history["loss"].append(loss)
            history["avg_loss"].append(avg_loss)
            history["lr"].append(lr)
            dt = time.perf_counter() - t0
            train_seconds += dt
            images_run += full_batch
            ips = full_batch / dt if dt > 0 else 0.0
            model.header.seen = seen
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} avg {avg_loss:.3f} lr {lr:.3g} {ips:.1f} img/s", refresh=False)
            state = FinetuneState(k, iters, loss, avg_loss, lr, ips, seen, train_seconds, model, stats)
            _call(cbs, "on_iteration", state)
            last = k == iters or state.stop
            if evaluating and ((eval_every and k % eval_every == 0) or last):
                run_eval(k, state)
            if ckpt_dir is not None and (last or (checkpoint_every and k % checkpoint_every == 0)):
                write_checkpoint(ckpt_dir, k, model, opt, {
                    "seen": seen, "avg_loss": avg_loss, "history": history, "evaluations": evaluations,
                    "best": {"value": best["value"], "iteration": best["iteration"]},
                    "best_sha256": best.get("sha256"), "settings": settings,
                    "rng": {"kind": "counter", "seed": int(seed), "next_iteration": k + 1}})
            if state.stop:
                break
    finally:
        bar.close()
        if feeder is not None:
            feeder.close()

    final_iteration = k
    model.header.seen = seen
    metric_before = evaluations[0][metric] if evaluations and evaluations[0]["iteration"] == 0 else None
    if keep == "best" and best_params is not None and best["iteration"] != final_iteration:
        _restore(model, best_params)
    metric_after = None
    if evaluations:
        metric_after = best["value"] if keep == "best" else evaluations[-1][metric]
    files = {}
    if ws is not None:
        cfg_out, weights_out = ws.file("finetuned.cfg"), ws.file("finetuned.weights")
        model.save(cfg_out, weights_out)
        files = {"cfg": str(cfg_out), "weights": str(weights_out), "checkpoints": str(ckpt_dir)}
        curve = ws.file("finetune_loss.png")
        plot_history(curve, history, evaluations, metric, start_at=1)
        files["loss_plot"] = str(curve)
        if evaluations:
            files["metric_plot"] = str(ws.file("finetune_metric.png"))
    return FinetuneResult(
        model=model, iterations=final_iteration, start_iteration=start, losses=list(history["loss"]),
        avg_losses=list(history["avg_loss"]), learning_rates=list(history["lr"]), evaluations=evaluations,
        metric=metric if evaluations else None, metric_before=metric_before, metric_after=metric_after,
        best_iteration=best["iteration"], kept=keep, images_seen=seen, seconds=train_seconds,
        images_per_second=images_run / train_seconds if train_seconds > 0 else 0.0,
        schedule=schedule_json(schedule), files=files)


def _save_best(ws, model: Model) -> str:
    data = model.weights_bytes()
    atomic_write_bytes(ws.file(CHECKPOINT_DIR) / "best.weights", data)
    return _sha256(data)


def _load_best(ws, model: Model, sha: str | None) -> dict:
    from ..darknet.weights import read_weights
    path = ws.file(CHECKPOINT_DIR) / "best.weights"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DarkpruneError(f"{path}: missing; the best weights of the interrupted run are needed to resume "
                             f"(or resume with keep='last')") from None
    if sha and _sha256(data) != sha:
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
