"""Sensitivity analysis (`ana`): how much accuracy each channel group costs when a share of its channels is pruned.

For each prunable group and each rate, the group's least important channels (by the criterion) are masked, the
model is evaluated on the validation images, and the metric is recorded (mAP@0.5 for detectors, top-1 for
classifiers). Only the group's own layers change, so the layers before the group's first member compute the same
activations for every rate: we keep those "frontier" activations for all images and rerun only the rest of the
network (groups are visited in network order, so the frontier moves forward once over the whole run).

Results are written after every group (`sensitivity.json`, or `sensitivity.shard-I-of-N.json` for a shard), so a
killed run resumes where it stopped; shards of one analysis merge into the same file an unsharded run writes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..darknet.model import Model
from ..engine.network import Network
from ..errors import DarkpruneError
from .criteria import CRITERIA, channel_scores, channels_to_prune
from .groups import Group, grouping_for
from .masks import structure_fingerprint

FORMAT = "darkprune-sensitivity"
DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Above this many bytes of cached frontier activations we recompute from the input instead.
FRONTIER_BUDGET_BYTES = 3 << 30


@dataclass
class Sensitivity:
    """Per-group loss curves: curves[group id][rate] = the metric with that share of the group pruned."""
    fingerprint: str
    metric: str                      # "map50" or "top1"
    baseline: float
    rates: list[float]
    criterion: str
    divisible: int
    images: int
    data: str
    curves: dict[int, dict[float, float]] = field(default_factory=dict)
    groups: dict[int, dict] = field(default_factory=dict)     # id -> {"members": [...names], "channels": n}
    shard: tuple[int, int] | None = None
    assigned: list[int] | None = None                          # group ids this shard must analyse
    seconds: float = 0.0
    model: Model | None = field(default=None, repr=False, compare=False)

    # -- planning (see plan.py) ---------------------------------------------------------------------------------
    def plan(self, threshold: float | None = None, rate: float | None = None, divisible: int | None = None,
             exclude=()):
        from .plan import plan_by_rate, plan_by_threshold
        divisible = self.divisible if divisible is None else divisible
        excluded = resolve_exclude(self.model, exclude) if self.model is not None else set()
        if (threshold is None) == (rate is None):
            raise DarkpruneError("give exactly one of threshold= (accuracy loss per layer) or rate= (BFLOPs share)")
        if threshold is not None:
            return plan_by_threshold(self, threshold, divisible, excluded)
        if self.model is None:
            raise DarkpruneError("planning by rate needs the model: Sensitivity.load(path, model)")
        return plan_by_rate(self.model, self, rate, divisible, excluded)

    def loss(self, group: int, rate: float) -> float:
        return self.baseline - self.curves[group][rate]

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT, "fingerprint": self.fingerprint, "metric": self.metric, "baseline": self.baseline,
            "rates": self.rates, "criterion": self.criterion, "divisible": self.divisible, "images": self.images,
            "data": self.data, "shard": list(self.shard) if self.shard else None, "assigned": self.assigned,
            "seconds": round(self.seconds, 2),
            "groups": [{"id": g, **self.groups[g],
                        "metric": {f"{r:g}": self.curves[g][r] for r in sorted(self.curves[g])}}
                       for g in sorted(self.curves)],
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "sensitivity") -> "Sensitivity":
        if data.get("format") != FORMAT:
            raise DarkpruneError(f"{source}: not a darkprune sensitivity file")
        sens = cls(data["fingerprint"], data["metric"], float(data["baseline"]), [float(r) for r in data["rates"]],
                   data["criterion"], int(data.get("divisible", 1)), int(data["images"]), data.get("data", ""),
                   shard=tuple(data["shard"]) if data.get("shard") else None, assigned=data.get("assigned"),
                   seconds=float(data.get("seconds", 0.0)))
        for g in data["groups"]:
            gid = int(g["id"])
            sens.curves[gid] = {float(r): float(v) for r, v in g["metric"].items()}
            sens.groups[gid] = {k: v for k, v in g.items() if k not in ("id", "metric")}
        return sens

    def save(self, path) -> None:
        from .workspace import Workspace
        path = Path(path)
        Workspace(path.parent).write_json(path.name, self.to_json())

    @classmethod
    def load(cls, path, model: Model | None = None) -> "Sensitivity":
        import json
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DarkpruneError(f"{path}: no sensitivity analysis here (run `darkprune ana` first)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DarkpruneError(f"{path}: corrupt sensitivity file ({exc})") from None
        sens = cls.from_json(data, str(path))
        if model is not None:
            sens.bind(model, str(path))
        return sens

    def bind(self, model: Model, source: str = "sensitivity") -> None:
        if structure_fingerprint(model.graph) != self.fingerprint:
            raise DarkpruneError(f"{source}: this analysis was made for another model, not {model.cfg_path}")
        self.model = model

    @property
    def complete(self) -> bool:
        todo = self.assigned if self.assigned is not None else []
        return all(g in self.curves and len(self.curves[g]) == len(self.rates) for g in todo)

    # -- display ----------------------------------------------------------------------------------------------
    def table(self) -> str:
        head = f"{'group':>5} {'members':<28}{'ch':>5} " + " ".join(f"{r:>6g}" for r in self.rates)
        lines = [f"sensitivity: {self.metric} loss (baseline {self.baseline:.4f}) when each group alone is pruned "
                 f"at each rate ({self.criterion} criterion, {self.images} images)", head]
        for g in sorted(self.curves):
            info = self.groups.get(g, {})
            members = ",".join(info.get("members", []))
            if len(members) > 27:
                members = members[:24] + "..."
            losses = " ".join(f"{self.baseline - self.curves[g][r]:6.3f}" if r in self.curves[g] else f"{'-':>6}"
                              for r in self.rates)
            lines.append(f"{g:5d} {members:<28}{info.get('channels', 0):5d} {losses}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        from ..plot import line_chart
        series = [{"label": f"g{g} {','.join(self.groups.get(g, {}).get('members', []))}",
                   "x": [0.0] + sorted(self.curves[g]),
                   "y": [0.0] + [self.baseline - self.curves[g][r] for r in sorted(self.curves[g])]}
                  for g in sorted(self.curves)]
        line_chart(path, series, f"Sensitivity: {self.metric} loss per group (baseline {self.baseline:.3f})",
                   "pruning rate (share of the group's channels)", f"{self.metric} loss")


def resolve_exclude(model: Model, exclude) -> set[int]:
    """Layer names/indices the user protects -> the ids of the groups containing them."""
    if not exclude:
        return set()
    grouping = grouping_for(model.graph)
    by_layer = {}
    for g in grouping.groups:
        for m in g.members:
            by_layer.setdefault(m, set()).add(g.id)
    out: set[int] = set()
    for item in exclude:
        layer = model.graph.find(str(item).strip())
        if layer.index not in by_layer:
            raise DarkpruneError(f"--exclude {item}: layer {layer.index} ({layer.name}, [{layer.section.header}]) "
                                 f"has no prunable channels; name convolutional or connected layers")
        out |= by_layer[layer.index]
    return out


def metric_name(model: Model) -> str:
    heads = [l for l in model.graph if l.type in ("yolo", "region", "gaussian_yolo", "detection")]
    return "map50" if heads else "top1"


def shard_groups(groups: list[Group], shard: tuple[int, int] | None) -> list[Group]:
    if shard is None:
        return groups
    index, count = shard
    return groups[index - 1::count]


def _masked_overrides(model: Model, group: Group, channels: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """The member layers' parameters with `channels` of the group cleared (exactly as masks.apply_masks does)."""
    overrides: dict[int, dict[str, np.ndarray]] = {}
    for part in group.parts:
        arrays = overrides.get(part.layer)
        if arrays is None:
            arrays = {k: v.copy() for k, v in model.params[part.layer].items()}
            overrides[part.layer] = arrays
        chans = part.channels[channels]
        for name in ("weights", "biases", "scales", "rolling_mean"):
            if name in arrays:
                arrays[name][chans] = 0.0
        if "rolling_variance" in arrays:
            arrays["rolling_variance"][chans] = 1.0
    return overrides


