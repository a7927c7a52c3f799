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

from ..darknet.model import Model
from ..engine.network import Network
from ..errors import DarkpruneError, SettingError
from ..util.jsonio import write_json
from .criteria import check_criterion
# the per-group measurement lives in curves.py; its names are also this module's, as before
from .curves import (CurveMeasurer, _zero_positions, affected_layers, divergence_layer,  # noqa: F401
                     evaluation_outputs, group_info, masked_overrides, metric_name)
from .groups import Group, Grouping, build_grouping
from .masks import structure_fingerprint
from .variants import PrefixCache

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
    # the second curve set (`ana --reconstruct`): each variant compensated and reconstructed (reconstruct.py's
    # SingleGroupRefit), with how it was calibrated; older files have neither
    reconstructed: dict[int, dict[float, float]] = field(default_factory=dict)
    reconstruct_info: dict = field(default_factory=dict)

    # -- planning (see plan.py) ---------------------------------------------------------------------------------
    def plan(self, threshold: float | None = None, rate: float | None = None, divisible: int | None = None,
             exclude=(), by: str = "bflops"):
        """A Plan: `threshold=` (accuracy loss each group may cost, in the metric's units) or `rate=` (share of
        BFLOPs to remove; `by="params"`: share of the parameters). `exclude`: layer names/indices never pruned
        (needs the model)."""
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
        return plan_by_rate(self.model, self, rate, divisible, excluded, self.grouping, cost=by)

    def with_reconstructed(self) -> "Sensitivity":
        """The same analysis with the reconstructed curves in place of the plain ones (what `prune --reconstruct`
        plans on)."""
        from dataclasses import replace
        return replace(self, curves=dict(self.reconstructed), model=self.model, grouping=self.grouping)

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
            **({"reconstructed": {"info": self.reconstruct_info,
                                  "groups": [{"id": g, "metric": {f"{r:g}": v for r, v in sorted(c.items())}}
                                             for g, c in sorted(self.reconstructed.items())]}}
               if self.reconstruct_info or self.reconstructed else {}),
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
            second = data.get("reconstructed") or {}
            sens.reconstruct_info = dict(second.get("info", {}))
            for g in second.get("groups", []):
                sens.reconstructed[int(g["id"])] = {float(r): float(v) for r, v in g["metric"].items()}
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

    @property
    def complete_reconstructed(self) -> bool:
        todo = self.assigned if self.assigned is not None else []
        return bool(self.reconstruct_info) and all(
            g in self.reconstructed and len(self.reconstructed[g]) == len(self.rates) for g in todo)

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
def analyze(model: Model, data, rates=DEFAULT_RATES, criterion: str = "l1", limit: int | None = None,
            divisible: int = 1, exclude=(), shard: tuple[int, int] | None = None, out_path=None,
            resume: bool = True, batch: int = 16, prefix_cache: bool = True, progress: bool = True,
            cache_dir=None, callback=None, prepare=None, cluster=None, reconstruct=None,
            reconstruct_info: dict | None = None) -> Sensitivity:
    """Run the sensitivity analysis of `model` on `data` (a Dataset or a .data path).

    `rates`: shares of each group's channels to prune, each strictly between 0 and 1. `criterion`: "l1" or "bn".
    `divisible`: kept channels rounded up to a multiple. `exclude`: layer names/indices never pruned. `shard`:
    (I, N) analyses the I-th of N round-robin shares of the groups. With `out_path`, results are saved after every
    group and a previous partial run in that file is resumed (`resume=False` starts over). `callback(group_id,
    curve)` is called after each group is saved. `prepare()` is called once, after every input was checked and the
    baseline measured, before anything is written (the CLI creates the workspace there, so that a refused run leaves
    nothing behind). `prefix_cache=False` evaluates every variant from the input. `cluster`: measure the groups as
    dask.distributed tasks, on "local:N" (a local cluster of N worker processes, for this run), a scheduler's
    address ("tcp://HOST:8786") or a distributed.Client; the results are the same (see cluster.py).
    `reconstruct`: calibration inputs (an (N, C, H, W) array, from calibration.calibration_inputs) for the second
    curve set, each variant compensated and reconstructed (`reconstruct_info`, e.g. the image count, is stored
    with it and checked on resume); the plain curves are measured too where missing."""
    from ..evaluate import load_dataset
    from ..util.progress import progress_enabled

    rates, divisible, shard, batch = _check_settings(rates, criterion, divisible, shard, batch)
    if cluster is not None:
        if reconstruct is not None:
            raise DarkpruneError("ana --reconstruct does not run on a cluster (--cluster) yet; run it in one process")
        from .cluster import check_cluster
        check_cluster(cluster)
    info = dict(reconstruct_info or {}) if reconstruct is not None else {}
    if reconstruct is not None:
        info.setdefault("calib_images", len(reconstruct))
    dataset = load_dataset(data, limit)
    exclude = [str(e).strip() for e in ([exclude] if isinstance(exclude, (str, int)) else exclude or ())
               if str(e).strip()]
    grouping = build_grouping(model.graph)
    mine = shard_groups(prunable_groups(model, exclude, grouping), shard)
    digest_w, digest_d = weights_digest(model), data_digest(dataset)
    started = time.perf_counter()

    sens = None
    if out_path is not None and resume and Path(out_path).exists():
        sens = Sensitivity.load(out_path, model, grouping)
        _check_resumable(sens, out_path, rates, criterion, len(dataset), divisible, shard, exclude, digest_w,
                         digest_d)
        if info and sens.reconstruct_info and sens.reconstruct_info != info:
            raise DarkpruneError(f"{out_path}: its reconstructed curves were calibrated otherwise "
                                 f"({sens.reconstruct_info}, asked {info}); use another workspace")

    def missing(g, curves) -> bool:
        return sens is None or not (g.id in curves and len(curves[g.id]) == len(rates))
    todo = [g for g in mine if missing(g, sens.curves if sens else {}) or
            (info and missing(g, sens.reconstructed if sens else {}))]
    fresh = Sensitivity(structure_fingerprint(model.graph), metric_name(model), math.nan, rates, criterion,
                        divisible, len(dataset), _source(dataset), shard=shard, assigned=[g.id for g in mine],
                        weights_digest=digest_w, data_digest=digest_d, exclude=list(exclude))
    run = AnalysisRun(model, dataset, grouping, todo, sens, fresh, batch, prefix_cache, cache_dir, out_path,
                      callback, prepare, progress_enabled(progress), started, calibration=reconstruct,
                      reconstruct_info=info)
    if sens is not None and not todo:
        return run.begin(None)
    if cluster is not None:
        from .cluster import analyze_on_cluster
        return analyze_on_cluster(cluster, run)
    return _analyze_here(run)


