"""Physically remove masked channels: a smaller cfg and weights whose outputs equal the masked model's.

The cfg only changes where a layer states its own channel count: a convolutional layer's `filters=` (and `groups=`
for a grouped conv, which keeps its whole blocks), a connected layer's `output=`. Everything else follows by itself:
routes, shortcuts, upsample, maxpool and heads name layers, not channels, and a connected layer's input size is the
flattened size of what it reads. The arrays are sliced to match: a member's filters, biases and batch-norm rows, every
consumer's input columns (a conv's `weights[:, kept]`, a connected layer's flattened columns c*H*W..(c+1)*H*W-1 of
each kept channel c), a standalone [batchnorm]'s entries and a per-channel shortcut's weights.

Because a pruned channel is exactly zero in the masked model (see masks.py), dropping it and every weight that reads
it changes no output.
"""
from __future__ import annotations

import numpy as np

from ..darknet.graph import build_graph
from ..darknet.layer_types import layer_type
from ..darknet.model import Model
from ..darknet.weights import WeightsHeader, layer_arrays
from ..errors import DarkpruneError
from .groups import Grouping
from .masks import KeptChannels, _as_masks, input_columns


def pruned_cfg(model: Model, kept: KeptChannels):
    """A copy of the model's cfg with the live channel counts written in: the key each layer type states its
    output channel count with (its entry's `count_key`), and a grouped layer's group count (whole blocks kept)."""
    cfg = model.cfg.copy()
    for layer, section in zip(model.graph, cfg.layers):
        entry = layer_type(layer)
        if entry.count_key is None:
            continue
        n_out = int(kept.out[layer.index].sum())
        if n_out != layer.attrs[entry.count_key]:
            section.set(entry.count_key, n_out)
        blocks = entry.blocks(layer)
        if blocks > 1:
            c_in = int(kept.reads(layer.index).sum())
            new_blocks = c_in // (layer.in_shape[0] // blocks)
            if new_blocks != blocks:
                section.set("groups", new_blocks)
    return cfg


def transform(model: Model, masks=None, grouping: Grouping | None = None) -> Model:
    """The smaller model: masked channels removed from the cfg and the weights. `masks` is a Masks, a {group id:
    channel indices} dict, or None for the masks that `apply_masks` attached to `model`. When `model` was not masked
    first, the result equals apply_masks(model, masks) transformed (the removed weights are simply dropped).
    `grouping`: the model's channel grouping, when the caller has it (else the masks' own, or a new one)."""
    masks = _as_masks(model, masks, grouping)
    graph = model.graph
    kept = KeptChannels(masks.grouping, masks.pruned)
    cfg = pruned_cfg(model, kept)
    layout = next((l.attrs["layout"] for l in graph if l.type == "batchnorm"), "alexeyab")
    new_graph = build_graph(cfg, layout)

    params = {}
    for layer in graph:
        arrays = model.params.get(layer.index)
        if arrays is None:
            continue
        params[layer.index] = {name: np.ascontiguousarray(value, dtype=np.float32)
                               for name, value in _sliced_arrays(layer, arrays, kept).items()}

    _check_shapes(model, new_graph, kept, params)
    header = WeightsHeader(model.header.major, model.header.minor, model.header.revision, model.header.seen)
    return Model(cfg, new_graph, params, header)


def _sliced_arrays(layer, arrays: dict, kept: KeptChannels) -> dict:
    """The layer's arrays keeping only live channels, along the axes its layer-type entry's slicing names."""
    rule = layer_type(layer).slicing(layer)
    out_keep = np.flatnonzero(kept.out[layer.index])
    in_keep = None
    if rule.in_axes:
        in_keep = input_columns(layer, np.flatnonzero(kept.reads(layer.index)), rule.flat_inputs)
    new = {}
    for name, value in arrays.items():
        if name in rule.out_axes:
            value = np.take(value, out_keep, axis=rule.out_axes[name])
        if name in rule.in_axes:
            value = np.take(value, in_keep, axis=rule.in_axes[name])
        new[name] = value if value is not arrays[name] else value.copy()
    return new


def _check_shapes(model: Model, new_graph, kept: KeptChannels, params: dict) -> None:
    for old, new in zip(model.graph, new_graph):
        expected = int(kept.out[old.index].sum())
        if new.out_shape[0] != expected or new.out_shape[1:] != old.out_shape[1:]:
            raise DarkpruneError(f"{old.where()}: after pruning it outputs {new.out_shape}, expected {expected} "
                                 f"channels of {old.out_shape[1:]} (internal error in transform)")
        for name, shape in layer_arrays(new):
            got = params[new.index][name].shape
            if got != shape:
                raise DarkpruneError(f"{old.where()}: pruned '{name}' has shape {got}, the new cfg needs {shape} "
                                     f"(internal error in transform)")


__all__ = ["transform", "pruned_cfg"]
