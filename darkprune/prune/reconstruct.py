"""Reconstruction without labels: refit the layers reading pruned channels so that their outputs match the unpruned
model's (the least-squares step of He, Zhang and Sun 2017 and of ThiNet).

A consumer (a conv or connected layer whose input has pruned channels) computes, per output o, the pre-activation
y_o = W_o . p + b_o on each input patch p (a 1x1 conv: the pixel's channels; a k x k conv: its im2col patch, zero
padding included; a connected layer: the whole flattened input). Masking removes the columns of W_o that read pruned
channels, and what is left no longer adds up to the unpruned output. We refit W_o (over the kept columns only) and
b_o by ridge-regularised least squares on calibration images:

    min  sum over patches (W'_o . p_pruned + b'_o - y_o(p_original))^2 + lambda |W'_o|^2

where p_pruned is the patch in the network pruned (and refitted) so far and y_o(p_original) the unpruned model's
pre-activation at the same place: consumers are refitted in network order, each one's inputs taken from the network
with every earlier consumer already refitted (sequential reconstruction, as ThiNet and He et al. do), its targets
from the unpruned network. The normal equations only need the Gram matrices G = P_p^T P_p and C = P_p^T P_o (one
column more for the bias), accumulated over batches of images in float64 at a deterministic sample of output
positions (`samples` per image); then W' = (G_kk + lambda I)^-1 C_k: W_orig^T over the kept columns k, lambda =
`ridge` times the mean diagonal of G_kk (the bias is not regularised). Depthwise and grouped convs are solved per
group (a group is k*k*C/groups columns).

Batch norm: a consumer with batch norm computes BN(z), z = W . p its raw conv output. Least squares decouples per
output and BN is an affine map per output, so we fit z's target W_orig . p_original, and keep the batch norm, its
`rolling_mean` reduced by the fitted bias (BN(z + b) with mean m is BN(z) with mean m - b). Without batch norm the
fitted bias is the new `biases`.

Pruned channels stay exactly 0: a consumer's pruned outputs (a tied depthwise conv, a consumer that is itself
pruned) are left as masking left them, and only kept input columns get nonzero weights, so `transform` removes the
channels with no change in outputs. The fitted bias subsumes bias compensation (compensate.py) for every refitted
layer, and is exact on the border pixels of a padded conv too, where the compensation fold is not.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..darknet.layer_types import PRODUCER, role
from ..darknet.model import Model
from ..engine.network import Network
from ..errors import DarkpruneError
from .groups import Grouping
from .masks import KeptChannels, _as_masks, structure_fingerprint

SAMPLES = 256            # output positions sampled per image and consumer (all of them in smaller maps)
MAX_COLUMNS = 4096       # a consumer wider than this per group (a big connected layer) is left to compensation
BATCH = 16               # images per forward step
ROWS_PER_COLUMN = 4      # positions per image and fitted column (see sample_positions)
MIN_SAMPLES = 32


@dataclass
class Geometry:
    """How a consumer reads its input: `groups` blocks of `columns` patch entries each (plus a bias column)."""
    index: int
    groups: int
    columns: int          # per group: C/groups * k * k (a connected layer: C * H * W)
    per_channel: int      # columns per input channel: k*k (a connected layer: H*W)
    outputs: int
    batch_norm: bool


def geometry(layer) -> Geometry:
    a = layer.attrs
    c, h, w = layer.in_shape
    if layer.type == "connected":
        return Geometry(layer.index, 1, c * h * w, h * w, layer.out_shape[0], bool(a["batch_normalize"]))
    k = a["size"]
    return Geometry(layer.index, a["groups"], c // a["groups"] * k * k, k * k, a["filters"],
                    bool(a["batch_normalize"]))


def sample_positions(layer, rng: np.random.Generator, samples: int) -> np.ndarray | None:
    """Flat output positions to take patches at (None: all of them): at most `samples` per image, and no more than
    ROWS_PER_COLUMN per fitted column (a depthwise conv fits 10 numbers per group: 40 positions of every image
    are plenty, and its many small Grams are what costs)."""
    if layer.type == "connected":
        return None
    _, oh, ow = layer.out_shape
    if samples > 0:
        samples = min(samples, max(MIN_SAMPLES, ROWS_PER_COLUMN * (geometry(layer).columns + 1)))
    if samples <= 0 or oh * ow <= samples:
        return None
    return np.sort(rng.choice(oh * ow, samples, replace=False))


def patches(layer, x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """The consumer's input patches at `positions` of every image, as columns: (images, groups, columns, positions)
    float64, columns in the weights' layout (channel, ky, kx); taps in the zero padding (or past the input, where
    Darknet's output size reads beyond it) are 0. A connected layer has one patch per image: (1, 1, inputs,
    images). The bias column is left to `gram`."""
    geo = geometry(layer)
    n = x.shape[0]
    if layer.type == "connected":
        return np.asarray(x.reshape(n, -1).T, np.float64)[None, None]
    a = layer.attrs
    k, sy, sx, dil = a["size"], a["stride_y"], a["stride_x"], a["dilation"]
    pad = a["pad"] * dil
    _, oh, ow = layer.out_shape
    pos = np.arange(oh * ow) if positions is None else positions
    oy, ox = pos // ow, pos % ow
    _, c, h, w = x.shape
    need_h, need_w = (oh - 1) * sy + (k - 1) * dil + 1, (ow - 1) * sx + (k - 1) * dil + 1
    bottom, right = max(0, need_h - h - pad), max(0, need_w - w - pad)
    if pad or bottom or right:
        x = np.pad(x, ((0, 0), (0, 0), (pad, bottom), (pad, right)))
    width = x.shape[3]
    taps = np.arange(k) * dil
    # flat input offsets ordered (ky, kx, position): the gathered block is then (channel, ky, kx) x position
    flat = (taps[:, None, None] + (oy * sy)[None, None, :]) * width + taps[None, :, None] + (ox * sx)[None, None, :]
    gathered = np.take(x.reshape(n, c, -1), flat.ravel(), axis=2)          # (n, C, k * k * S)
    return gathered.reshape(n, geo.groups, geo.columns, len(pos)).astype(np.float64)


def gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a; 1] [b; 1]^T per group summed over images (the bias entry last): (m, G, Da, S), (m, G, Db, S) ->
    (G, Da + 1, Db + 1)."""
    m, groups, da, positions = a.shape
    out = np.empty((groups, da + 1, b.shape[2] + 1))
    out[:, :-1, :-1] = np.matmul(a, b.transpose(0, 1, 3, 2)).sum(axis=0)
    out[:, :-1, -1] = a.sum(axis=3).sum(axis=0)
    out[:, -1, :-1] = b.sum(axis=3).sum(axis=0)
    out[:, -1, -1] = m * positions
    return out


