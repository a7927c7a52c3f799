"""The one training loop: Darknet's iteration on our numba engine, with hooks for what differs between uses.

    loop = TrainingLoop(model, net, optimizer, schedule, batches, LoopSettings(iters=300, mini_batch=8, ...),
                        hooks=[HoldMasks(...), Evaluation(...)])
    result = loop.run()

One iteration k = 1, 2, ... (the schedule restarts, as `darknet ... train -clear` does) is one of Darknet's batches:
  for each of the `subdivisions` mini-batches s: batch = batches.get(k, s, next one to prepare); forward in training
      mode (batch-norm on the mini-batch's statistics, dropout drawn from (seed, k, s, 1)); the network's own loss
      at its heads (when the batch has ground truth; times `task_weight`) plus every hook's `extra_loss`; backward;
      the parameter gradients go through every hook's `on_gradients` (a hook may take some for itself) and are
      summed into the optimizer's buffers;
  rate = schedule.rate(k, rng (seed, k, 2)); one DarknetSGD update; every hook's `after_step`;
  Darknet's printed loss and its running average; a loss that is not finite stops the run (DarkpruneError);
  progress bar (tqdm, off with progress=False or DARKPRUNE_QUIET=1); every hook's `after_iteration(state)`;
  with a checkpoint folder: a checkpoint every `checkpoint_every` iterations, at the end and when a hook set
  `state.stop` (then the run ends).

Resume (`resume=True`): the newest complete checkpoint of the folder restores the parameters, the optimizer's
buffers, the iteration, the images seen and the loss history, after checking that it was made with the same
`settings`; then every hook's `on_resume(meta)` takes back what it stored through `checkpoint_meta`. All randomness
is derived from (seed, iteration, subdivision), so a resumed run is bit for bit the uninterrupted one.

Hooks (subclass Hooks, override what you need):
  on_resume(loop, meta)              after a checkpoint was loaded; meta holds what checkpoint_meta returned
  before_training(loop)              once, before the first iteration of this run (loop.start tells where)
  extra_loss(loop, batch, seen)      after the forward of a mini-batch: None or (cost, {layer: dL/d its output});
                                     the seeds are added to the heads' before backward and the cost to the loss
                                     (a distillation term against a teacher's outputs, on unlabeled images too)
  on_gradients(loop, grads)          {layer: {name: gradient}} of a mini-batch; remove the entries the hook
                                     handles itself (they then skip the optimizer)
  after_step(loop, rate)             after the optimizer's update (re-apply masks, tie weights to centroids)
  after_iteration(loop, state)       the iteration's TrainState; set state.stop to end the run
  checkpoint_meta(loop)              a dict merged into the checkpoint's meta
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..darknet.heads import is_detector
from ..darknet.model import Model
from ..engine.blas import limit_threads
from ..errors import DarkpruneError
from . import losses
from .backprop import TrainBatch, TrainingNetwork, classifier_loss, detector_loss, trainable_parameters
from .checkpoint import latest_checkpoint, load_parameters, read_checkpoint, remove_checkpoints, write_checkpoint
from .optimizer import DarknetSGD
from .schedule import LearningRateSchedule


@dataclass
class TrainState:
    """What after_iteration hooks (and finetune's callbacks) see. `model` is being trained in place."""
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


class Hooks:
    """The extension points of TrainingLoop (see the module doc); every default does nothing."""

    def on_resume(self, loop: "TrainingLoop", meta: dict) -> None:
        pass

    def before_training(self, loop: "TrainingLoop") -> None:
        pass

    def extra_loss(self, loop: "TrainingLoop", batch: TrainBatch, seen: int):
        return None

    def on_gradients(self, loop: "TrainingLoop", grads: dict) -> None:
        pass

    def after_step(self, loop: "TrainingLoop", rate: float) -> None:
        pass

    def after_iteration(self, loop: "TrainingLoop", state: TrainState) -> None:
        pass

    def checkpoint_meta(self, loop: "TrainingLoop") -> dict:
        return {}


@dataclass
class LoopSettings:
    iters: int
    mini_batch: int
    subdivisions: int
    seed: int = 0
    name: str = "finetune"                   # the progress bar's label
    run_name: str = ""                       # what the divergence message starts with ("centroid finetuning")
    rate_name: str = "the learning rate"     # what to lower when the loss diverges
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    settings: dict = field(default_factory=dict)   # stored in checkpoints; a resume must match all but "iters"
    seen_base: int = 0                       # the model's header counts seen_base + the images of this run
    task_weight: float = 1.0                 # the heads' own loss (and its gradient) times this; 0: not computed
    progress: bool = True
    leave_progress: bool = True

    @property
    def full_batch(self) -> int:
        return self.mini_batch * self.subdivisions


@dataclass
class LoopResult:
    iterations: int                  # the last iteration run
    start_iteration: int             # 0, or where a resumed run picked up
    history: dict                    # {"loss": [...], "avg_loss": [...], "lr": [...]} from iteration 1
    seen: int                        # images trained on (a resumed run: including the interrupted part)
    avg_loss: float | None
    seconds: float                   # this run's training time (without the after_iteration hooks: evaluations)
    images_run: int                  # images this run trained on

    @property
    def images_per_second(self) -> float:
        return self.images_run / self.seconds if self.seconds > 0 else 0.0


def split_batch(graph, batch: int | None, subdivisions: int | None, at_least_one: bool = False) -> tuple[int, int]:
    """(mini-batch, subdivisions) from the given values or the cfg's [net]; Darknet's update batch is their
    product. A batch smaller than subdivisions is an error, or one image per mini-batch with at_least_one."""
    subdivisions = max(1, int(subdivisions if subdivisions is not None else graph.net["subdivisions"]))
    full_batch = int(batch if batch is not None else graph.net["batch"])
    mini_batch = full_batch // subdivisions
    if mini_batch < 1:
        if not at_least_one:
            raise DarkpruneError(f"batch={full_batch} is smaller than subdivisions={subdivisions}")
        mini_batch = 1
    return mini_batch, subdivisions


def darknet_optimizer(model: Model, full_batch: int, masks: dict | None = None, skip=()) -> DarknetSGD:
    """DarknetSGD from the cfg's [net] over every trainable array but the (layer, name) pairs in `skip`; a layer's
    `learning_rate=` scales its rate (Darknet's learning_rate_scale); `masks`: {(layer, name): keep} held."""
    opt = DarknetSGD.from_cfg(model.graph)
    opt.batch = full_batch
    for index, name, decayed in trainable_parameters(model):
        if (index, name) in skip:
            continue
        opt.add(f"{index}/{name}", model.params[index][name], decay=decayed, mask=(masks or {}).get((index, name)),
                lr_scale=model.graph[index].section.get_float("learning_rate", 1.0))
    return opt


class _Rows:
    """A TrainingNetwork seen through some of its batch's images (what the task losses read of it)."""

    def __init__(self, net: TrainingNetwork, rows: np.ndarray):
        self.net, self.rows, self.graph, self.dtype = net, rows, net.graph, net.dtype

    def output(self, index: int) -> np.ndarray:
        return self.net.output(index)[self.rows]


class TrainingLoop:
    """See the module doc. `batches`: an object with get(iteration, subdivision, following) -> TrainBatch and
    close() (a feeder.BatchFeeder); it is closed when the run ends."""

    def __init__(self, model: Model, net: TrainingNetwork, optimizer: DarknetSGD, schedule: LearningRateSchedule,
                 batches, settings: LoopSettings, hooks=()):
        self.model, self.net, self.optimizer, self.schedule = model, net, optimizer, schedule
        self.batches = batches
        self.settings = settings
        self.hooks = list(hooks)
        self.detector = is_detector(model.graph)
        self.start = 0
        self.seen = 0
        self.avg_loss: float | None = None
        self.history: dict = {"loss": [], "avg_loss": [], "lr": []}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _prepare_checkpoints(self) -> None:
        folder = self.settings.checkpoint_dir
        if not self.settings.resume:
            removed = remove_checkpoints(folder) if folder is not None else 0
            if removed:
                warnings.warn(f"{folder}: starting over, {removed} old checkpoint(s) removed (use resume to continue "
                              f"one)", stacklevel=4)
            return
        if folder is None:
            raise DarkpruneError("resume needs the workspace the interrupted run wrote its checkpoints to")
        path = latest_checkpoint(folder)
        if path is None:
            warnings.warn(f"{folder}: no checkpoint to resume from; starting from the beginning", stacklevel=4)
            return
        meta, arrays = read_checkpoint(path)
        self._check_settings(path, meta["settings"])
        load_parameters(path, self.model, arrays)
        self.optimizer.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
        self.start, self.seen, self.avg_loss, self.history = (meta["iteration"], meta["seen"], meta["avg_loss"],
                                                              meta["history"])
        for hook in self.hooks:
            hook.on_resume(self, meta)

    def _check_settings(self, path: Path, then: dict) -> None:
        now = self.settings.settings
        differ = [k for k in now if k != "iters" and then.get(k) != now[k]]
        if differ:
            raise DarkpruneError(f"{path}: this checkpoint was made with other settings ("
                                 + ", ".join(f"{k}: {then.get(k)} then, {now[k]} now" for k in differ)
                                 + "); resume with the same ones or start over")
        if "iters" in now and then.get("iters") != now["iters"]:
            warnings.warn(f"{path}: the run was started for {then.get('iters')} iterations, now {now['iters']}: the "
                          f"schedule changes, so the result will differ from either uninterrupted run", stacklevel=5)

    def _write_checkpoint(self, k: int) -> None:
        meta = {"seen": self.seen, "avg_loss": self.avg_loss, "history": self.history}
        for hook in self.hooks:
            meta.update(hook.checkpoint_meta(self))
        meta.update(settings=self.settings.settings,
                    rng={"kind": "counter", "seed": int(self.settings.seed), "next_iteration": k + 1})
        write_checkpoint(self.settings.checkpoint_dir, k, self.model, self.optimizer, meta)

    # -- one iteration ------------------------------------------------------------------------------------------
    def _task_loss(self, batch: TrainBatch, seen: int):
        """The network's own loss at its heads (LossOutput), None when the batch has no ground truth for it;
        with `batch.labeled`, on the labeled images only (the others' rows of the seeds are zero)."""
        truth = batch.truths if self.detector else batch.labels
        if truth is None:
            return None
        net, rows = self.net, None
        if batch.labeled is not None and not np.all(batch.labeled):
            rows = np.flatnonzero(batch.labeled)
            if not len(rows):
                return None
            net = _Rows(self.net, rows)
            truth = [truth[r] for r in rows] if self.detector else np.asarray(truth)[rows]
        result = detector_loss(net, truth, seen) if self.detector else classifier_loss(net, truth)
        if rows is not None:
            for index, g in list(result.seeds.items()):
                full = np.zeros(self.net.output(index).shape, g.dtype)
                full[rows] = g
                result.seeds[index] = full
        return result

    def _minibatch(self, k: int, s: int) -> tuple[float, dict]:
        """Forward, losses, backward and gradient accumulation of mini-batch s of iteration k: (cost, head stats)."""
        cfg = self.settings
        following = (k, s + 1) if s + 1 < cfg.subdivisions else ((k + 1, 0) if k < cfg.iters else None)
        batch = self.batches.get(k, s, following)
        seen = self.seen + cfg.mini_batch * (s + 1)
        self.net.forward(batch.images, train=True, rng=np.random.default_rng([cfg.seed, k, s, 1]), outputs=[])
        cost, seeds, stats = 0.0, {}, {}
        task = self._task_loss(batch, seen) if cfg.task_weight else None
        if task is not None:
            cost, seeds, stats = task.cost, dict(task.seeds), task.stats
            if cfg.task_weight != 1:
                weight = cfg.task_weight
                cost, seeds = cost * weight, {i: g * g.dtype.type(weight) for i, g in seeds.items()}
        for hook in self.hooks:
            extra = hook.extra_loss(self, batch, seen)
            if extra is not None:
                cost += float(extra[0])
                for index, grad in extra[1].items():
                    seeds[index] = seeds[index] + grad if index in seeds else grad
        if not seeds:
            raise DarkpruneError(f"{cfg.name}, iteration {k}: the batch has no ground truth and no hook adds a loss")
        self.net.backward(seeds, k)
        grads = self.net.gradients()
        for hook in self.hooks:
            hook.on_gradients(self, grads)
        # The optimizer's kernels are parallel; on a few hundred small tensors the wake-ups cost more than the
        # work (milliseconds each on a busy machine), so they run on this thread.
        with limit_threads(1):
            for index, arrays in grads.items():
                for name, grad in arrays.items():
                    self.optimizer.accumulate(f"{index}/{name}", grad)
        return cost, stats

    def _iteration(self, k: int) -> TrainState:
        cfg = self.settings
        t0 = time.perf_counter()
        costs, stats = [], {}
        for s in range(cfg.subdivisions):
            cost, stats = self._minibatch(k, s)
            costs.append(cost)
        self.seen += cfg.full_batch
        rate = self.schedule.rate(k, np.random.default_rng([cfg.seed, k, 2]))
        with limit_threads(1):
            self.optimizer.update(rate, t=k)
        for hook in self.hooks:
            hook.after_step(self, rate)
        loss = losses.train_loss(costs, cfg.mini_batch)
        self.avg_loss = losses.update_avg_loss(self.avg_loss, loss)
        if not math.isfinite(loss):
            prefix = f"{cfg.run_name}, " if cfg.run_name else ""
            raise DarkpruneError(f"{prefix}iteration {k}: the loss is {loss}: training diverged (lower "
                                 f"{cfg.rate_name}: it was {rate:g})")
        self.history["loss"].append(loss)
        self.history["avg_loss"].append(self.avg_loss)
        self.history["lr"].append(rate)
        dt = time.perf_counter() - t0
        self.model.header.seen = cfg.seen_base + self.seen
        return TrainState(k, cfg.iters, loss, self.avg_loss, rate, cfg.full_batch / dt if dt > 0 else 0.0,
                          self.seen, dt, self.model, stats)

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        from tqdm import tqdm

        from ..util.progress import progress_enabled
        cfg = self.settings
        try:
            self._prepare_checkpoints()
            for hook in self.hooks:
                hook.before_training(self)
            bar = tqdm(total=cfg.iters, initial=self.start, desc=cfg.name, unit="it", file=sys.stderr,
                       disable=not progress_enabled(cfg.progress), dynamic_ncols=True, leave=cfg.leave_progress)
            seconds, images, k = 0.0, 0, self.start
            try:
                for k in range(self.start + 1, cfg.iters + 1):
                    state = self._iteration(k)
                    seconds += state.seconds
                    images += cfg.full_batch
                    state.seconds = seconds
                    bar.update(1)
                    bar.set_postfix_str(f"loss {state.loss:.3f} avg {state.avg_loss:.3f} lr {state.learning_rate:.3g}"
                                        f" {state.images_per_second:.1f} img/s", refresh=False)
                    for hook in self.hooks:
                        hook.after_iteration(self, state)
                    last = k == cfg.iters or state.stop
                    if cfg.checkpoint_dir is not None and (last or (cfg.checkpoint_every
                                                                    and k % cfg.checkpoint_every == 0)):
                        self._write_checkpoint(k)
                    if state.stop:
                        break
            finally:
                bar.close()
        finally:
            self.batches.close()
        self.model.header.seen = cfg.seen_base + self.seen
        return LoopResult(k, self.start, self.history, self.seen, self.avg_loss, seconds, images)