class _PrefixCache:
    """Frontier activations of all evaluation images at a layer position, moved forward group by group."""

    def __init__(self, network: Network, inputs: np.ndarray, outputs: list[int], batch: int, enabled: bool = True):
        self.network = network
        self.outputs = list(outputs)      # head layers: those before the position are kept from the base run
        self.inputs = inputs
        self.batch = batch
        self.position = 0
        self.state: dict[int, np.ndarray] = {-1: inputs}
        self.enabled = enabled

    def advance(self, target: int) -> None:
        if not self.enabled or target <= self.position:
            return
        need = sorted(set(self.network.frontier(target)) | {o for o in self.outputs if o < target})
        fresh = [i for i in need if i >= self.position]
        size = sum(int(np.prod(self.network.graph[i].out_shape)) for i in need if i >= 0) * 4 * len(self.inputs)
        if size > FRONTIER_BUDGET_BYTES:
            self.enabled = False          # too large to keep: evaluate from the input from now on
            self.state = {-1: self.inputs}
            self.position = 0
            return
        computed: dict[int, list[np.ndarray]] = {i: [] for i in fresh}
        if fresh:
            keep_from = [k for k in self.state if k in self.network.frontier(self.position)]
            for start in range(0, len(self.inputs), self.batch):
                sl = slice(start, start + self.batch)
                cached = {k: self.state[k][sl] for k in keep_from}
                out = self.network.forward(None, outputs=fresh, start=self.position, cached=cached)
                for i in fresh:
                    computed[i].append(out[i])
        self.state = {i: (np.concatenate(computed[i]) if i in computed else self.state[i]) for i in need}
        self.position = target

    def runner(self, variant: Network, outputs: list[int]):
        """A forward(x) for evaluate(): batches arrive in dataset order; they are served from the frontier."""
        position = {"next": 0}
        start_layer = self.position

        def forward(x: np.ndarray) -> dict:
            lo = position["next"]
            hi = lo + len(x)
            position["next"] = hi
            if not self.enabled or start_layer == 0:
                return variant.forward(x, outputs=outputs)
            cached = {k: v[lo:hi] for k, v in self.state.items()}
            later = [o for o in outputs if o >= start_layer]
            result = variant.forward(None, outputs=later, start=start_layer, cached=cached) if later else {}
            result.update({o: cached[o] for o in outputs if o < start_layer})
            return result
        return forward


