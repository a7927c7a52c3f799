"""Channel masks: which channels of which groups are pruned, applied to a model without changing its shapes.

A masked model keeps every array's shape; each pruned channel outputs exactly zero. For every member of the group
(a convolutional or connected layer) the channel's filter row and bias are set to 0, and with batch norm its scale
and shift (`scales`, `biases`) too, with `rolling_mean` 0 and `rolling_variance` 1 so the normalisation stays
finite: Darknet's output is then scales * (0 - 0) / sqrt(1 + eps) + 0 = 0, and OpenCV's folded batch norm gives 0 as
well. The activation then gives act(0), which is 0 for every Darknet activation except logistic and plse (0.5); the
groups code only lets such a layer be pruned where its output is multiplied by a pruned (zero) channel, so the
channel is exactly zero after that product (the SE block case). The weights consumers apply to a pruned channel
(their input columns, a standalone [batchnorm]'s entries, a per-channel shortcut weight) are cleared too: they
multiply zeros, so outputs do not change, and the masked model shows exactly the weights `transform` keeps.

Masks are saved as JSON with the model's structure fingerprint, so that a workspace made for another model is
refused, and with each group's members and size, checked again on load.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..darknet.graph import Graph
from ..darknet.layer_types import NEUTRAL, layer_type
from ..darknet.model import Model
from ..errors import DarkpruneError
from ..util.jsonio import write_json
from .groups import Grouping, build_grouping

FORMAT = "darkprune-masks"
VERSION = 1


def structure_fingerprint(graph: Graph) -> str:
    """A hash of what masks depend on: every layer's type, what it reads, its shapes and the options that decide
    channels. Comments, [net] training options and head options do not change it."""
    parts = [f"input {graph.input_shape}"]
    for layer in graph:
        extra = " ".join(f"{layer.attrs[key]}" for key in layer_type(layer).fingerprint)
        sources = ",".join(f"{s.layer}:{s.start}:{s.stop}" for s in layer.sources)
        parts.append(f"{layer.index} {layer.type} [{sources}] {layer.in_shape} {layer.out_shape} {extra}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass
class Masks:
    """Pruned channels per group: {group id: sorted group-channel indices}, for the model with `fingerprint`."""
    pruned: dict[int, np.ndarray]
    fingerprint: str
    groups_info: dict[int, dict] = field(default_factory=dict)    # id -> {"members": [...], "channels": n}
    grouping: Grouping | None = field(default=None, repr=False, compare=False)   # the groups the ids refer to

    @classmethod
    def for_model(cls, model: Model, pruned: dict, exclude=(), grouping: Grouping | None = None) -> "Masks":
        grouping = _grouping_of(model, grouping)
        clean = validate(grouping, pruned, exclude)
        info = {g: {"members": grouping.groups[g].members, "channels": grouping.groups[g].channels} for g in clean}
        return cls(clean, structure_fingerprint(model.graph), info, grouping)

    @property
    def total_pruned(self) -> int:
        return int(sum(len(v) for v in self.pruned.values()))

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
            "groups": [{"id": int(g), "members": [int(m) for m in self.groups_info.get(g, {}).get("members", [])],
                        "channels": int(self.groups_info.get(g, {}).get("channels", 0)),
                        "pruned": [int(c) for c in ch]}
                       for g, ch in sorted(self.pruned.items())],
        }

    @classmethod
    def from_json(cls, data: dict, model: Model | None = None, source: str = "masks") -> "Masks":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DarkpruneError(f"{source}: not a darkprune masks file")
        if data.get("version") != VERSION:
            raise DarkpruneError(f"{source}: masks format version {data.get('version')}, this darkprune reads "
                                 f"version {VERSION}")
        try:
            pruned = {int(g["id"]): np.asarray(sorted(int(c) for c in g["pruned"]), dtype=np.int64)
                      for g in data["groups"]}
            info = {int(g["id"]): {"members": [int(m) for m in g.get("members", [])],
                                   "channels": int(g.get("channels", 0))} for g in data["groups"]}
            fingerprint = str(data["fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DarkpruneError(f"{source}: malformed masks file ({exc})") from None
        masks = cls(pruned, fingerprint, info)
        if model is not None:
            masks.check(model, source)
        return masks

    def check(self, model: Model, source: str = "masks", grouping: Grouping | None = None) -> None:
        """Refuse masks made for another model (a different structure, or groups that do not match). The masks
        then keep the model's grouping (what apply_masks and transform use)."""
        mine = structure_fingerprint(model.graph)
        if mine != self.fingerprint:
            raise DarkpruneError(f"{source}: these masks were made for another model (structure {self.fingerprint}, "
                                 f"{model.cfg_path or 'this model'} is {mine})")
        if grouping is None and self.grouping is not None and self.grouping.graph is model.graph:
            grouping = self.grouping
        grouping = _grouping_of(model, grouping)
        for g, info in self.groups_info.items():
            if g >= len(grouping.groups) or (info.get("members") and
                                              (grouping.groups[g].members != info["members"] or
                                               grouping.groups[g].channels != info["channels"])):
                raise DarkpruneError(f"{source}: group {g} does not match this model's channel groups "
                                     f"(made by another darkprune version?)")
        validate(grouping, self.pruned, (), source)
        self.grouping = grouping

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None) -> "Masks":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DarkpruneError(f"{path}: no such masks file") from None
        except (OSError, ValueError) as exc:
            raise DarkpruneError(f"{path}: cannot read masks: {exc}") from None
        return cls.from_json(data, model, str(path))


