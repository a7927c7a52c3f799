"""Sensitivity analysis (`ana`): how much accuracy each channel group costs when a share of its channels is pruned.

For each prunable group and each rate, the group's least important channels (by the criterion) are masked exactly as
`masks.apply_masks` masks them, the model is evaluated on the validation images, and the metric is recorded (mAP@0.5
for detectors, top-1 for classifiers).

The prefix cache. Masking one group changes nothing before the group's first member, and often not much after it
either: a member conv whose inputs are unchanged outputs the original activations with the pruned channels at zero,
a depthwise conv reading such a map does the same, and so do routes, dropouts, upsamples and shortcuts of such maps.
The first layer whose output really changes (the "divergence layer": typically the 1x1 conv reading the pruned
map) is where recomputation must start. So we keep, for all evaluation images, the original activations that the
layers from there on read (the "frontier"), zero the pruned channels in the ones that carry them, and rerun only the
rest of the network. Groups are visited in order of their divergence layer, so the frontier moves forward once over
the whole run. The results are bit-for-bit those of evaluating each masked model from its input
(`prefix_cache=False`), which the tests check.

Results are written after every group (`sensitivity.json`, or `sensitivity.shard-I-of-N.json` for a shard), with
fingerprints of the model's structure, its weights and the images, so that a killed run resumes where it stopped
(without measuring the baseline again) and a changed model or image set is refused. Shards of one analysis merge
into the file an unsharded run writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..darknet.layer_types import PRODUCER, layer_type, role
from ..darknet.model import Model
from ..engine.network import Network
from ..errors import DarkpruneError, SettingError
from ..util.jsonio import write_json
from .criteria import channels_to_prune, check_criterion
from .groups import CROSS_CHANNEL_ACTIVATIONS, NONZERO_AT_ZERO, Group, Grouping, build_grouping
from .masks import masked_group_arrays, structure_fingerprint
from .variants import Measure, PrefixCache

FORMAT = "darkprune-sensitivity"
DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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
    assigned: list[int] | None = None                          # group ids this run (or shard) must analyse
    seconds: float = 0.0
    weights_digest: str = ""                                   # sha256 of the parameters analysed
    data_digest: str = ""                                      # sha256 of the image list, files and labels
    exclude: list[str] = field(default_factory=list)
    model: Model | None = field(default=None, repr=False, compare=False)
    grouping: Grouping | None = field(default=None, repr=False, compare=False)    # the model's channel groups

    # -- planning (see plan.py) ---------------------------------------------------------------------------------
    def plan(self, threshold: float | None = None, rate: float | None = None, divisible: int | None = None,
             exclude=()):
        """A Plan: `threshold=` (accuracy loss each group may cost, in the metric's units) or `rate=` (share of
        BFLOPs to remove). `exclude`: layer names/indices never pruned (needs the model)."""
        from .plan import plan_by_rate, plan_by_threshold
        if (threshold is None) == (rate is None):
            raise DarkpruneError("give exactly one of threshold= (accuracy loss per layer) or rate= (BFLOPs share)")
        divisible = self.divisible if divisible is None else int(divisible)
        if exclude and self.model is None:
            raise DarkpruneError("excluding layers needs the model: Sensitivity.load(path, model)")
        excluded = resolve_exclude(self.model, exclude, self.grouping) if exclude else set()
        if threshold is not None:
            return plan_by_threshold(self, threshold, divisible, excluded)
        if self.model is None:
            raise DarkpruneError("planning by rate needs the model: Sensitivity.load(path, model)")
        return plan_by_rate(self.model, self, rate, divisible, excluded, self.grouping)

    def loss(self, group: int, rate: float) -> float:
        """The measured metric loss of pruning `rate` of group `group` alone (negative: the metric went up)."""
        return self.baseline - self.curves[group][rate]

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT, "fingerprint": self.fingerprint, "weights_digest": self.weights_digest,
            "data_digest": self.data_digest, "metric": self.metric, "baseline": self.baseline,
            "rates": self.rates, "criterion": self.criterion, "divisible": self.divisible, "images": self.images,
            "data": self.data, "exclude": list(self.exclude), "shard": list(self.shard) if self.shard else None,
            "assigned": self.assigned, "seconds": round(self.seconds, 2),
            "groups": [{"id": g, **self.groups.get(g, {}),
                        "metric": {f"{r:g}": self.curves[g][r] for r in sorted(self.curves[g])}}
                       for g in sorted(self.curves)],
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "sensitivity") -> "Sensitivity":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DarkpruneError(f"{source}: not a darkprune sensitivity file")
        try:
            sens = cls(str(data["fingerprint"]), str(data["metric"]), float(data["baseline"]),
                       [float(r) for r in data["rates"]], str(data["criterion"]), int(data.get("divisible", 1)),
                       int(data["images"]), str(data.get("data", "")),
                       shard=tuple(int(v) for v in data["shard"]) if data.get("shard") else None,
                       assigned=[int(g) for g in data["assigned"]] if data.get("assigned") is not None else None,
                       seconds=float(data.get("seconds", 0.0)), weights_digest=str(data.get("weights_digest", "")),
                       data_digest=str(data.get("data_digest", "")),
                       exclude=[str(e) for e in data.get("exclude", [])])
            for g in data["groups"]:
                gid = int(g["id"])
                sens.curves[gid] = {float(r): float(v) for r, v in g["metric"].items()}
                sens.groups[gid] = {k: v for k, v in g.items() if k not in ("id", "metric")}
        except (KeyError, TypeError, ValueError) as exc:
            raise DarkpruneError(f"{source}: malformed sensitivity file ({type(exc).__name__}: {exc})") from None
        return sens

    def save(self, path) -> None:
        """Write the JSON atomically (a temp file beside it, then a rename)."""
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path, model: Model | None = None, grouping: Grouping | None = None) -> "Sensitivity":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DarkpruneError(f"{path}: no sensitivity analysis here (run `darkprune ana` first)") from None
        except IsADirectoryError:
            raise DarkpruneError(f"{path}: is a folder, not a sensitivity file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DarkpruneError(f"{path}: corrupt sensitivity file ({exc})") from None
        sens = cls.from_json(data, str(path))
        if model is not None:
            sens.bind(model, str(path), grouping)
        return sens

    def bind(self, model: Model, source: str = "sensitivity", grouping: Grouping | None = None) -> None:
        """Attach the model this analysis was made for (and its channel grouping); refuse another one."""
        if structure_fingerprint(model.graph) != self.fingerprint:
            raise DarkpruneError(f"{source}: this analysis was made for another model, not "
                                 f"{model.cfg_path or 'this model'}")
        grouping = grouping if grouping is not None else build_grouping(model.graph)
        for gid, info in self.groups.items():
            if gid >= len(grouping.groups) or (info.get("channels") and
                                               grouping.groups[gid].channels != int(info["channels"])):
                raise DarkpruneError(f"{source}: group {gid} does not match the channel groups of "
                                     f"{model.cfg_path or 'this model'} (made by another darkprune version?)")
        self.model, self.grouping = model, grouping

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
        from ..util.plot import line_chart
        series = [{"label": f"g{g} {','.join(self.groups.get(g, {}).get('members', []))}",
                   "x": [0.0] + sorted(self.curves[g]),
                   "y": [0.0] + [self.baseline - self.curves[g][r] for r in sorted(self.curves[g])]}
                  for g in sorted(self.curves)]
        line_chart(path, series, f"Sensitivity: {self.metric} loss per group (baseline {self.baseline:.3f})",
                   "pruning rate (share of the group's channels)", f"{self.metric} loss")


# ----------------------------------------------------------------------------------------------------------------
def resolve_exclude(model: Model, exclude, grouping: Grouping | None = None) -> set[int]:
    """Layer names/indices the user protects -> the ids of the prunable groups holding their channels. An unknown
    name or an index out of range is refused, naming the cfg; a layer that is never pruned anyway (a head's conv, a
    maxpool: Vitis AI users list those in ignore_layer) gets a warning."""
    if not exclude:
        return set()
    if isinstance(exclude, (str, int)):
        exclude = [exclude]
    graph = model.graph
    grouping = grouping if grouping is not None else build_grouping(graph)
    by_layer: dict[int, set[int]] = {}
    for g in grouping.groups:
        for m in g.members:
            by_layer.setdefault(m, set()).add(g.id)
    out: set[int] = set()
    for item in exclude:
        text = str(item).strip()
        if not text:
            continue
        if text.lstrip("-").isdigit() and not 0 <= int(text) < len(graph):
            raise SettingError("exclude", f"exclude {text}: {graph.cfg.path} has layers 0..{len(graph) - 1}")
        try:
            layer = graph.find(text)
        except DarkpruneError:
            raise SettingError("exclude", f"exclude {text}: no layer named '{text}' in {graph.cfg.path} (names look like "
                                          f"conv12 or connected3, or give the layer index; `darkprune info` lists "
                                          f"them)") from None
        groups = {g for g in by_layer.get(layer.index, ()) if grouping.groups[g].prunable}
        if not groups:
            why = next((grouping.groups[g].reason for g in by_layer.get(layer.index, ())), "")
            warnings.warn(f"exclude {text}: layer {layer.index} ({layer.name}, [{layer.section.header}]) of "
                          f"{graph.cfg.path} is never pruned anyway" + (f" ({why})" if why else ""))
        out |= groups
    return out


def metric_name(model: Model) -> str:
    from ..darknet.heads import metric_name
    return metric_name(model.graph)


def evaluation_outputs(network: Network) -> list[int]:
    """The layers evaluate() reads: the [yolo]/[region] heads, or the classifier's output layer."""
    from ..detect import classifier_output, detection_heads
    heads = [index for index, _ in detection_heads(network.graph)]
    return heads or [classifier_output(network)]