@dataclass
class AnalysisRun:
    """One analysis run with its inputs checked: the groups left to measure and where their curves go. Measuring
    happens here (`_analyze_here`) or on a cluster (cluster.py); both start it with `begin` and keep each curve
    with `record`."""
    model: Model
    dataset: object
    grouping: Grouping
    todo: list[Group]                 # the groups left to measure (in network order)
    sens: Sensitivity | None          # the analysis resumed, or None before the baseline is measured
    fresh: Sensitivity                # a new run's analysis, its baseline not yet measured
    batch: int
    prefix_cache: bool
    cache_dir: object
    out_path: object
    callback: object
    prepare: object
    show: bool                        # progress bars
    started: float
    previous_seconds: float = 0.0     # the time spent by the run this one resumes
    calibration: object = None        # ana --reconstruct: the calibration inputs of the second curve set
    reconstruct_info: dict = field(default_factory=dict)

    @property
    def settings(self) -> Sensitivity:
        return self.sens if self.sens is not None else self.fresh

    def begin(self, baseline: float | None) -> Sensitivity:
        """The baseline is measured (None: resumed): every input is fine, so `prepare()` may create the workspace;
        a new analysis is written at once (without curves)."""
        if self.sens is None:
            self.sens = self.fresh
            self.sens.baseline = float(baseline)
            if self.prepare is not None:
                self.prepare()
            if self.out_path is not None:
                self.sens.save(self.out_path)
        elif self.prepare is not None:
            self.prepare()
        self.sens.model, self.sens.grouping = self.model, self.grouping
        if self.reconstruct_info:
            self.sens.reconstruct_info = dict(self.reconstruct_info)
        self.previous_seconds = self.sens.seconds
        return self.sens

    def record(self, group: Group, curve: dict, reconstructed: bool = False) -> None:
        """Keep one group's finished curve: into the analysis (the plain or the reconstructed set), saved
        (atomically) to `out_path`, then `callback`."""
        sens = self.sens
        (sens.reconstructed if reconstructed else sens.curves)[group.id] = curve
        sens.groups[group.id] = group_info(self.model, group)
        sens.seconds = self.previous_seconds + time.perf_counter() - self.started
        if self.out_path is not None:
            sens.save(self.out_path)
        if self.callback is not None:
            self.callback(group.id, dict(curve))


def _analyze_here(run: AnalysisRun) -> Sensitivity:
    """Measure the run's groups in this process, in the order of their divergence layers (the prefix cache moves
    forward once); the baseline's pass fills the first frontier."""
    from ..evaluate import evaluate
    model, dataset, settings = run.model, run.dataset, run.settings
    network = Network(model)
    measurer_positions = {g.id: divergence_layer(run.grouping, g) for g in run.todo}
    todo = sorted(run.todo, key=lambda g: (measurer_positions[g.id][0], g.id))
    prefix = PrefixCache(network, evaluation_outputs(network), len(dataset), enabled=run.prefix_cache)
    if run.sens is None:
        first = measurer_positions[todo[0].id][0] if todo else 0
        forward = prefix.base_runner(first) if run.prefix_cache and todo else None
        base = evaluate(None, dataset, network=network, forward=forward, progress=run.show, batch=run.batch,
                        cache_dir=run.cache_dir)
        sens = run.begin(base[settings.metric])
    else:
        sens = run.begin(None)
    measurer = CurveMeasurer(model, dataset, sens.rates, sens.criterion, sens.divisible, run.batch,
                             run.prefix_cache, run.cache_dir, run.grouping, network, prefix)
    measurer.positions.update(measurer_positions)
    refit = None
    if run.calibration is not None:
        from .reconstruct import SingleGroupRefit
        refit = SingleGroupRefit(model, run.grouping, todo, run.calibration, progress=run.show)
    jobs = [(g, False) for g in todo if g.id not in sens.curves] + \
        [(g, True) for g in todo if refit is not None and g.id not in sens.reconstructed]
    jobs.sort(key=lambda job: (measurer_positions[job[0].id][0], job[0].id, job[1]))
    bar = tqdm(total=len(jobs) * len(sens.rates), desc="analysis", unit="eval", file=sys.stderr,
               disable=not run.show, dynamic_ncols=True)
    try:
        for group, second in jobs:
            run.record(group, measurer.curve(group, bar, refit if second else None), second)
    finally:
        bar.close()
        measurer.close()
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