def validate(grouping: Grouping, pruned: dict, exclude=(), source: str = "masks") -> dict[int, np.ndarray]:
    """Check {group id: channel indices} against the groups: known and prunable groups, channels in range, at least
    one channel kept. Returns sorted unique int64 arrays, empty entries dropped."""
    groups = grouping.excluding(exclude).groups
    clean = {}
    for gid, channels in pruned.items():
        gid = int(gid)
        if not 0 <= gid < len(groups):
            raise DarkpruneError(f"{source}: no channel group {gid} (the model has groups 0..{len(groups) - 1})")
        group = groups[gid]
        ch = np.unique(np.asarray(channels, dtype=np.int64).ravel())
        if not len(ch):
            continue
        if not group.prunable:
            raise DarkpruneError(f"{source}: group {gid} cannot be pruned: {group.reason}")
        if ch[0] < 0 or ch[-1] >= group.channels:
            bad = int(ch[0]) if ch[0] < 0 else int(ch[-1])
            raise DarkpruneError(f"{source}: group {gid} has channels 0..{group.channels - 1}, got {bad}")
        if len(ch) >= group.channels:
            raise DarkpruneError(f"{source}: pruning all {group.channels} channels of group {gid} "
                                 f"({', '.join(f'layer {m}' for m in group.members)}) would empty it")
        clean[gid] = ch
    return clean


def _grouping_of(model: Model, grouping: Grouping | None) -> Grouping:
    if grouping is None:
        return build_grouping(model.graph)
    if grouping.graph is not model.graph:
        raise DarkpruneError(f"the channel grouping given is for another graph than {model.cfg_path or 'the model'}'s")
    return grouping


def _as_masks(model: Model, masks, grouping: Grouping | None = None) -> Masks:
    if masks is None:
        masks = getattr(model, "masks", None)
        if masks is None:
            raise DarkpruneError("no masks given, and the model carries none (use apply_masks first)")
    if isinstance(masks, Masks):
        masks.check(model, grouping=grouping)
        return masks
    return Masks.for_model(model, masks, grouping=grouping)


class KeptChannels:
    """Which output channels of every layer survive the masks (`out[i]`, boolean per channel; `out[-1]` is the
    network input), and which channels each layer reads (`reads(layer)`)."""

    def __init__(self, grouping: Grouping, pruned: dict[int, np.ndarray]):
        self.grouping = grouping
        space = grouping.space
        alive = np.ones(space.total, dtype=bool)
        for gid, channels in pruned.items():
            alive[grouping.groups[gid].global_ids[channels].ravel()] = False
        self.alive = alive
        self.out = {index: alive[ids] for index, ids in space.ids.items()}

    def reads(self, index: int) -> np.ndarray:
        layer = self.grouping.graph[index]
        return self.alive[self.grouping.space.input_ids(layer)]


def kept_channels(model: Model, masks, grouping: Grouping | None = None) -> KeptChannels:
    masks = _as_masks(model, masks, grouping)
    return KeptChannels(masks.grouping, masks.pruned)


