"""Choosing per-group pruning rates from a sensitivity analysis.

`--threshold LOSS`: Darknet's (and Vitis AI's) notion. LOSS is the accuracy each group may cost on its own, in the
model's metric (mAP@0.5 or top-1, absolute: 0.01 = one point); each group gets the largest analysed rate whose
measured loss, and that of every smaller analysed rate, is at most LOSS (a curve that dips below LOSS again after
exceeding it is noise of the finite image set, not a free lunch). The plan's predicted loss is the sum of the chosen
groups' losses (taken as additive; interactions between groups make the real loss of the combined model larger or
smaller, which is why `prune` measures it).

`--rate F`: the share F of the model's BFLOPs to remove (`--by params`: of its parameters; Darknet counts no BFLOPs
for connected layers). We pick, among the analysed rates, per-group rates whose combined saving reaches F with the
least predicted loss (losses of different groups are taken as additive): a greedy walk along each group's lower
convex hull of (BFLOPs saved, loss), always taking the step with the smallest loss per BFLOP saved, with the saving of
the combined plan measured exactly (pruning two neighbouring groups saves more than the sum of each alone, since a
conv then loses inputs and filters); then groups step back down to smaller rates where the target stays reached and
the predicted loss does not grow (the hull's steps can overshoot the target by far).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import DarkpruneError, SettingError
from .groups import Grouping, build_grouping
from .masks import Masks, live_stats


@dataclass
class Plan:
    rates: dict[int, float]                                 # group id -> rate
    mode: str                                               # "threshold" or "rate"
    target: float
    predicted_loss: float = 0.0
    criterion: str = "l1"                                   # how channels are ranked inside a group
    divisible: int = 1                                      # kept channels rounded up to a multiple of this
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"mode": self.mode, "target": self.target, "predicted_loss": self.predicted_loss,
                "criterion": self.criterion, "divisible": self.divisible,
                "rates": {str(g): r for g, r in sorted(self.rates.items())}, "details": self.details}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        return cls({int(g): float(r) for g, r in data["rates"].items()}, data["mode"], float(data["target"]),
                   float(data.get("predicted_loss", 0.0)), data.get("criterion", "l1"),
                   int(data.get("divisible", 1)), data.get("details", {}))


def prune(model, plan, exclude=(), grouping: Grouping | None = None, compensate: bool = False, reconstruct=None,
          data=None, progress: bool = False):
    """The masked model for `plan` (a Plan, a Masks or {group id: channel indices}): same shapes, the pruned
    channels output exactly zero (see masks.apply_masks). The result carries its Masks as `.masks`. With
    `compensate`, the constant each pruned channel carried is folded into the layers reading it (compensate.py).
    `reconstruct`: calibration images (an (N, C, H, W) array, image paths, a Dataset or a .data file, whose train=
    list is used), or a count of images of the .data file `data`'s train= list (True: 256); the layers reading
    pruned channels are then refitted to the unpruned outputs (reconstruct.py), after compensation (implied)."""
    from .masks import apply_masks
    if isinstance(plan, Plan):
        masks = masks_for_plan(model, plan, exclude, grouping)
        masked = apply_masks(model, masks, grouping=masks.grouping)
    else:
        masked = apply_masks(model, plan, exclude, grouping)
    images = _calibration_source(reconstruct, data)
    if compensate or images is not None:
        from .compensate import compensate as fold_constants
        masked = fold_constants(model, masked, masked.masks)
    if images is not None:
        from .calibration import calibration_inputs
        from .reconstruct import reconstruct as refit
        masked = refit(model, masked, calibration_inputs(model, *images), masked.masks, progress=progress)
    return masked


def _calibration_source(reconstruct, data):
    """(images, count) for calibration_inputs, or None without reconstruction."""
    from .calibration import DEFAULT_CALIB_IMAGES, check_count
    if reconstruct is None or reconstruct is False:
        return None
    if reconstruct is True or isinstance(reconstruct, (int, np.integer)):
        if data is None:
            raise DarkpruneError("prune(reconstruct=N) takes N images of a .data file's train= list: give data=")
        count = DEFAULT_CALIB_IMAGES if reconstruct is True else check_count(int(reconstruct), "reconstruct")
        return data, count
    return reconstruct, None


def masks_for_plan(model, plan: Plan, exclude=(), grouping: Grouping | None = None) -> Masks:
    """Which channels each group loses at its planned rate: the lowest-ranked by the plan's criterion. `grouping`:
    the model's channel groups (built when not given)."""
    grouping = grouping if grouping is not None else build_grouping(model.graph)
    pruned = {}
    for gid, rate in plan.rates.items():
        if rate <= 0:
            continue
        chans = grouping.group(int(gid)).channels_at(model, rate, plan.criterion, plan.divisible)
        if len(chans):
            pruned[gid] = chans
    return Masks.for_model(model, pruned, exclude, grouping)


