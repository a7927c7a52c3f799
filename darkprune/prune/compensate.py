"""Bias compensation: fold the constant a pruned channel used to carry into the layers that read it.

A masked model's pruned channel outputs exactly 0 (masks.py). In the unpruned model it carried act(BN(conv(x))),
whose mean over the data is close to a constant: act(beta) for a conv (or connected layer) with batch norm (beta, the
batch-norm shift `biases`, is the mean of the normalised output over the data Darknet measured its statistics on),
act(bias) without batch norm. Losing that constant shifts every layer reading the channel. Compensation gives it back
without computing the channel: a consumer (a conv, or a connected layer) computes sum_c W[o, c] * x_c, so a constant
x_c = k adds sum over W[o, c]'s kernel of W * k to output o: we add that to o's bias, or, when the consumer has batch
norm, subtract it from rolling_mean[o] (BN(x + d) with mean m is BN(x) with mean m - d).

The constant is followed from its producer through the layers between it and its consumers, by each type's arithmetic
on a constant (`_CONSTANT_RULES`): route (also a groups/group_id slice), maxpool (the max of a constant is the
constant: Darknet pads max-pooling with -inf), avgpool and local_avgpool (which divides by its in-image cells),
dropout (the identity at inference), upsample (times its `scale`; a summing downsample also times stride^2), a
shortcut (the tied operands' constants add, each times its effective per-feature or per-channel weight, then the
shortcut's activation), [activation], a standalone [batchnorm] (its affine map), and the products of [scale_channels]
and [sam]. Any other layer stops the constant (its consumers are left as masking left them, which is still exact).
A depthwise or grouped consumer of a pruned channel is tied into the channel's group (its output channel is pruned
too), so what flows on from it is its own constant, act(its beta), like any producer's.

The reference the compensated model reproduces is the unpruned model in which each pruned filter is zeroed (and, with
batch norm, its rolling_mean set to 0), so that the channel outputs its constant everywhere. The fold is exact for
1x1 consumers, connected layers and unpadded convs; a k x k consumer with zero padding reads 0, not the constant,
outside the image, so on its border pixels the full-kernel fold over-compensates by the kernel taps that fall in the
padding (scripts/compensation_effect.py measures it). Pruned channels still output what masking made them (0; an SE
block's logistic scale 0.5, multiplied by a zero) and only live outputs of consumers change, so `transform` of a
compensated masked model keeps its outputs exactly.
"""
from __future__ import annotations

import numpy as np

from ..darknet.layer_types import PRODUCER, role
from ..darknet.model import Model
from ..engine.activations import activate_array
from ..engine.network import DARKNET_BN_EPS
from ..engine.shortcut import normalize_weights
from .groups import INPUT, Grouping
from .masks import KeptChannels, _as_masks

def _activated(values: np.ndarray, activation: str | None) -> np.ndarray:
    """act(values) where values are constants (finite); NaN (not constant) stays NaN."""
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.any():
        out[finite] = activate_array(values[finite].astype(np.float64), activation or "linear")
    return out


def _producer_constants(layer, arrays: dict, dead: np.ndarray) -> np.ndarray:
    """A producer's pruned channels: act(beta) with batch norm (beta is stored as `biases`), act(bias) without."""
    out = np.full(layer.out_shape[0], np.nan)
    if not len(dead):
        return out
    out[dead] = np.asarray(arrays["biases"], np.float64)[dead]
    return _activated(out, layer.attrs.get("activation"))


def _shortcut_constants(layer, arrays: dict, ins: list[np.ndarray]) -> np.ndarray:
    a = layer.attrs
    c = layer.out_shape[0]
    if any(len(v) != c for v in ins):      # operands of other widths add over a prefix: never pruned, not followed
        return np.full(c, np.nan)
    if a["nweights"]:
        w = normalize_weights(np.asarray(arrays["weights"], np.float64), a["weights_normalization"])
        per = [w[k] if a["weights_type"] == "per_channel" else np.full(c, w[k]) for k in range(len(ins))]
    else:
        per = [np.ones(c)] * len(ins)
    total = sum(p * v for p, v in zip(per, ins))
    return _activated(total, a["activation"])


def _batchnorm_constants(layer, arrays: dict, ins: list[np.ndarray]) -> np.ndarray:
    p = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    shift = p.get("biases", np.zeros_like(p["scales"]))
    return p["scales"] * (ins[0] - p["rolling_mean"]) / np.sqrt(p["rolling_variance"] + DARKNET_BN_EPS) + shift


def _upsample_constants(layer, arrays: dict, ins: list[np.ndarray]) -> np.ndarray:
    stride, scale = layer.attrs["stride"], layer.attrs["scale"]
    return ins[0] * scale * (stride * stride if stride < 0 else 1)


