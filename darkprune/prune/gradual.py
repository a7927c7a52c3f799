"""Gradual pruning: reach a BFLOPs target in K smaller cuts, each followed by recovery, instead of one cut.

One large cut loses so much at once that a short finetune cannot win it back; several smaller ones let the network
adapt between them (Zhu and Gupta 2017; the iterative schedule of Han et al. and of Vitis AI's pruner). Step i of K
removes the share `rate * i / K` of the original BFLOPs:

1. the per-group rates come from the sensitivity analysis (plan_by_rate at the step's share); a group's rate never
   goes down from one step to the next, so the pruned channels only grow;
2. the channels newly pruned in a group are the lowest-ranked of its *still live* channels, ranked on the current
   (already finetuned) weights: what the earlier steps pruned stays pruned, and what finetuning made important is
   kept;
3. the cut is recovered: compensation folds the new pruned channels' constants into their readers (compensate.py),
   reconstruction refits the readers on calibration images (reconstruct.py) when images are given, and a short
   finetune with the masks held (optionally distilled from a teacher) lets the rest adapt.

Each finished step is saved (`<workspace>/step<i>/`: the masked pair, its masks and a `step.json` written last), so
an interrupted run resumes at the first step that has no `step.json`; a step's finetune resumes from its own
checkpoints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..darknet.model import Model
from ..errors import DarkpruneError, SettingError
from ..util.jsonio import write_json
from .criteria import kept_count
from .groups import Grouping, build_grouping
from .masks import Masks, apply_masks, live_stats
from .plan import Plan, check_threshold, plan_by_rate, plan_by_threshold


@dataclass
class GradualStep:
    step: int
    rate: float                       # the share of the original BFLOPs this step's masks remove (target)
    bflops: float                     # Darknet's BFLOPs of the live channels after the step
    params: int
    channels_pruned: int
    metric_before_finetune: float | None = None
    metric_after_finetune: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("step", "rate", "bflops", "params", "channels_pruned",
                                              "metric_before_finetune", "metric_after_finetune", "seconds")}


@dataclass
class GradualResult:
    model: Model                      # the last step's masked (compensated, reconstructed, finetuned) model
    masks: Masks
    plans: list[Plan]
    steps: list[GradualStep] = field(default_factory=list)


def check_steps(steps) -> int:
    """`steps` as an int >= 1, else a SettingError."""
    try:
        value = int(steps)
        whole = float(steps) == value
    except (TypeError, ValueError):
        value, whole = 0, False
    if not whole or value < 1:
        raise SettingError("steps", f"steps {steps}: expected a whole number of pruning steps >= 1 (1 = one cut)")
    return value


def gradual_plans(model: Model, sensitivity, steps: int, rate: float | None = None, threshold: float | None = None,
                  divisible: int = 1, exclude=(), grouping: Grouping | None = None, cost: str = "bflops") -> list[Plan]:
    """The K plans of a gradual run: plan_by_rate at rate * i / K (of the BFLOPs, or with cost="params" of the
    parameters) (or plan_by_threshold at threshold * i / K), with
    each group's rate at least what the previous step gave it (so the pruned channels only grow)."""
    steps = check_steps(steps)
    if (rate is None) == (threshold is None):
        raise SettingError("rate", "gradual pruning needs exactly one of a rate (the share of BFLOPs to remove) or "
                                   "a threshold (the loss each layer may cost)")
    grouping = grouping if grouping is not None else build_grouping(model.graph)
    plans, floor = [], {}
    for i in range(1, steps + 1):
        if rate is not None:
            plan = plan_by_rate(model, sensitivity, rate * i / steps, divisible, exclude, grouping, cost=cost)
        else:
            check_threshold(threshold, sensitivity)
            plan = plan_by_threshold(sensitivity, threshold * i / steps, divisible, exclude)
        rates = dict(plan.rates)
        for gid, previous in floor.items():
            rates[gid] = max(rates.get(gid, 0.0), previous)
        plan.rates = rates
        plan.details = dict(plan.details, step=i, steps=steps)
        floor = rates
        plans.append(plan)
    return plans


def grow_masks(model: Model, plan: Plan, previous: Masks | None, grouping: Grouping) -> Masks:
    """The masks of `plan` on `model` that contain `previous`: each group prunes as many channels as its planned
    rate asks, its previously pruned channels first, then its lowest-ranked live ones on `model`'s weights."""
    pruned = {}
    for gid, rate in sorted(plan.rates.items()):
        group = grouping.group(int(gid))
        scores = group.scores(model, plan.criterion)
        before = previous.pruned.get(gid, np.zeros(0, np.int64)) if previous is not None else np.zeros(0, np.int64)
        scores[before] = -np.inf                                  # already pruned: stays pruned
        count = max(len(scores) - kept_count(len(scores), rate, plan.divisible), len(before))
        if count:
            order = np.lexsort((np.arange(len(scores)), scores))
            pruned[gid] = np.sort(order[:count]).astype(np.int64)
    for gid, chans in (previous.pruned.items() if previous is not None else ()):
        pruned.setdefault(gid, chans)
    return Masks.for_model(model, pruned, (), grouping)