def loss_envelope(sensitivity, gid: int) -> list[tuple[float, float]]:
    """[(rate, loss)] of one group, ascending in rate, where loss is the largest measured loss at this rate or any
    smaller one, and at least 0. Pruning more of the same lowest-ranked channels cannot truly help, so a measured
    gain (or a dip in the curve) is noise of the finite image set; the envelope does not take it at face value."""
    worst, out = 0.0, []
    for rate, metric in sorted(sensitivity.curves[gid].items()):
        worst = max(worst, sensitivity.baseline - metric)
        out.append((rate, worst))
    return out


def check_threshold(threshold, sensitivity) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise SettingError("threshold", f"threshold {threshold}: expected a number (an accuracy loss like 0.01)") \
            from None
    if math.isnan(value) or value < 0:
        raise SettingError("threshold", f"threshold {threshold}: the accuracy loss a layer may cost must be a "
                                        f"number >= 0")
    if value >= sensitivity.baseline:
        raise SettingError("threshold", f"threshold {threshold} is not below the model's {sensitivity.metric} "
                             f"({sensitivity.baseline:.4f}): every layer could then lose all its accuracy and be "
                             f"emptied; pick a threshold like 0.01 (one point)")
    return value


def plan_by_threshold(sensitivity, threshold: float, divisible: int = 1, exclude=()) -> Plan:
    """Each group gets the largest analysed rate such that it and every smaller analysed rate cost at most
    `threshold` on their own (see loss_envelope). The predicted loss is the sum of those groups' losses."""
    threshold = check_threshold(threshold, sensitivity)
    rates, predicted, losses = {}, 0.0, {}
    for gid in sorted(sensitivity.curves):
        if gid in exclude:
            continue
        best, best_loss = 0.0, 0.0
        for rate, loss in loss_envelope(sensitivity, gid):
            if loss > threshold + 1e-12:
                break
            best, best_loss = rate, loss
        if best > 0:
            rates[gid] = best
            losses[str(gid)] = best_loss
            predicted += best_loss
    return Plan(rates, "threshold", threshold, predicted, sensitivity.criterion, divisible,
                {"group_losses": losses})


COSTS = {"bflops": ("total_bflops", "BFLOPs"), "params": ("total_params", "parameters")}


def check_cost(cost) -> str:
    """The quantity a rate is a share of: "bflops" (Darknet's count, the default) or "params"."""
    key = str(cost).strip().lower() if cost is not None else "bflops"
    if key not in COSTS:
        raise SettingError("by", f"by {cost}: expected one of {', '.join(COSTS)} (what --rate is a share of)")
    return key