def input_columns(layer, channels: np.ndarray, flat: bool) -> np.ndarray:
    """The parameter columns that input `channels` of `layer` occupy: the channels themselves, or for a layer
    reading its input flattened (connected), each channel's H*W columns c*H*W..(c+1)*H*W-1."""
    if not flat:
        return channels
    _, h, w = layer.in_shape
    return (channels[:, None] * (h * w) + np.arange(h * w)[None, :]).ravel()


def apply_masks(model: Model, masks, exclude=(), grouping: Grouping | None = None) -> Model:
    """A copy of `model` in which the masked channels output exactly zero (shapes unchanged). `masks` is a Masks or
    {group id: channel indices}. The copy carries the Masks as `.masks` (what `transform` uses by default). Each
    layer's arrays are cleared along the axes its layer-type entry's slicing names."""
    if isinstance(masks, Masks):
        masks.check(model, grouping=grouping)
        if exclude:
            validate(masks.grouping, masks.pruned, exclude)
    else:
        masks = Masks.for_model(model, masks, exclude, grouping)
    kept = KeptChannels(masks.grouping, masks.pruned)
    out = model.copy()
    for layer in model.graph:
        params = out.params.get(layer.index)
        if not params:
            continue
        rule = layer_type(layer).slicing(layer)
        dead_out = np.flatnonzero(~kept.out[layer.index])
        if len(dead_out):
            for name, axis in rule.out_axes.items():
                _clear(params[name], axis, dead_out, NEUTRAL.get(name, 0.0))
        dead_in = np.flatnonzero(~kept.reads(layer.index)) if rule.in_axes else ()
        if len(dead_in):
            columns = input_columns(layer, dead_in, rule.flat_inputs)
            for name, axis in rule.in_axes.items():
                _clear(params[name], axis, columns, 0.0)
    out.masks = masks
    return out


def masked_group_arrays(model: Model, group, channels, grouping: Grouping) -> dict[int, dict[str, np.ndarray]]:
    """The arrays of the layers that masking `channels` of `group` alone changes (its members and the layers reading
    the channels), exactly as apply_masks changes them; only those layers are copied."""
    sub = Model(model.cfg, model.graph, {i: model.params[i] for i in group.affected_layers() if i in model.params},
                model.header)
    return apply_masks(sub, group.masks(channels), grouping=grouping).params


def _clear(array: np.ndarray, axis: int, index: np.ndarray, value: float) -> None:
    view = np.moveaxis(array, axis, 0)
    view[index] = value


# ---------------------------------------------------------------------------------------------------------------
def live_stats(model: Model, masks, grouping: Grouping | None = None) -> dict:
    """Params and BFLOPs counting only live channels, by Darknet's rules, per layer and in total (what the
    transformed model's layer table will print).

    Returns {"layers": [{"index", "name", "type", "out_channels", "out_channels_before", "params", "params_before",
    "bflops", "bflops_before"}], "total_params", "total_params_before", "total_bflops", "total_bflops_before"}."""
    kept = kept_channels(model, masks, grouping)
    rows = []
    for layer in model.graph:
        params, bflops = _live_layer_cost(layer, kept)
        rows.append({
            "index": layer.index, "name": layer.name, "type": layer.type,
            "out_channels": int(kept.out[layer.index].sum()), "out_channels_before": int(layer.out_shape[0]),
            "params": int(params), "params_before": int(layer.params),
            "bflops": float(bflops), "bflops_before": float(layer.bflops),
        })
    return {
        "layers": rows,
        "total_params": int(sum(r["params"] for r in rows)),
        "total_params_before": int(sum(r["params_before"] for r in rows)),
        "total_bflops": float(sum(r["bflops"] for r in rows)),
        "total_bflops_before": float(sum(r["bflops_before"] for r in rows)),
    }


def _live_layer_cost(layer, kept: KeptChannels) -> tuple[int, float]:
    """The layer's params and BFLOPs by its shape rule's cost, with the live channels it reads and outputs."""
    entry = layer_type(layer)
    if entry.cost is None:
        return layer.params, layer.bflops
    c_in = int(kept.reads(layer.index).sum()) if layer.sources else 0
    return entry.live_cost(layer, c_in, int(kept.out[layer.index].sum()))


__all__ = ["Masks", "apply_masks", "live_stats", "kept_channels", "KeptChannels", "structure_fingerprint", "validate"]