def _step_dir(workspace, i: int) -> Path | None:
    return None if workspace is None else Path(workspace) / f"step{i}"


def _load_step(folder: Path, original: Model, grouping: Grouping):
    """A finished step's (model, masks, record), or None when the step did not finish."""
    from ..darknet.weights import read_weights
    record_path = folder / "step.json"
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        raise DarkpruneError(f"{record_path}: cannot read the finished step's record ({exc}); delete the folder "
                             f"to redo the step") from None
    _, params = read_weights(str(folder / "step.weights"), original.graph)   # the original's graph: its groups
    model = Model(original.cfg, original.graph, params, original.header)
    masks = Masks.load(folder / "masks.json", original)
    masks.check(original, str(folder / "masks.json"), grouping)
    model.masks = masks
    return model, masks, GradualStep(**{k: record[k] for k in GradualStep.__dataclass_fields__})


def _save_step(folder: Path, model: Model, masks: Masks, record: GradualStep) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "step.cfg", folder / "step.weights")
    masks.save(folder / "masks.json")
    write_json(folder / "step.json", record.to_json())            # last: its presence marks the step finished


def _cut(previous: Model, masks: Masks, calibration, compensate: bool, progress: bool) -> Model:
    """The previous step's model with `masks` applied, its new pruned channels' constants folded in and, with
    calibration images, its readers refitted to the previous model's outputs."""
    masked = apply_masks(previous, masks, grouping=masks.grouping)
    if compensate:
        from .compensate import compensate as fold_constants
        masked = fold_constants(previous, masked, masks)
    if calibration is not None:
        from .reconstruct import reconstruct
        masked = reconstruct(previous, masked, calibration, masks, progress=progress)
    masked.masks = masks
    return masked


def _measure(model: Model, data, progress: bool):
    if data is None:
        return None
    from ..darknet.heads import metric_name
    from ..evaluate import evaluate
    return float(evaluate(model, data, progress=progress)[metric_name(model.graph)])


def prune_gradually(model: Model, sensitivity, steps: int, data, iters_per_step: int, rate: float | None = None,
                    threshold: float | None = None, compensate: bool = True, calibration=None, eval_data=None,
                    exclude=(), divisible: int = 1, finetune_options: dict | None = None, workspace=None,
                    resume: bool = False, progress: bool = True, log=None, cost: str = "bflops") -> GradualResult:
    """Prune `model` (unchanged) to remove `rate` of its BFLOPs (or down to `threshold`) in `steps` cuts, each
    recovered by compensation, reconstruction on `calibration` images (when given) and `iters_per_step` finetuning
    iterations on `data` (see the module doc). `eval_data`: a dataset measured before and after each finetune (for the record; optional).
    `finetune_options`: passed on to darkprune.train.finetune.finetune (teacher=, batch=, learning_rate=, seed=...).
    With `workspace`, every finished step is saved there and `resume` skips the finished ones."""
    import time

    from ..train.finetune import CHECKPOINT_DIR, finetune
    if iters_per_step < 0:
        raise SettingError("step_iters", f"step_iters {iters_per_step}: expected a number of iterations >= 0")
    grouping = build_grouping(model.graph)
    plans = gradual_plans(model, sensitivity, steps, rate, threshold, divisible, exclude, grouping, cost)
    options = dict(finetune_options or {})
    current, masks, records = model, None, []
    for i, plan in enumerate(plans, 1):
        folder = _step_dir(workspace, i)
        done = _load_step(folder, model, grouping) if (folder is not None and resume) else None
        if done is not None:
            current, masks, record = done
            records.append(record)
            continue
        start = time.perf_counter()
        masks = grow_masks(current, plan, masks, grouping)
        cut = _cut(current, masks, calibration, compensate, progress)
        before = _measure(cut, eval_data, progress)
        if iters_per_step:
            started = resume and folder is not None and (folder / CHECKPOINT_DIR).is_dir()
            finetune(cut, data, iters_per_step, masks=masks, workspace=folder, resume=started, progress=progress,
                     **options)
        after = _measure(cut, eval_data, progress) if iters_per_step else before
        stats = live_stats(model, masks, grouping)
        record = GradualStep(i, plan.target, float(stats["total_bflops"]), int(stats["total_params"]),
                             masks.total_pruned, before, after, time.perf_counter() - start)
        if folder is not None:
            _save_step(folder, cut, masks, record)
        if log is not None:
            log(f"step {i}/{len(plans)}: {record.bflops:.4f} BFLOPs, {record.channels_pruned} channels pruned"
                + (f", {before:.4f} before finetuning, {after:.4f} after" if before is not None else ""))
        current = cut
        records.append(record)
    current.masks = masks
    return GradualResult(current, masks, plans, records)


__all__ = ["GradualStep", "GradualResult", "check_steps", "gradual_plans", "grow_masks", "prune_gradually"]