def original_rows(layer, arrays: dict) -> np.ndarray:
    """(outputs, columns + 1): the unpruned layer's weights and bias as one row per output; the bias column is 0
    with batch norm (the fit targets the raw conv output there)."""
    geo = geometry(layer)
    w = np.asarray(arrays["weights"], np.float64).reshape(geo.outputs, geo.columns)
    bias = np.zeros(geo.outputs) if geo.batch_norm else np.asarray(arrays["biases"], np.float64)
    return np.concatenate([w, bias[:, None]], axis=1)


def solve(geo: Geometry, g_pp: np.ndarray, cross: np.ndarray, rows: np.ndarray, kept_in: np.ndarray,
          live_out: np.ndarray, ridge: float, changed_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The refitted (weights (outputs, columns), bias (outputs,)) of the live outputs, and which outputs were refit.
    `g_pp` (G, D+1, D+1) = P_p^T P_p, `cross` (G, D+1, D+1) = P_p^T P_o, `rows` the original rows, `kept_in` the
    live input channels, `live_out` the live outputs. `changed_only`: leave the groups that lost no input column
    (their inputs are the unpruned ones in a single-group analysis: the fit would only shrink them by the ridge)."""
    per_group = geo.outputs // geo.groups
    channels = len(kept_in) // geo.groups
    weights = np.zeros((geo.outputs, geo.columns))
    bias = np.zeros(geo.outputs)
    refit = np.zeros(geo.outputs, bool)
    for g in range(geo.groups):
        outs = np.arange(g * per_group, (g + 1) * per_group)
        live = outs[live_out[outs]]
        if not len(live):
            continue
        cols = np.flatnonzero(np.append(np.repeat(kept_in[g * channels:(g + 1) * channels], geo.per_channel), True))
        if changed_only and len(cols) == geo.columns + 1:
            continue
        a = g_pp[g][np.ix_(cols, cols)].copy()
        inner = np.arange(len(cols) - 1)
        scale = float(np.mean(np.diag(a)[:-1])) if len(inner) else 0.0
        a[inner, inner] += ridge * scale if scale > 0 else 1e-12
        rhs = cross[g][cols] @ rows[live].T                     # (kept columns + 1, live outputs)
        try:
            sol = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        weights[np.ix_(live, cols[:-1])] = sol[:-1].T
        bias[live] = sol[-1]
        refit[live] = True
    return weights, bias, refit


def refitted_arrays(layer, original: dict, current: dict, weights: np.ndarray, bias: np.ndarray,
                    refit: np.ndarray) -> dict:
    """A copy of the consumer's `current` arrays with the refit outputs' weights and bias (or batch-norm mean)."""
    out = {k: v.copy() for k, v in current.items()}
    shape = out["weights"].shape
    w = out["weights"].reshape(len(refit), -1)
    w[refit] = weights[refit].astype(w.dtype)
    out["weights"] = w.reshape(shape)
    if "rolling_mean" in out:
        mean = np.asarray(original["rolling_mean"], np.float64)
        out["rolling_mean"][refit] = (mean - bias)[refit].astype(out["rolling_mean"].dtype)
    else:
        out["biases"][refit] = bias[refit].astype(out["biases"].dtype)
    return out


def fit_layers(model: Model, kept: KeptChannels, layers: str = "readers") -> list[int]:
    """The layers reconstruction refits, in network order: every conv/connected layer with its own weights that
    reads a pruned channel (`layers="all"`: also every such layer after the first of them, whose inputs the
    pruning changes too). A layer wider than MAX_COLUMNS per group is left out, with a warning."""
    if layers not in ("readers", "all"):
        raise DarkpruneError(f"reconstruct layers={layers!r}: expected 'readers' or 'all'")
    out, started = [], False
    for layer in model.graph:
        arrays = model.params.get(layer.index)
        if role(layer) != PRODUCER or not arrays or "weights" not in arrays or not layer.sources:
            continue
        reads_pruned = not kept.reads(layer.index).all()
        started = started or reads_pruned
        if not (reads_pruned or (layers == "all" and started)):
            continue
        if geometry(layer).columns > MAX_COLUMNS:
            warnings.warn(f"{layer.where()}: {geometry(layer).columns} input columns per group is too wide to "
                          f"reconstruct (at most {MAX_COLUMNS}); left as masking (and compensation) made it")
            continue
        out.append(layer.index)
    return out


class _Stream:
    """The outputs, on every calibration image, of the layers later layers still read, in the unpruned network and
    in the network reconstructed so far (lists of per-batch arrays), moved forward layer by layer: each image runs
    once through each network. A layer whose inputs and parameters are the same in both keeps one output for both
    (the shared prefix)."""

    def __init__(self, original: Network, current: Network, x: np.ndarray, batch: int):
        self.original, self.current = original, current
        batches = [x[lo:lo + batch] for lo in range(0, len(x), batch)]
        self.acts = {"o": {-1: batches}, "p": {-1: batches}}
        self.shared = {-1}

    def same_params(self, index: int) -> bool:
        a = self.original.model.params.get(index, {})
        b = self.current.model.params.get(index, {})
        return a.keys() == b.keys() and all(a[k] is b[k] or np.array_equal(a[k], b[k]) for k in a)

    def run(self, layer) -> None:
        i = layer.index
        shared = all(j in self.shared for j in layer.inputs) and self.same_params(i)
        self.acts["o"][i] = self._forward(self.original, self.acts["o"], layer)
        self.acts["p"][i] = self.acts["o"][i] if shared else self._forward(self.current, self.acts["p"], layer)
        if shared:
            self.shared.add(i)
        for j in set(layer.inputs):
            if self.original.last_use.get(j, -2) <= i:
                for side in self.acts.values():
                    side.pop(j, None)

    @staticmethod
    def _forward(network: Network, acts: dict, layer) -> list[np.ndarray]:
        count = len(acts[layer.inputs[0]])
        return [network.forward(None, outputs=[layer.index], start=layer.index,
                                cached={j: acts[j][b] for j in layer.inputs})[layer.index] for b in range(count)]


def accumulate(layer, pruned_in: list, original_in: list, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(P_p^T P_p, P_p^T P_o) of one consumer (bias column last) over all batches of images, in float64,
    `samples` positions per image (the same ones in both networks)."""
    rng = np.random.default_rng([seed, layer.index])
    g_pp = cross = None
    for xp, xo in zip(pruned_in, original_in):
        pos = sample_positions(layer, rng, samples)
        p = patches(layer, xp, pos)
        gp = gram(p, p)
        gc = gp if xo is xp else gram(p, patches(layer, xo, pos))
        g_pp = gp if g_pp is None else g_pp + gp
        cross = gc if cross is None else cross + gc
    return g_pp, cross


def reconstruct(original: Model, pruned: Model, images, masks=None, grouping: Grouping | None = None,
                ridge: float = 1e-3, progress: bool = True, samples: int = SAMPLES, layers: str = "readers",
                seed: int = 0, batch: int = BATCH) -> Model:
    """A copy of `pruned` (the masked, possibly compensated, `original`) whose layers reading pruned channels are
    refitted so their pre-activation outputs on the calibration `images` match `original`'s (see the module doc).
    `images`: an (N, C, H, W) array of network inputs, image paths, a Dataset, or a .data file (256 images of its
    train= list). `masks`: default the pruned model's own. `ridge`: lambda relative to the Gram's mean diagonal.
    `samples`: output positions per image and layer. `layers`: "readers" (the layers reading pruned channels) or
    "all" (every conv/connected layer from the first of them on). Inputs are never modified; the result carries
    the masks, so `transform` removes them with no change in outputs."""
    from tqdm import tqdm

    from ..util.progress import progress_enabled
    from .calibration import calibration_inputs
    if not ridge >= 0:
        raise DarkpruneError(f"reconstruct ridge={ridge}: must be a number >= 0")
    if structure_fingerprint(pruned.graph) != structure_fingerprint(original.graph):
        raise DarkpruneError(f"reconstruct: the pruned model ({pruned.cfg_path or 'in memory'}) is not the masked "
                             f"{original.cfg_path or 'original'} (another structure; transform after reconstructing)")
    masks = _as_masks(original, masks if masks is not None else getattr(pruned, "masks", None), grouping)
    kept = KeptChannels(masks.grouping, masks.pruned)
    x = calibration_inputs(original, images)
    targets = fit_layers(original, kept, layers)
    out = pruned.copy()
    out.masks = masks
    if not targets:
        return out
    stream = _Stream(Network(original), Network(out), x, batch)
    bar = tqdm(total=len(targets), desc="reconstruct", unit="layer", disable=not progress_enabled(progress),
               dynamic_ncols=True)
    try:
        for layer in original.graph.layers[:targets[-1] + 1]:
            i = layer.index
            if i in targets:
                src = layer.inputs[0]
                g_pp, cross = accumulate(layer, stream.acts["p"][src], stream.acts["o"][src], samples, seed)
                w, b, refit = solve(geometry(layer), g_pp, cross, original_rows(layer, original.params[i]),
                                    kept.reads(i), kept.out[i], float(ridge))
                out.params[i] = refitted_arrays(layer, original.params[i], out.params[i], w, b, refit)
                stream.current = stream.current.variant({i: out.params[i]})
                bar.update(1)
            if i < targets[-1]:
                stream.run(layer)
    finally:
        bar.close()
    return out


class SingleGroupRefit:
    """Reconstruction for the sensitivity analysis (`ana --reconstruct`), where one group alone is pruned: every
    consumer then reads the unpruned activations with the group's pruned channels at zero, so P_p is P_o restricted
    to the kept columns and one Gram G = P_o^T P_o per consumer, accumulated once over the calibration images in
    one pass of the unpruned network, gives every variant's fit in closed form: W_k = (G_kk + lambda I)^-1 G_k:
    W^T. The fitted biases subsume bias compensation for the refitted layers. Call it with (group, channels,
    overrides) from masked_group_arrays; it returns the overrides with the group's consumers refitted."""

    def __init__(self, model: Model, grouping: Grouping, groups, images: np.ndarray, ridge: float = 1e-3,
                 samples: int = SAMPLES, seed: int = 0, batch: int = BATCH, progress: bool = True):
        from tqdm import tqdm

        from ..util.progress import progress_enabled
        self.model, self.grouping, self.ridge = model, grouping, float(ridge)
        layers = sorted({c.layer for g in groups for c in g.consumers})
        graph = model.graph
        self.layers = [i for i in layers if role(graph[i]) == PRODUCER and "weights" in model.params.get(i, {})
                       and geometry(graph[i]).columns <= MAX_COLUMNS]
        self.grams: dict[int, np.ndarray] = {}
        network = Network(model)
        sources = sorted({graph[i].inputs[0] for i in self.layers})
        rngs = {i: np.random.default_rng([seed, i]) for i in self.layers}
        bar = tqdm(total=len(images), desc="calibration", unit="img", disable=not progress_enabled(progress),
                   dynamic_ncols=True)
        try:
            for lo in range(0, len(images), batch):
                x = images[lo:lo + batch]
                acts = network.forward(x, outputs=[s for s in sources if s >= 0]) if sources else {}
                acts[-1] = x
                for i in self.layers:
                    p = patches(graph[i], acts[graph[i].inputs[0]], sample_positions(graph[i], rngs[i], samples))
                    g = gram(p, p)
                    self.grams[i] = g if i not in self.grams else self.grams[i] + g
                bar.update(len(x))
        finally:
            bar.close()

    def __call__(self, group, channels, overrides: dict) -> dict:
        kept = KeptChannels(self.grouping, group.masks(channels))
        out = dict(overrides)
        graph = self.model.graph
        for i in sorted({c.layer for c in group.consumers}):
            if i not in self.grams or i not in out:
                continue
            layer = graph[i]
            w, b, refit = solve(geometry(layer), self.grams[i], self.grams[i],
                                original_rows(layer, self.model.params[i]), kept.reads(i), kept.out[i], self.ridge,
                                changed_only=True)
            if refit.any():
                out[i] = refitted_arrays(layer, self.model.params[i], out[i], w, b, refit)
        return out


__all__ = ["reconstruct", "SingleGroupRefit", "patches", "gram", "solve", "accumulate", "fit_layers", "geometry", "original_rows",
           "refitted_arrays", "SAMPLES"]