def analyze(model: Model, data, rates=DEFAULT_RATES, criterion: str = "l1", limit: int | None = None,
            divisible: int = 1, exclude=(), shard: tuple[int, int] | None = None, out_path=None,
            resume: bool = True, batch: int = 16, prefix_cache: bool = True, progress: bool = True,
            cache_dir=None) -> Sensitivity:
    """Run the sensitivity analysis; with `out_path`, results are saved after every group and a previous partial
    run in that file is resumed."""
    from ..evaluate import evaluate, load_dataset, progress_enabled

    rates = sorted({float(r) for r in rates})
    if not rates or rates[0] <= 0 or rates[-1] >= 1:
        raise DarkpruneError(f"--rates {','.join(f'{r:g}' for r in rates)}: rates must lie strictly between 0 and 1 "
                             f"(a rate of 1 would empty a layer)")
    if criterion not in CRITERIA:
        raise DarkpruneError(f"--criterion {criterion}: expected one of {', '.join(CRITERIA)}")
    if shard is not None and not (1 <= shard[0] <= shard[1]):
        raise DarkpruneError(f"--shard {shard[0]}/{shard[1]}: expected I/N with 1 <= I <= N")
    dataset = load_dataset(data, limit)
    grouping = grouping_for(model.graph)
    excluded = resolve_exclude(model, exclude)
    prunable = [g for g in grouping.groups if g.prunable and g.id not in excluded]
    prunable.sort(key=lambda g: (min(g.members), g.id))
    mine = shard_groups(prunable, shard)
    fingerprint = structure_fingerprint(model.graph)
    metric = metric_name(model)
    show = progress_enabled(progress)
    network = Network(model)

    width, height, channels = (model.graph.net[k] for k in ("width", "height", "channels"))
    heads = [l.index for l in model.graph if l.type in ("yolo", "region")]
    outputs = heads or model.graph.output_layers()
    # The baseline evaluation also collects the preprocessed inputs, in evaluation order, for the prefix cache.
    keep_inputs = prefix_cache and len(dataset) * channels * height * width * 4 <= FRONTIER_BUDGET_BYTES
    captured: list[np.ndarray] = []

    def capture(x: np.ndarray) -> dict:
        if keep_inputs:
            captured.append(np.array(x, dtype=np.float32, copy=True))
        return network.forward(x, outputs=outputs)

    started = time.perf_counter()
    base = evaluate(None, dataset, network=network, forward=capture, progress=show, batch=batch,
                    cache_dir=cache_dir)
    baseline = float(base[metric])

    sens = None
    if out_path is not None and resume and Path(out_path).exists():
        sens = Sensitivity.load(out_path, model)
        same = (sens.rates == rates and sens.criterion == criterion and sens.images == len(dataset)
                and sens.divisible == divisible and (sens.shard == shard))
        if not same:
            raise DarkpruneError(f"{out_path}: an analysis with other settings (rates, criterion, images, shard) is "
                                 f"already here; use another workspace or delete the file to start over")
        if abs(sens.baseline - baseline) > 1e-9:
            raise DarkpruneError(f"{out_path}: the analysis here measured {metric} {sens.baseline:.6f}, the model now "
                                 f"gives {baseline:.6f}: the images or weights changed; use a new workspace")
    if sens is None:
        sens = Sensitivity(fingerprint, metric, baseline, rates, criterion, divisible, len(dataset),
                           str(getattr(dataset, "source", "")), shard=shard, assigned=[g.id for g in mine],
                           seconds=time.perf_counter() - started)
    sens.model = model
    todo = [g for g in mine if not (g.id in sens.curves and len(sens.curves[g.id]) == len(rates))]
    if not todo:
        return sens
    prefix = _PrefixCache(network, np.concatenate(captured), outputs, batch) if captured else None
    captured.clear()
    started = time.perf_counter() - sens.seconds
    bar = tqdm(total=len(todo) * len(rates), desc="analysis", unit="eval", file=sys.stderr, disable=not show,
               dynamic_ncols=True)
    try:
        for group in todo:
            scores = channel_scores(model, group, criterion)
            curve = {}
            if prefix is not None:
                prefix.advance(min(group.members))
            for rate in rates:
                chans = channels_to_prune(scores, rate, divisible)
                variant = network.variant(_masked_overrides(model, group, chans))
                forward = prefix.runner(variant, outputs) if prefix is not None else None
                result = evaluate(None, dataset, network=variant, forward=forward, progress=False, batch=batch,
                                  cache_dir=cache_dir)
                curve[rate] = float(result[metric])
                bar.update(1)
                bar.set_postfix_str(f"group {group.id} rate {rate:g}: {metric} {curve[rate]:.4f}")
            sens.curves[group.id] = curve
            sens.groups[group.id] = {"members": [model.graph[m].name for m in group.members],
                                     "channels": int(group.channels)}
            sens.seconds = time.perf_counter() - started
            if out_path is not None:
                sens.save(out_path)
    finally:
        bar.close()
    return sens