def _product_constants(layer, arrays: dict, ins: list[np.ndarray]) -> np.ndarray:
    if layer.attrs.get("scale_wh") or len(ins) != 2 or len(ins[0]) != len(ins[1]):
        return np.full(layer.out_shape[0], np.nan)
    return _activated(ins[0] * ins[1], layer.attrs.get("activation"))


def _first(layer, arrays: dict, ins: list[np.ndarray]) -> np.ndarray:
    return ins[0]


def _concatenated(layer, arrays: dict, ins: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(ins)      # a route: its sources are already the slices it reads


# What each pass-through type outputs when its inputs are constants (NaN: not constant), by Darknet's arithmetic.
_CONSTANT_RULES = {
    "route": _concatenated, "maxpool": _first, "local_avgpool": _first, "avgpool": _first, "dropout": _first,
    "empty": _first, "upsample": _upsample_constants, "shortcut": _shortcut_constants,
    "activation": lambda layer, arrays, ins: _activated(ins[0], layer.attrs["activation"]),
    "batchnorm": _batchnorm_constants, "scale_channels": _product_constants, "sam": _product_constants,
}


def pruned_constants(model: Model, kept: KeptChannels) -> dict[int, np.ndarray]:
    """For every layer, the value each output channel holds everywhere in the reference model (the unpruned
    `model` with the pruned filters zeroed), float64, NaN where the channel is not a constant."""
    graph = model.graph
    constants = {INPUT: np.full(graph.input_shape[0], np.nan)}
    for layer in graph:
        arrays = model.params.get(layer.index, {})
        ins = [constants[s.layer][s.start:s.stop] for s in layer.sources]
        rule = _CONSTANT_RULES.get(layer.type)
        if role(layer) == PRODUCER:
            out = _producer_constants(layer, arrays, np.flatnonzero(~kept.out[layer.index]))
        elif rule is not None and ins and any(np.isfinite(v).any() for v in ins):
            out = np.asarray(rule(layer, arrays, ins), np.float64)
        else:
            out = np.full(layer.out_shape[0], np.nan)
        if len(out) != layer.out_shape[0]:       # a pass layer reading a prefix or reshaping: not followed
            out = np.full(layer.out_shape[0], np.nan)
        constants[layer.index] = out
    return constants


def consumer_shift(layer, weights: np.ndarray, constants_in: np.ndarray) -> np.ndarray:
    """What constant inputs add to each output of a conv or connected layer: sum over the kernel (a connected
    layer: over the channel's H*W flattened columns) of W[o, c] * constant_c, over the constant inputs c that o's
    group reads. float64, one value per output."""
    w = np.asarray(weights, np.float64)
    k = np.where(np.isfinite(constants_in), constants_in, 0.0)
    if w.ndim == 2:                                  # connected: input channel c covers columns c*H*W..(c+1)*H*W-1
        c = len(k)
        return w.reshape(w.shape[0], c, -1).sum(axis=2) @ k
    groups = layer.attrs["groups"]
    n, per_group = w.shape[0], w.shape[1]
    taps = w.sum(axis=(2, 3)).reshape(groups, n // groups, per_group)
    return np.einsum("gnj,gj->gn", taps, k.reshape(groups, per_group)).reshape(n)


def compensate(original: Model, masked: Model, masks=None, grouping: Grouping | None = None) -> Model:
    """A copy of `masked` (apply_masks(original, masks)) whose consumers of pruned channels have the channels'
    constants folded into their biases, or into their batch-norm rolling_mean. `masks`: a Masks or {group id:
    channels} (default: the masked model's own). Pruned channels still output exactly 0; the copy carries the
    masks as `.masks`, so transform(result) removes them with no change in outputs. The readers' weights are taken
    from `original` (masking cleared the columns that read pruned channels); apply it once per masked model."""
    masks = _as_masks(original, masks if masks is not None else getattr(masked, "masks", None), grouping)
    kept = KeptChannels(masks.grouping, masks.pruned)
    constants = pruned_constants(original, kept)
    out = masked.copy()
    out.masks = masks
    for layer in original.graph:
        arrays = original.params.get(layer.index)
        if role(layer) != PRODUCER or not arrays or "weights" not in arrays or not layer.sources:
            continue
        constants_in = np.concatenate([constants[s.layer][s.start:s.stop] for s in layer.sources])
        if not np.isfinite(constants_in).any():
            continue
        shift = consumer_shift(layer, arrays["weights"], constants_in)
        live = kept.out[layer.index]
        params = out.params[layer.index]
        if "rolling_mean" in params:
            params["rolling_mean"][live] = (params["rolling_mean"].astype(np.float64) - shift)[live]
        else:
            params["biases"][live] = (params["biases"].astype(np.float64) + shift)[live]
    return out


__all__ = ["compensate", "pruned_constants", "consumer_shift"]