def prunable_groups(model: Model, exclude=(), grouping: Grouping | None = None) -> list[Group]:
    """The groups an analysis visits, in network order (by first member)."""
    grouping = grouping if grouping is not None else build_grouping(model.graph)
    excluded = resolve_exclude(model, exclude, grouping)
    groups = [g for g in grouping.groups if g.prunable and g.id not in excluded]
    return sorted(groups, key=lambda g: (min(g.members), g.id))


def shard_groups(groups: list[Group], shard: tuple[int, int] | None) -> list[Group]:
    """Shard I of N takes every N-th group from the I-th (round robin: each shard gets early and late groups)."""
    if shard is None:
        return groups
    index, count = shard
    return groups[index - 1::count]


def weights_digest(model: Model) -> str:
    h = hashlib.sha256()
    for index in sorted(model.params):
        for name in sorted(model.params[index]):
            arr = np.ascontiguousarray(model.params[index][name], dtype=np.float32)
            h.update(f"{index}:{name}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:32]


def data_digest(dataset) -> str:
    """The image files (path, size, modification time) and their ground truth, hashed."""
    h = hashlib.sha256()
    for i, path in enumerate(dataset.image_paths):
        try:
            st = os.stat(path)
        except OSError:
            raise DarkpruneError(f"{path}: no such image file") from None
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        if dataset.boxes is not None:
            h.update(np.ascontiguousarray(dataset.boxes[i], dtype=np.float32).tobytes())
    if dataset.labels is not None:
        h.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# The masked variant of one group at one rate

def affected_layers(group: Group) -> list[int]:
    """Layers whose parameters masking `group` may change: its members and the layers reading its channels."""
    return group.affected_layers()


def masked_overrides(model: Model, group: Group, channels: np.ndarray,
                     grouping: Grouping | None = None) -> dict[int, dict[str, np.ndarray]]:
    """The parameters of the layers that masking `channels` of `group` changes, exactly as `apply_masks` changes
    them (members' filters, biases and batch-norm rows, standalone batch norms, per-channel shortcut weights and
    the input columns of every reader). Only those layers are copied."""
    grouping = grouping if grouping is not None else build_grouping(model.graph)
    return masked_group_arrays(model, group, channels, grouping)


def divergence_layer(grouping: Grouping, group: Group) -> tuple[int, set[int]]:
    """(d, zeroed): the first layer whose output, with any share of `group` masked, can differ from the original
    other than by the group's channels being exactly zero; and the layers before d whose outputs carry the group's
    (then zero) channels. Layers before d need not be recomputed: their outputs are the original ones with the
    pruned channels set to 0. Conservative: any layer these rules do not know to be safe counts as diverging."""
    graph = grouping.graph
    space = grouping.space
    gid = group.id
    owner = grouping.owner_group
    members = set(group.members)
    zeroed: set[int] = set()              # layers whose output is the original with some group channels at zero
    start = min(members)
    for layer in graph.layers[start:]:
        i = layer.index
        entry, a = layer_type(layer), layer.attrs
        ins_zeroed = [j for j in layer.inputs if j in zeroed]
        own_ids = space.ids[i]
        carries = bool((owner[own_ids] == gid).any())
        if role(layer) == PRODUCER:
            reads = space.input_ids(layer) if layer.sources else np.zeros(0, np.int64)
            reads_group = bool(ins_zeroed) and bool((owner[reads] == gid).any())
            if reads_group:
                if entry.blocks(layer) <= 1 or not _blocks_follow_group(grouping, layer, reads, own_ids, gid):
                    return i, zeroed
            if i in members or carries:
                if not _zero_at_zero(a.get("activation", "linear")):
                    return i, zeroed
                zeroed.add(i)
            elif reads_group:
                return i, zeroed            # (not reached: a grouped conv reading the group is a member)
            continue
        if not ins_zeroed:
            if carries:                     # group channels made by a member not yet reached: cannot happen
                return i, zeroed
            continue
        zero_at_zero = _zero_at_zero(a.get("activation", "linear"))
        # what the entry says about zeros: passed on always (route, upsample, a [batchnorm], whose pruned entries
        # apply_masks clears: 0 -> 0), after an activation that is 0 at 0, or by a sum of tied operands
        if entry.keeps_zero == "always" or (entry.keeps_zero == "activation" and zero_at_zero) or \
                (entry.keeps_zero == "tied" and zero_at_zero and _all_operands_carry(space, layer, owner, gid)):
            zeroed.add(i)
        else:
            return i, zeroed
    return len(graph) - 1, zeroed


def _zero_at_zero(act) -> bool:
    return NONZERO_AT_ZERO.get(act, 0.0) == 0.0 and act not in CROSS_CHANNEL_ACTIVATIONS


def _blocks_follow_group(grouping: Grouping, layer, reads: np.ndarray, own: np.ndarray, gid: int) -> bool:
    """A grouped conv reading the group's channels is safe when every block it reads a group channel in is one
    group channel as a whole (inputs and filters), so pruning that channel removes the whole block's filters."""
    g = layer_type(layer).blocks(layer)
    cin, n = len(reads) // g, len(own) // g
    owner, chan = grouping.owner_group, grouping.owner_channel
    for k in range(g):
        block_in, block_out = reads[k * cin:(k + 1) * cin], own[k * n:(k + 1) * n]
        if not (owner[block_in] == gid).any():
            continue
        ids = np.concatenate([block_in, block_out])
        if not ((owner[ids] == gid).all() and len(np.unique(chan[ids])) == 1):
            return False
    return True


def _all_operands_carry(space, layer, owner: np.ndarray, gid: int) -> bool:
    """Every operand of a shortcut has the group's channels at the same positions (they are tied)."""
    operands = [owner[space.operand(layer, k)] == gid for k in range(len(layer.sources))]
    return all(len(o) == len(operands[0]) and (o == operands[0]).all() for o in operands)


# ----------------------------------------------------------------------------------------------------------------
def analyze(model: Model, data, rates=DEFAULT_RATES, criterion: str = "l1", limit: int | None = None,
            divisible: int = 1, exclude=(), shard: tuple[int, int] | None = None, out_path=None,
            resume: bool = True, batch: int = 16, prefix_cache: bool = True, progress: bool = True,
            cache_dir=None, callback=None, prepare=None) -> Sensitivity:
    """Run the sensitivity analysis of `model` on `data` (a Dataset or a .data path).

    `rates`: shares of each group's channels to prune, each strictly between 0 and 1. `criterion`: "l1" or "bn".
    `divisible`: kept channels rounded up to a multiple. `exclude`: layer names/indices never pruned. `shard`:
    (I, N) analyses the I-th of N round-robin shares of the groups. With `out_path`, results are saved after every
    group and a previous partial run in that file is resumed (`resume=False` starts over). `callback(group_id,
    curve)` is called after each group is saved. `prepare()` is called once, after every input was checked and the
    baseline measured, before anything is written (the CLI creates the workspace there, so that a refused run leaves
    nothing behind). `prefix_cache=False` evaluates every variant from the input."""
    from ..evaluate import evaluate, load_dataset
    from ..util.progress import progress_enabled

    rates, divisible, shard, batch = _check_settings(rates, criterion, divisible, shard, batch)
    dataset = load_dataset(data, limit)
    exclude = [str(e).strip() for e in ([exclude] if isinstance(exclude, (str, int)) else exclude or ())
               if str(e).strip()]
    grouping = build_grouping(model.graph)
    mine = shard_groups(prunable_groups(model, exclude, grouping), shard)
    fingerprint = structure_fingerprint(model.graph)
    digest_w, digest_d = weights_digest(model), data_digest(dataset)
    metric = metric_name(model)
    show = progress_enabled(progress)
    started = time.perf_counter()

    sens = None
    if out_path is not None and resume and Path(out_path).exists():
        sens = Sensitivity.load(out_path, model, grouping)
        _check_resumable(sens, out_path, rates, criterion, len(dataset), divisible, shard, exclude, digest_w,
                         digest_d)
    todo = [g for g in mine if sens is None or not (g.id in sens.curves and len(sens.curves[g.id]) == len(rates))]
    if sens is not None and not todo:
        sens.model, sens.grouping = model, grouping
        if prepare is not None:
            prepare()
        return sens

    network = Network(model)
    positions = {g.id: divergence_layer(grouping, g) for g in todo}
    todo.sort(key=lambda g: (positions[g.id][0], g.id))
    prefix = PrefixCache(network, evaluation_outputs(network), len(dataset), enabled=prefix_cache)

    if sens is None:
        first = positions[todo[0].id][0] if todo else 0
        forward = prefix.base_runner(first) if prefix_cache and todo else None
        base = evaluate(None, dataset, network=network, forward=forward, progress=show, batch=batch,
                        cache_dir=cache_dir)
        sens = Sensitivity(fingerprint, metric, float(base[metric]), rates, criterion, divisible, len(dataset),
                           _source(dataset), shard=shard, assigned=[g.id for g in mine],
                           weights_digest=digest_w, data_digest=digest_d, exclude=list(exclude))
        if prepare is not None:
            prepare()
        if out_path is not None:
            sens.save(out_path)
    elif prepare is not None:
        prepare()
    sens.model, sens.grouping = model, grouping
    run = _Run(model, grouping, network, prefix, positions, sens, out_path, callback, batch, prefix_cache,
               sens.seconds)
    measure = Measure(network, dataset, metric, batch, cache_dir)
    bar = tqdm(total=len(todo) * len(rates), desc="analysis", unit="eval", file=sys.stderr, disable=not show,
               dynamic_ncols=True)
    try:
        for group in todo:
            run.group(group, measure, bar, started)
    finally:
        bar.close()
        measure.close()
    return sens


def _check_settings(rates, criterion, divisible, shard, batch):
    """The analysis settings checked and normalised: (rates, divisible, shard, batch)."""
    rates = _check_rates(rates)
    check_criterion(criterion)
    divisible = int(divisible)
    if divisible < 1:
        raise SettingError("divisible", f"divisible {divisible}: must be a whole number >= 1")
    if shard is not None:
        shard = (int(shard[0]), int(shard[1]))
        if not 1 <= shard[0] <= shard[1]:
            raise SettingError("shard", f"shard {shard[0]}/{shard[1]}: expected I/N with 1 <= I <= N")
    batch = int(batch)
    if batch < 1:
        raise SettingError("batch", f"batch {batch}: must be >= 1")
    return rates, divisible, shard, batch


@dataclass
class _Run:
    """One analysis run's state while it measures its groups: what `analyze` prepared, and where results go."""
    model: Model
    grouping: Grouping
    network: Network
    prefix: PrefixCache
    positions: dict
    sens: Sensitivity
    out_path: object
    callback: object
    batch: int
    prefix_cache: bool
    previous_seconds: float           # the time spent by the run this one resumes

    def group(self, group: Group, measure: Measure, bar, started: float) -> None:
        """Measure every rate of one group (each variant scored while the next one runs), then save."""
        sens = self.sens
        position, zeroed_layers = self.positions[group.id]
        scores = group.scores(self.model, sens.criterion)
        if self.prefix_cache:
            self.prefix.advance(position, self.batch)
        futures = {}
        for rate in sens.rates:
            chans = channels_to_prune(scores, rate, sens.divisible)
            variant = self.network.variant(masked_group_arrays(self.model, group, chans, self.grouping))
            forward = None
            if self.prefix_cache:
                zero = _zero_positions(self.grouping, group, chans, self.prefix.need(position), zeroed_layers)
                forward = self.prefix.runner(variant, position, zero)
            futures[rate] = measure.submit(variant, forward)
            bar.update(1)
            _show_done(bar, group.id, futures, sens.metric)
        curve = {rate: future.result() for rate, future in futures.items()}
        _show_done(bar, group.id, futures, sens.metric)
        sens.curves[group.id] = curve
        sens.groups[group.id] = {"members": [self.model.graph[m].name for m in group.members],
                                 "channels": int(group.channels)}
        sens.seconds = self.previous_seconds + time.perf_counter() - started
        if self.out_path is not None:
            sens.save(self.out_path)
        if self.callback is not None:
            self.callback(group.id, dict(curve))


def _show_done(bar, group_id: int, futures: dict, metric: str) -> None:
    """The progress bar's note: the last finished variant of this group (the newest one is usually still being
    scored)."""
    done = [rate for rate, future in futures.items() if future.done() and future.exception() is None]
    if done:
        rate = done[-1]
        bar.set_postfix_str(f"group {group_id} rate {rate:g}: {metric} {futures[rate].result():.4f}")


def _zero_positions(grouping: Grouping, group: Group, chans: np.ndarray, need: list[int],
                    zeroed_layers: set[int]) -> dict[int, np.ndarray]:
    """For each frontier layer carrying the group's channels: which of its output channels are pruned."""
    pruned = group.global_ids[chans].ravel()
    out = {}
    for i in need:
        if i in zeroed_layers:
            pos = np.flatnonzero(np.isin(grouping.space.ids[i], pruned))
            if len(pos):
                out[i] = pos
    return out


def _source(dataset) -> str:
    source = getattr(dataset, "source", "") or ""
    return str(Path(source).resolve()) if source else ""


def _check_rates(rates) -> list[float]:
    try:
        values = sorted({float(r) for r in rates})
    except (TypeError, ValueError):
        raise SettingError("rates", f"rates {rates}: expected numbers like 0.1,0.2,0.5") from None
    bad = [r for r in values if not (0.0 < r < 1.0) or math.isnan(r)]
    if not values or bad:
        shown = ",".join(f"{r:g}" for r in (bad or values)) or "(none)"
        raise SettingError("rates", f"rates {shown}: rates must lie strictly between 0 and 1 (a rate of 1 would "
                                    f"empty a layer, 0 prunes nothing)")
    return values


def _check_resumable(sens: Sensitivity, path, rates, criterion, images, divisible, shard, exclude, digest_w,
                     digest_d) -> None:
    mine = (sens.rates, sens.criterion, sens.images, sens.divisible, sens.shard, sorted(sens.exclude))
    asked = (rates, criterion, images, divisible, shard, sorted(exclude))
    if mine != asked:
        names = ("rates", "criterion", "images", "divisible", "shard", "exclude")
        diff = ", ".join(f"{n} {a!r} here, {b!r} asked" for n, a, b in zip(names, mine, asked) if a != b)
        raise DarkpruneError(f"{path}: an analysis with other settings is already here ({diff}); use another "
                             f"workspace, or delete the file to start over")
    if sens.weights_digest and sens.weights_digest != digest_w:
        raise DarkpruneError(f"{path}: this analysis was made with other weights; use a new workspace")
    if sens.data_digest and sens.data_digest != digest_d:
        raise DarkpruneError(f"{path}: this analysis was made on other images or labels (files changed since); "
                             f"use a new workspace")


def merge_shards(paths: list, model: Model, out_path=None) -> Sensitivity:
    """Join the shard files of one analysis into the file an unsharded run writes."""
    if not paths:
        raise DarkpruneError("no shard files (sensitivity.shard-I-of-N.json) to merge: analyse each shard I/N "
                             "first")
    shards = [Sensitivity.load(p, model) for p in paths]
    first = shards[0]
    for s, p in zip(shards, paths):
        if not s.shard:
            raise DarkpruneError(f"{p}: not a shard file (made without a shard setting)")
    count = first.shard[1]
    seen = sorted(s.shard[0] for s in shards)
    if any(s.shard[1] != count for s in shards) or seen != list(range(1, count + 1)):
        raise DarkpruneError(f"{Path(paths[0]).parent}: shards {seen} of {count} found; every shard 1..{count} "
                             f"must be present (and once) to merge")
    keys = ("rates", "criterion", "images", "divisible", "metric", "weights_digest", "data_digest", "exclude")
    for s, p in zip(shards, paths):
        if any(getattr(s, k) != getattr(first, k) for k in keys):
            raise DarkpruneError(f"{p}: this shard ran with other settings, weights or images than {paths[0]}")
        if abs(s.baseline - first.baseline) > 1e-12:
            raise DarkpruneError(f"{p}: this shard measured {s.metric} {s.baseline}, {paths[0]} {first.baseline}")
        if not s.complete:
            missing = [g for g in (s.assigned or []) if g not in s.curves]
            raise DarkpruneError(f"{p}: shard {s.shard[0]}/{s.shard[1]} is not finished ({len(missing)} groups "
                                 f"left); rerun it to resume")
    merged = Sensitivity(first.fingerprint, first.metric, first.baseline, first.rates, first.criterion,
                         first.divisible, first.images, first.data, shard=None,
                         seconds=sum(s.seconds for s in shards), weights_digest=first.weights_digest,
                         data_digest=first.data_digest, exclude=list(first.exclude))
    merged.assigned = sorted(g for s in shards for g in (s.assigned or []))
    for s in shards:
        merged.curves.update(s.curves)
        merged.groups.update(s.groups)
    merged.model = model
    if out_path is not None:
        merged.save(out_path)
    return merged


__all__ = ["Sensitivity", "analyze", "merge_shards", "resolve_exclude", "DEFAULT_RATES", "divergence_layer",
           "masked_overrides", "metric_name"]