def plan_by_rate(model, sensitivity, fraction: float, divisible: int = 1, exclude=(),
                 grouping: Grouping | None = None, cost: str = "bflops") -> Plan:
    """Per-group rates that remove the share `fraction` of the model's `cost` ("bflops", Darknet's count, or
    "params", every weight, bias and batch-norm entry) with the least predicted loss (see the module doc)."""
    cost = check_cost(cost)
    stat, unit = COSTS[cost]
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise SettingError("rate", f"rate {fraction}: expected a number between 0 and 1") from None
    if not 0 < fraction < 1:
        raise SettingError("rate", f"rate {fraction}: the share of {unit} to remove must lie strictly between 0 "
                                   f"and 1")
    grouping = grouping if grouping is not None else build_grouping(model.graph)
    total = (model.graph.total_bflops if cost == "bflops"
             else live_stats(model, Masks.for_model(model, {}, (), grouping), grouping)[stat])
    if total <= 0:
        raise DarkpruneError(f"{model.cfg_path}: the model has no {unit} to remove"
                             f"{' (Darknet counts none for its layers)' if cost == 'bflops' else ''}")
    target = fraction * total

    # per-group candidate steps: (rate, saving alone, loss), on the lower convex hull of loss against saving
    def saving_of(rates: dict[int, float]) -> float:
        masks = masks_for_plan(model, Plan(rates, "rate", fraction, 0.0, sensitivity.criterion, divisible), (),
                               grouping)
        return total - live_stats(model, masks, grouping)[stat]

    hulls: dict[int, list[tuple[float, float, float]]] = {}
    for gid in sorted(sensitivity.curves):
        if gid in exclude:
            continue
        points = [(0.0, 0.0, 0.0)]
        for rate, loss in loss_envelope(sensitivity, gid):
            points.append((rate, saving_of({gid: rate}), loss))
        hulls[gid] = _lower_hull(points)
    position = {gid: 0 for gid in hulls}
    current = {gid: 0.0 for gid in hulls}
    achieved, predicted = 0.0, 0.0
    while achieved < target:
        best = None
        for gid, hull in hulls.items():
            k = position[gid]
            if k + 1 >= len(hull):
                continue
            (_, s0, l0), (r1, s1, l1) = hull[k], hull[k + 1]
            slope = (l1 - l0) / max(s1 - s0, 1e-12)
            if best is None or slope < best[0]:
                best = (slope, gid, r1, l1 - l0)
        if best is None:
            raise SettingError("rate", f"rate {fraction}: even the largest analysed rates of every group remove only "
                                       f"{achieved / total:.1%} of the {unit}; analyse larger rates or ask less")
        _, gid, rate, dloss = best
        position[gid] += 1
        current[gid] = rate
        predicted += dloss
        achieved = saving_of({g: r for g, r in current.items() if r > 0})
    envelopes = {gid: dict(loss_envelope(sensitivity, gid)) for gid in hulls}
    current, achieved, trimmed_loss = _trim_overshoot(current, envelopes, saving_of, target, achieved)
    predicted = predicted if trimmed_loss is None else trimmed_loss
    rates = {g: r for g, r in current.items() if r > 0}
    return Plan(rates, "rate", fraction, predicted, sensitivity.criterion, divisible,
                {"cost": cost, f"{cost}_removed": achieved, f"{cost}_total": total})


def _trim_overshoot(current: dict[int, float], envelopes: dict[int, dict[float, float]], saving_of, target: float,
                    achieved: float, budget: int = 256) -> tuple[dict[int, float], float, float | None]:
    """Take back what the hull walk overshot: its steps skip rates off the convex hull, so its last step can save far
    more than the target asks (LeNet by parameters: 22% kept for a 30% target). Repeatedly, among the moves of one
    group down to a smaller analysed rate (off its hull included) that do not raise the predicted loss, the one with
    the largest loss reduction (ties: the smallest new rate) that still reaches the target is taken. Rates only go
    down, so this ends; `budget` bounds the exact savings measured (each is a masking of the whole model: some
    15 ms on Yolo-Fastest). (rates, saving, the new predicted loss or None when nothing moved)."""
    def loss_of(rates):
        return sum(envelopes[g].get(r, 0.0) for g, r in rates.items() if r > 0)

    current, trimmed = dict(current), False
    while budget > 0:
        base = loss_of(current)
        moves = sorted((-round(base - loss_of({**current, gid: lower}), 12), lower, gid)
                       for gid, rate in current.items() for lower in [0.0] + list(envelopes[gid]) if lower < rate)
        taken = None
        for neg_reduction, lower, gid in moves:
            if neg_reduction > 0 or budget <= 0:
                break
            trial = {**current, gid: lower}
            budget -= 1
            saved = saving_of({g: r for g, r in trial.items() if r > 0})
            if saved >= target:
                taken = (trial, saved)
                break
        if taken is None:
            break
        (current, achieved), trimmed = taken, True
    return current, achieved, (loss_of(current) if trimmed else None)


def _lower_hull(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Points (rate, saving, loss) sorted by saving; keep those on the lower convex hull (the efficient steps)."""
    pts = sorted(points, key=lambda p: (p[1], p[2]))
    hull: list[tuple[float, float, float]] = []
    for p in pts:
        if hull and p[1] <= hull[-1][1] + 1e-15:
            if p[2] < hull[-1][2] and len(hull) > 1:
                hull[-1] = p
            continue
        while len(hull) >= 2:
            (_, x1, y1), (_, x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[1] - x1) > (p[2] - y1) * (x2 - x1):    # hull[-1] is above the chord: drop it
                hull.pop()
            else:
                break
        hull.append(p)
    return hull