def merge_shards(paths: list, model: Model, out_path=None) -> Sensitivity:
    """Join the shard files of one analysis into the file an unsharded run writes."""
    shards = [Sensitivity.load(p, model) for p in paths]
    if not shards:
        raise DarkpruneError("no shard files to merge")
    first = shards[0]
    count = first.shard[1] if first.shard else 1
    seen = sorted(s.shard[0] for s in shards if s.shard)
    if seen != list(range(1, count + 1)):
        raise DarkpruneError(f"shards {seen} of {count} found: every shard 1..{count} must be present to merge")
    for s, p in zip(shards, paths):
        if (s.rates, s.criterion, s.images, s.divisible, s.metric) != \
                (first.rates, first.criterion, first.images, first.divisible, first.metric):
            raise DarkpruneError(f"{p}: this shard ran with other settings than {paths[0]}")
        if not s.complete:
            raise DarkpruneError(f"{p}: shard {s.shard[0]}/{s.shard[1]} is not finished")
    merged = Sensitivity(first.fingerprint, first.metric, first.baseline, first.rates, first.criterion,
                         first.divisible, first.images, first.data, shard=None, seconds=sum(s.seconds for s in shards))
    merged.assigned = sorted(g for s in shards for g in (s.assigned or []))
    for s in shards:
        merged.curves.update(s.curves)
        merged.groups.update(s.groups)
    merged.model = model
    if out_path is not None:
        merged.save(out_path)
    return merged

