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
from ..darknet.model import Model
from ..darknet.weights import WeightsHeader
from ..errors import DarkpruneError
from .masks import KeptChannels, _as_masks
from .groups import grouping_for


def pruned_cfg(model: Model, kept: KeptChannels):
    """A copy of the model's cfg with the live channel counts written in."""
    cfg = model.cfg.copy()
    for layer, section in zip(model.graph, cfg.layers):
        n_out = int(kept.out[layer.index].sum())
        if layer.type == "convolutional":
            if n_out != layer.attrs["filters"]:
                section.set("filters", n_out)
            groups = layer.attrs["groups"]
            if groups > 1:
                c_in = int(kept.reads(layer.index).sum())
                new_groups = c_in // (layer.in_shape[0] // groups)
                if new_groups != groups:
                    section.set("groups", new_groups)
        elif layer.type == "connected" and n_out != layer.attrs["output"]:
            section.set("output", n_out)
    return cfg


def transform(model: Model, masks=None) -> Model:
    """The smaller model: masked channels removed from the cfg and the weights. `masks` is a Masks, a {group id:
    channel indices} dict, or None for the masks that `apply_masks` attached to `model`. When `model` was not masked
    first, the result equals apply_masks(model, masks) transformed (the removed weights are simply dropped)."""
    masks = _as_masks(model, masks)
    graph = model.graph
    kept = KeptChannels(grouping_for(graph), masks.pruned)
    cfg = pruned_cfg(model, kept)
    layout = next((l.attrs["layout"] for l in graph if l.type == "batchnorm"), "alexeyab")
    new_graph = build_graph(cfg, layout)

    params = {}
    for layer in graph:
        arrays = model.params.get(layer.index)
        if arrays is None:
            continue
        out_keep = np.flatnonzero(kept.out[layer.index])
        t = layer.type
        if t == "convolutional":
            w = arrays["weights"][out_keep]
            if layer.attrs["groups"] == 1:
                w = w[:, np.flatnonzero(kept.reads(layer.index))]
            new = {k: v[out_keep] for k, v in arrays.items() if k != "weights"}
            new["weights"] = w
        elif t == "connected":
            c, h, w_ = layer.in_shape
            live_in = np.flatnonzero(kept.reads(layer.index))
            cols = (live_in[:, None] * (h * w_) + np.arange(h * w_)[None, :]).ravel()
            new = {k: v[out_keep] for k, v in arrays.items() if k != "weights"}
            new["weights"] = arrays["weights"][out_keep][:, cols]
        elif t == "batchnorm":
            new = {k: v[out_keep] for k, v in arrays.items()}
        elif t == "shortcut" and layer.attrs["weights_type"] == "per_channel":
            new = {"weights": arrays["weights"][:, out_keep]}
        else:
            new = {k: v.copy() for k, v in arrays.items()}
        params[layer.index] = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in new.items()}

    _check_shapes(model, new_graph, kept, params)
    header = WeightsHeader(model.header.major, model.header.minor, model.header.revision, model.header.seen)
    return Model(cfg, new_graph, params, header)


def _check_shapes(model: Model, new_graph, kept: KeptChannels, params: dict) -> None:
    from ..darknet.weights import layer_arrays
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
