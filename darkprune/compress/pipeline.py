"""Deep Compression of a whole Darknet model: prune, finetune, share weights, finetune the centroids, write a `.dcz`.

    import darkprune as dp
    from darkprune.compress.pipeline import compress, decompress
    model = dp.load("cfg/lenet.cfg", "weights/lenet.weights")
    result = compress(model, sparsity={"conv0": 0.33, "conv2": 0.8, "connected4": 0.9, "connected5": 0.8},
                      clusters={"conv": 256, "fc": 32}, data="mnist.data", finetune_iters=1000,
                      centroid_iters=1000, out="lenet.dcz")
    print(format_report(result.report))
    same = decompress("lenet.dcz")          # a Model whose weights equal result.model's bit for bit

Layers are named as `darkprune info` prints them (conv0, connected4; a bare index works too). In `sparsity`,
`clusters` and `index_bits` a key may also be a layer type standing for every layer of that type: `conv` /
`convolutional`, `fc` / `connected`; a layer named on its own wins over its type. Unnamed layers get the defaults:
no pruning, 256 clusters and 8-bit relative indices for conv, 32 clusters and 5-bit indices for connected layers
(the paper's choices, `DEFAULT_CLUSTERS` / `DEFAULT_INDEX_BITS`). Every convolutional and connected layer's weights are
quantised; biases, batch-norm parameters and other layers' arrays are stored as float32 (Huffman-coded bytes).

Stages (Han, Mao, Dally 2015):
1. Pruning by magnitude, following the schedule: `layerwise` (one layer per step, in the order of `sparsity`, with
   `finetune_iters` of finetuning after each step: the Caffe implementation's recipe), `oneshot` (all layers, then
   finetuning), or explicit steps ("conv2=0.5@1000;conv2=0.8,connected4=0.9@2000", see compress.magnitude). The masks
   are fine-grained (one bit per weight) and held through finetuning: a pruned weight never comes back. After each
   step the weights of dead neurons (channels no kept weight reads any more) are pruned as well, as Han et al.
   (2015) do: the outputs do not change, the file gets smaller (`remove_dead=False` keeps them).
2. Weight sharing: per layer, k-means over the surviving weights (linear initialisation by default); every survivor
   becomes its centroid.
3. Centroid finetuning (`centroid_iters`): the gradient of a centroid is the sum of the gradients of the weights
   in its cluster (the paper's eq. 3); pruned weights stay out, the cluster assignment stays fixed. Biases and
   batch-norm scales keep training with Darknet's SGD. Finetuning and centroid finetuning take the optimiser
   settings (batch, momentum, decay) from the cfg's [net]; learning rates are options.
4. The `.dcz` file (darkprune.compress.dcz): relative indices, codebooks and cluster indices, Huffman-coded.

`decompress(path)` restores the model; `compress` checks, after writing, that the file decodes to exactly the
weights of the quantised model it returns.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darkprune.compress.dcz import format_size_report, read_dcz, write_dcz
from darkprune.compress.kmeans import INITS, share_weights
from darkprune.compress.magnitude import (DEFAULT_CLUSTERS, DEFAULT_INDEX_BITS, PruneStep, apply_mask,
                                          format_schedule, magnitude_mask, parse_schedule, validate_schedule)
from darkprune.compress.training import Trainer
from darkprune.darknet.cfg import parse_cfg_text
from darkprune.util.files import atomic_write_bytes
from darkprune.darknet.graph import build_graph
from darkprune.darknet.model import Model
from darkprune.darknet.weights import WeightsHeader, layer_arrays
from darkprune.errors import DarkpruneError
from darkprune.util.jsonio import write_json

COMPRESSIBLE_TYPES = ("convolutional", "connected")
# Names that stand for every layer of a type in the per-layer options.
TYPE_ALIASES = {"conv": "convolutional", "convolutional": "convolutional", "fc": "connected",
                "connected": "connected", "ip": "connected"}
SCHEDULES = ("layerwise", "oneshot")
CENTROID_GRADIENTS = ("sum", "mean")

__all__ = ["CompressResult", "compress", "decompress", "read_compressed", "resolve_layer_options", "format_report",
           "remove_dead_weights", "best_index_bits", "cfg_without_comments", "dcz_layer_list", "compressible_layers",
           "COMPRESSIBLE_TYPES", "TYPE_ALIASES"]


# ---------------------------------------------------------------------------------------------------- layer options

def compressible_layers(model) -> list:
    """The layers whose weights Deep Compression prunes and quantises: conv (not `share_index` copies) and connected."""
    out = []
    for layer in model.graph:
        if layer.type not in COMPRESSIBLE_TYPES:
            continue
        if "weights" not in model.params.get(layer.index, {}):
            continue  # a conv sharing another layer's weights (share_index) stores none of its own
        out.append(layer)
    return out


def _resolve_key(model, key: str, option: str) -> tuple[bool, list[int]]:
    """(is a type alias, layer indices) a key of a per-layer option stands for; unknown names raise."""
    key = str(key).strip()
    kind = TYPE_ALIASES.get(key.lower())
    layers = compressible_layers(model)
    if kind is not None:
        return True, [layer.index for layer in layers if layer.type == kind]
    try:
        layer = model.graph.find(key)
    except DarkpruneError:
        names = ", ".join(layer.name for layer in layers[:8]) + (", ..." if len(layers) > 8 else "")
        raise DarkpruneError(f"{option}: no layer named '{key}' in {model.cfg.path or 'the model'} (its conv and "
                             f"connected layers are {names or 'none'}; or use conv=/fc= for all of a type)") from None
    if layer.index not in {l.index for l in layers}:
        why = ("it shares another layer's weights (share_index)" if layer.type == "convolutional"
               else "only convolutional and connected layers have weights to compress")
        raise DarkpruneError(f"{option}: layer {layer.name} is a [{layer.section.header}] layer: {why}")
    return False, [layer.index]


def resolve_layer_options(model, given: dict | None, defaults: dict, option: str) -> dict[int, object]:
    """{layer index: value} for every compressible layer: the type defaults, then type keys, then layer names."""
    out = {layer.index: defaults.get(layer.type) for layer in compressible_layers(model)}
    resolved = [(*_resolve_key(model, key, option), value) for key, value in (given or {}).items()]
    for is_type, indices, value in sorted(resolved, key=lambda item: not item[0]):  # types first, names win
        for index in indices:
            out[index] = value
    return out


def _check_ratio(value, where: str) -> float:
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise DarkpruneError(f"{where}: sparse ratio {value!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise DarkpruneError(f"{where}: sparse ratio {value} is outside [0, 1]")
    return ratio


def _resolve_schedule(model, schedule, sparsity: dict, ratios: dict[int, float],
                      finetune_iters: int) -> list[tuple[dict[int, float], int]]:
    """The schedule as [({layer index: ratio}, finetune iterations)], checked: ratios only grow per layer.

    `layerwise` and `oneshot` work on the resolved per-layer ratios (a layer named on its own wins over its type),
    layerwise taking the layers in the order their keys come in `sparsity` (a type key: its layers in graph order);
    layers left at 0 get no step."""
    if schedule is None or schedule in SCHEDULES:
        order: list[int] = []
        for key in sparsity:
            for index in _resolve_key(model, key, "sparsity")[1]:
                if index not in order and ratios.get(index, 0.0) > 0:
                    order.append(index)
        if schedule == "oneshot":
            return [({index: ratios[index] for index in order}, int(finetune_iters))] if order else []
        return [({index: ratios[index]}, int(finetune_iters)) for index in order]
    if isinstance(schedule, str):
        steps = parse_schedule(schedule, sparsity or None, finetune_iters)
    else:
        steps = [step if isinstance(step, PruneStep) else PruneStep(dict(step[0]), int(step[1])) for step in schedule]
    validate_schedule(steps)
    out = []
    for number, step in enumerate(steps, start=1):
        ratios: dict[int, float] = {}
        # Within one step a layer named on its own wins over its type, as in the per-layer options.
        keyed = [(*_resolve_key(model, key, f"schedule step {number}"), _check_ratio(value, f"{key}"))
                 for key, value in step.ratios.items()]
        for is_type, indices, ratio in sorted(keyed, key=lambda item: not item[0]):
            for index in indices:
                ratios[index] = ratio
        out.append((ratios, int(step.finetune_iters)))
    return out


# ------------------------------------------------------------------------------------------------- dead neurons

# Layers that map each input channel to the same output channel and nothing else.
CHANNEL_WISE_TYPES = ("maxpool", "dropout", "activation", "avgpool", "local_avgpool")


def _sole_consumer(model, producer, masks: dict, consumers: dict, outputs: set):
    """The one pruned layer that reads `producer`'s output, through channel-wise layers only; None if the output
    goes anywhere else too (a route, a shortcut, a head, the network's output...)."""
    current = producer.index
    while True:
        if current in outputs:
            return None
        readers = consumers.get(current, [])
        if len(readers) != 1:
            return None
        layer = model.graph[readers[0]]
        if layer.inputs != [current]:
            return None
        if layer.type in CHANNEL_WISE_TYPES and not (layer.type == "maxpool" and layer.attrs["maxpool_depth"]):
            current = layer.index
            continue
        if layer.index in masks and layer.in_shape[0] == producer.out_shape[0]:
            return layer
        return None


def _used_input_channels(consumer, mask: np.ndarray) -> np.ndarray:
    """For each input channel of `consumer`, whether any of its kept weights reads it."""
    channels = consumer.in_shape[0]
    if consumer.type == "connected":
        return mask.reshape(mask.shape[0], channels, -1).any(axis=(0, 2))
    groups = int(consumer.attrs["groups"])
    filters = mask.shape[0]
    per_group = mask.reshape(groups, filters // groups, channels // groups, -1).any(axis=(1, 3))
    return per_group.reshape(channels)


def remove_dead_weights(model, masks: dict) -> dict[int, int]:
    """Prunes the weights of neurons (channels) whose output no kept weight reads any more: a channel of a conv or
    connected layer read only by one pruned layer (directly or through maxpool/dropout/avgpool), all of whose
    weights on that channel are pruned. Han et al. (2015) remove such dead neurons too. The network's outputs do
    not change (the channel is multiplied by exact zeros). Updates `masks` and the model's weights in place,
    repeating until nothing changes (a dead channel can starve the layer before it); returns {layer: weights
    removed}."""
    consumers = model.graph.consumers()
    outputs = set(model.graph.output_layers())
    removed: dict[int, int] = {}
    changed = True
    while changed:
        changed = False
        for index in sorted(masks, reverse=True):
            producer = model.graph[index]
            consumer = _sole_consumer(model, producer, masks, consumers, outputs)
            if consumer is None:
                continue
            dead = ~_used_input_channels(consumer, masks[consumer.index])
            if not dead.any():
                continue
            mask = masks[index]
            newly = int(mask[dead].sum())
            if newly:
                mask[dead] = False
                model.params[index]["weights"] = apply_mask(model.params[index]["weights"], mask)
                removed[index] = removed.get(index, 0) + newly
                changed = True
    return removed


# ------------------------------------------------------------------------------------------------- index bits

AUTO = "auto"


def best_index_bits(mask, labels, candidates=range(2, 17)) -> int:
    """The relative-index width that makes this layer's Huffman-coded streams (gaps + cluster indices with the
    filler entries) smallest, as the `.dcz` writer codes them. Narrow indices need filler entries across long runs of
    pruned weights; wide ones cost nothing extra once Huffman-coded, so the best width depends on the layer."""
    from darkprune.compress.huffman import huffman_encode
    from darkprune.compress.sparse import encode_relative_index
    flat = np.asarray(mask, dtype=bool).ravel()
    used, compact = np.unique(np.asarray(labels).ravel(), return_inverse=True)
    best, best_size = None, None
    for bits in candidates:
        gaps, is_filler = encode_relative_index(flat, bits)
        entries = np.full(gaps.size, used.size, dtype=np.int64)
        entries[~is_filler] = compact.ravel()
        size = len(huffman_encode(gaps)) + len(huffman_encode(entries))
        if best_size is None or size < best_size:
            best, best_size = bits, size
    return int(best)


# --------------------------------------------------------------------------------------------------------- result

@dataclass
class CompressResult:
    """What `compress` produced.

    model: the quantised model (pruned weights exactly 0, survivors exactly their centroid), the one the `.dcz`
    decodes to; masks: {layer index: bool keep-mask of its weights}; codebooks: {layer index: spec} with "codebook",
    "labels" (per surviving weight, C order), "mask", "index_bits" (what write_dcz takes); report: the size report
    (darkprune.compress.dcz) plus "accuracy", "metric", "stages", "history", "config", "seconds"; path: the `.dcz`
    written (None if none)."""
    model: Model
    masks: dict
    codebooks: dict
    report: dict
    path: str | None = None
    history: list = field(default_factory=list)

    @property
    def accuracy(self) -> dict:
        return self.report.get("accuracy", {})


# ------------------------------------------------------------------------------------------------------- evaluation

def _metric_name(model) -> str:
    from darkprune.darknet.heads import metric_name
    return metric_name(model.graph)


class _Evaluator:
    """evaluate() on the validation split, memoised per stage; no data means no accuracy figures."""

    def __init__(self, model, data, limit, progress):
        from darkprune.evaluate import load_dataset
        self.metric = _metric_name(model)
        self.data = None if data is None else load_dataset(data, limit)
        self.progress = progress

    def __call__(self, model) -> float | None:
        if self.data is None:
            return None
        from darkprune.evaluate import evaluate
        return float(evaluate(model, self.data, progress=self.progress)[self.metric])


def _split(data, split: str):
    """A Dataset for `split` ("train"/"valid") from a .data path; a Dataset given as is serves both."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        from darkprune.data import load_data
        return load_data(data, split=split)
    return data


# ---------------------------------------------------------------------------------------------------------- compress

def compress(model: Model, sparsity: dict | None = None, clusters: dict | None = None,
             index_bits: dict | None = None, schedule="layerwise", data=None, finetune_iters: int = 0,
             centroid_iters: int = 0, init: str = "linear", seed: int = 0, workspace=None, out=None,
             train_data=None, eval_limit: int | None = None, finetune_lr: float | None = None,
             centroid_lr: float | None = None, centroid_gradient: str = "sum", batch: int | None = None,
             evaluate_steps: bool = False, remove_dead: bool = True, strip_cfg_comments: bool = False,
             progress: bool = True, log=None) -> CompressResult:
    """Deep Compression of `model` (left unchanged; see the module doc for the stages and the option syntax).

    sparsity: {layer or type: share of weights to zero}; clusters: {layer or type: k}; index_bits: {layer or type:
    bits of a relative index}. schedule: "layerwise" | "oneshot" | explicit steps (string or [PruneStep]).
    data: a `.data` path or Dataset: accuracy is measured on its validation split (first `eval_limit` images), and
    training (finetune_iters / centroid_iters > 0) uses its train split unless `train_data` is given.
    finetune_lr: learning rate while pruning (default: the cfg's learning_rate / 10); centroid_lr: for the codebooks
    (default: finetune_lr / 10); centroid_gradient: "sum" (the paper's eq. 3) or "mean" (the cluster's mean
    gradient, i.e. every shared weight takes an ordinary SGD step). batch: images per iteration (default: the cfg's).
    workspace: a folder for the run's files (config, masks, the pruned and quantised pairs, report.json, and the
    `.dcz` unless `out` names one). evaluate_steps: also measure accuracy after each pruning step.
    remove_dead: after each pruning step, also prune the weights of neurons no kept weight reads any more
    (`remove_dead_weights`: outputs unchanged; layers can then end sparser than asked).
    index_bits values may be "auto": the width that codes the layer smallest (`best_index_bits`).
    strip_cfg_comments: store the cfg without its comment and blank lines (the same network, a smaller file).
    log: callable(str) for progress lines (default: stderr unless progress=False).
    """
    started = time.perf_counter()
    say = log if log is not None else ((lambda text: print(text, file=sys.stderr, flush=True))
                                       if progress else (lambda text: None))
    _check_options(init, centroid_gradient, finetune_iters, centroid_iters)
    model = model.copy()
    layers, ratios, ks, bits, steps = _layer_options(model, sparsity, clusters, index_bits, schedule,
                                                     int(finetune_iters))
    wants_training = int(finetune_iters) > 0 or int(centroid_iters) > 0 or any(it > 0 for _, it in steps)
    if wants_training and data is None and train_data is None:
        raise DarkpruneError("finetuning needs training data: give data (a .data file) or set the iterations to 0")
    ws = _workspace(workspace)
    if out is None and ws is not None:
        out = ws / "model.dcz"
    config = _run_config(model, layers, ratios, ks, bits, steps, data, finetune_iters=int(finetune_iters),
                         centroid_iters=int(centroid_iters), init=init, seed=int(seed), finetune_lr=finetune_lr,
                         centroid_lr=centroid_lr, centroid_gradient=centroid_gradient, batch=batch,
                         eval_limit=eval_limit, remove_dead=bool(remove_dead),
                         strip_cfg_comments=bool(strip_cfg_comments))
    if ws is not None:
        _write_text(ws / "config.txt", _config_text(config))

    evaluator = _Evaluator(model, _split(data, "valid"), eval_limit, progress)
    trainer = None
    if wants_training:
        trainer = Trainer(model, train_data if train_data is not None else _split(data, "train"), seed=seed,
                          batch=batch, progress=progress)
    run = _Stages(model, layers, evaluator, trainer, say)
    run.measure("original")
    masks = run.prune(steps, remove_dead, evaluate_steps, finetune_lr)
    if ws is not None:
        np.savez_compressed(ws / "masks.npz", **{layers[i].name: m for i, m in masks.items()})
        model.save(ws / "pruned.cfg", ws / "pruned.weights")
    codebooks = run.share(masks, ks, bits, init, int(seed))
    if int(centroid_iters) > 0:
        rate = centroid_lr if centroid_lr is not None else (
            finetune_lr if finetune_lr is not None else trainer.base_lr / 10) / 10
        run.finetune_centroids(codebooks, int(centroid_iters), rate, centroid_gradient)
    for index, spec in codebooks.items():  # the model holds exactly what the file will hold
        if not np.array_equal(model.params[index]["weights"], _dense(spec)):
            raise AssertionError(f"layer {layers[index].name}: weights drifted from the codebook")

    report = _write_file(model, codebooks, out, strip_cfg_comments)
    final = run.accuracy.get("centroids finetuned", run.accuracy.get("quantized"))
    report.update(metric=run.evaluator.metric, accuracy={
        "before": run.accuracy.get("original"), "after": final, **run.accuracy}, history=run.history, config=config,
        seconds=round(time.perf_counter() - started, 2))
    if ws is not None:
        model.save(ws / "quantized.cfg", ws / "quantized.weights")
        write_json(ws / "report.json", report)
    return CompressResult(model=model, masks=masks, codebooks=codebooks, report=report,
                          path=None if out is None else str(out), history=run.history)


def _workspace(workspace) -> Path | None:
    if workspace is None:
        return None
    ws = Path(workspace)
    try:
        ws.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DarkpruneError(f"{ws}: cannot create the workspace ({exc.strerror})") from None
    return ws


def _check_options(init: str, centroid_gradient: str, finetune_iters, centroid_iters) -> None:
    if init not in INITS:
        raise DarkpruneError(f"unknown k-means initialisation {init!r} (choose from {', '.join(INITS)})")
    if centroid_gradient not in CENTROID_GRADIENTS:
        raise DarkpruneError(f"centroid_gradient must be one of {', '.join(CENTROID_GRADIENTS)}")
    for name, value in (("finetune_iters", finetune_iters), ("centroid_iters", centroid_iters)):
        if int(value) < 0:
            raise DarkpruneError(f"{name} must be >= 0, not {value}")


def _run_config(model, layers: dict, ratios: dict, ks: dict, bits: dict, steps, data, **settings) -> dict:
    """The run's settings by layer name (report.json's "config", config.txt)."""
    return {
        "sparsity": {layers[i].name: r for i, r in ratios.items() if r},
        "clusters": {layers[i].name: int(k) for i, k in ks.items()},
        "index_bits": {layers[i].name: b if b == AUTO else int(b) for i, b in bits.items()},
        "schedule": format_schedule([PruneStep({layers[i].name: r for i, r in rs.items()}, it) for rs, it in steps]),
        **settings,
        "files": {"cfg": model.cfg_path, "weights": model.weights_path,
                  "data": str(data) if isinstance(data, (str, os.PathLike)) else None},
    }


def _layer_options(model, sparsity, clusters, index_bits, schedule, finetune_iters: int):
    """({index: layer}, {index: target sparsity}, {index: clusters}, {index: index bits or AUTO}, the schedule's
    steps), all checked."""
    layers = {layer.index: layer for layer in compressible_layers(model)}
    if not layers:
        raise DarkpruneError(f"{model.cfg.path or 'the model'}: no convolutional or connected layer with weights "
                             "to compress")
    sparsity = dict(sparsity or {})
    for key, value in sparsity.items():
        _check_ratio(value, f"sparsity: {key}")
    ratios = resolve_layer_options(model, sparsity, {}, "sparsity")
    ratios = {index: (value or 0.0) for index, value in ratios.items()}
    ks = resolve_layer_options(model, clusters, DEFAULT_CLUSTERS, "clusters")
    bits = resolve_layer_options(model, index_bits, DEFAULT_INDEX_BITS, "index_bits")
    for index, k in ks.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 1 << 16:
            raise DarkpruneError(f"clusters: {layers[index].name}: cluster count {k} is outside [1, 65536]")
    for index, b in bits.items():
        if isinstance(b, str) and b.strip().lower() == AUTO:
            bits[index] = AUTO
        elif isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 16:
            raise DarkpruneError(f"index_bits: {layers[index].name}: index bits {b} is outside [1, 16] (or auto)")
    steps = _resolve_schedule(model, schedule, sparsity, ratios, finetune_iters)
    reached: dict[int, float] = {}
    for step_ratios, _ in steps:
        reached.update(step_ratios)
    for index, ratio in ratios.items():
        if reached.get(index, 0.0) != ratio:
            # An explicit schedule that names layers the sparsity does not (or the reverse) is read as the target.
            if not sparsity:
                ratios[index] = reached.get(index, 0.0)
            else:
                raise DarkpruneError(f"schedule: it takes {layers[index].name} to {reached.get(index, 0.0):g}, the "
                                     f"sparsity asks for {ratio:g}")
    return layers, ratios, ks, bits, steps


class _Stages:
    """The compression stages on one model (changed in place), with the accuracy after each and the history."""

    def __init__(self, model, layers: dict, evaluator: _Evaluator, trainer, say):
        self.model, self.layers, self.evaluator, self.trainer, self.say = model, layers, evaluator, trainer, say
        self.accuracy: dict = {}
        self.history: list = []

    def measure(self, stage: str):
        value = self.evaluator(self.model)
        if value is not None:
            self.accuracy[stage] = value
            self.say(f"{stage}: {self.evaluator.metric} {value:.4f}")
        return value

    def prune(self, steps, remove_dead: bool, evaluate_steps: bool, finetune_lr) -> dict:
        """1. Magnitude pruning by the schedule's steps, each followed by its finetuning; returns the masks."""
        model, names = self.model, {i: layer.name for i, layer in self.layers.items()}
        masks = {index: np.ones(model.params[index]["weights"].shape, dtype=bool) for index in self.layers}
        for number, (step_ratios, iters) in enumerate(steps, start=1):
            for index, ratio in step_ratios.items():
                weights = model.params[index]["weights"]
                masks[index] = magnitude_mask(weights, ratio, masks[index])
                model.params[index]["weights"] = apply_mask(weights, masks[index])
            entry = {"step": number, "ratios": {names[i]: r for i, r in step_ratios.items()}, "finetune_iters": iters}
            self.say(f"pruning step {number}/{len(steps)}: " + ", ".join(f"{names[i]}={r:g}"
                                                                         for i, r in step_ratios.items()))
            if remove_dead:
                dead = remove_dead_weights(model, masks)
                entry["dead_removed"] = {names[i]: n for i, n in dead.items()}
                if dead:
                    self.say(f"pruning step {number}: also removed the weights of dead neurons: "
                             + ", ".join(f"{names[i]} {n}" for i, n in dead.items()))
            if evaluate_steps:
                entry["pruned"] = self.measure(f"step {number} pruned")
            if iters > 0:
                entry["finetune"] = self.trainer.finetune(model, masks, iters, lr=finetune_lr)
                entry["revived"] = _hold_masks(model, masks)
                if evaluate_steps:
                    entry["finetuned"] = self.measure(f"step {number} finetuned")
            self.history.append(entry)
        self.measure("pruned")
        return masks

    def share(self, masks: dict, ks: dict, bits: dict, init: str, seed: int) -> dict:
        """2. Per layer, k-means over the surviving weights; every survivor becomes its centroid."""
        codebooks = {}
        for index in self.layers:
            codebook, labels, quantized = share_weights(self.model.params[index]["weights"], masks[index],
                                                        int(ks[index]), init=init, seed=seed)
            self.model.params[index]["weights"] = quantized
            width = best_index_bits(masks[index], labels) if bits[index] == AUTO else int(bits[index])
            codebooks[index] = {"codebook": codebook, "labels": labels, "mask": masks[index], "index_bits": width}
        self.measure("quantized")
        return codebooks

    def finetune_centroids(self, codebooks: dict, iters: int, rate: float, reduce: str) -> None:
        """3. Centroid finetuning (see compress.training)."""
        stats = self.trainer.finetune_centroids(self.model, codebooks, iters, lr=rate, reduce=reduce)
        self.history.append({"centroid_finetune": stats})
        self.measure("centroids finetuned")


def _write_file(model, codebooks: dict, out, strip_cfg_comments: bool) -> dict:
    """4. The `.dcz` (checked to decode bit for bit) or, without `out`, only its size report."""
    dcz_layers = dcz_layer_list(model, codebooks)
    cfg_text = cfg_without_comments(model.cfg.text()) if strip_cfg_comments else model.cfg.text()
    if out is not None:
        inputs = [p for p in (model.cfg_path, model.weights_path) if p]
        for source in inputs:
            if Path(out).exists() and os.path.samefile(out, source):
                raise DarkpruneError(f"{out}: refusing to overwrite an input file; choose another output name")
        report = write_dcz(out, cfg_text, model.header, dcz_layers)
        check = decompress(out)
        for index, arrays in model.params.items():
            for name, value in arrays.items():
                if not np.array_equal(check.params[index][name].view(np.uint32), value.view(np.uint32)):
                    raise AssertionError(f"{out}: layer {index} {name} does not decode bit for bit")
    else:
        from darkprune.compress.dcz import size_report
        report = size_report(dcz_layers, cfg_text, _header_tuple(model.header))
        report["path"] = None
    weights_file = len(model.weights_bytes())
    total = report["total"]
    total["weights_file_bytes"] = weights_file
    total["ratio_weights_file"] = weights_file / total["bytes_after"]
    return report


def cfg_without_comments(text: str) -> str:
    """The cfg text without comment (# or ;) and blank lines: Darknet reads the same network from it."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.strip() and not line.lstrip().startswith(("#", ";")))


def _dense(spec: dict) -> np.ndarray:
    from darkprune.compress.kmeans import quantized_weights
    return quantized_weights(spec["codebook"], spec["labels"], spec["mask"])


def _hold_masks(model, masks) -> int:
    """Zeroes pruned weights again after finetuning; returns how many had come back (finetuning should leave 0)."""
    revived = 0
    for index, mask in masks.items():
        weights = model.params[index]["weights"]
        alive = (weights != 0) & ~mask
        revived += int(alive.sum())
        if alive.any():
            model.params[index]["weights"] = apply_mask(weights, mask)
    return revived


def dcz_layer_list(model, codebooks: dict) -> list[dict]:
    """Every layer with parameters, its arrays in `.weights` file order: quantised weights where a codebook is
    given, everything else raw float32."""
    out = []
    for layer in model.graph:
        arrays = layer_arrays(layer)
        if not arrays or layer.index not in model.params:
            continue
        entries = []
        for name, _shape in arrays:
            if name == "weights" and layer.index in codebooks:
                entries.append((name, None, codebooks[layer.index]))
            else:
                entries.append((name, model.params[layer.index][name], None))
        out.append({"index": layer.index, "name": layer.name, "arrays": entries})
    return out


def _header_tuple(header) -> tuple:
    return (header.major, header.minor, header.revision, header.seen)


# -------------------------------------------------------------------------------------------------------- decompress

def read_compressed(path) -> tuple[Model, dict]:
    """(model, {layer index: spec}) from a `.dcz`: the model's weights are exactly the quantised ones; the specs
    (codebook of the clusters in use, labels, mask, index bits) allow, e.g., more centroid finetuning."""
    path = Path(path)
    cfg_text, header, layers = read_dcz(path)
    cfg = parse_cfg_text(cfg_text, f"{path}:cfg")
    stored = {}
    for layer in layers:
        if layer["index"] in stored:
            raise DarkpruneError(f"{path}: layer {layer['index']} appears twice")
        stored[layer["index"]] = layer
    layout = "alexeyab"
    for section_index, section in enumerate(cfg.layers):
        if section.type == "batchnorm" and section_index in stored:
            names = [name for name, _, _ in stored[section_index]["arrays"]]
            layout = "alexeyab" if "biases" in names else "pjreddie"
            break
    graph = build_graph(cfg, layout)
    params, specs = {}, {}
    for layer in graph:
        expected = layer_arrays(layer)
        if not expected:
            if layer.index in stored:
                raise DarkpruneError(f"{path}: holds arrays for layer {layer.index} ({layer.name}), which has none "
                                     "in its cfg")
            continue
        entry = stored.pop(layer.index, None)
        if entry is None:
            raise DarkpruneError(f"{path}: no arrays for layer {layer.index} ({layer.name})")
        got = [(name, tuple(np.shape(array))) for name, array, _ in entry["arrays"]]
        if got != [(name, tuple(shape)) for name, shape in expected]:
            raise DarkpruneError(f"{path}: layer {layer.index} ({layer.name}) stores {got}, its cfg needs "
                                 f"{expected}")
        params[layer.index] = {name: np.ascontiguousarray(array, dtype=np.float32)
                               for name, array, _ in entry["arrays"]}
        for name, _, spec in entry["arrays"]:
            if spec is not None and name == "weights":
                specs[layer.index] = spec
    if stored:
        raise DarkpruneError(f"{path}: arrays for layer(s) {sorted(stored)} beyond the cfg's {len(graph)} layers")
    model = Model(cfg, graph, params, WeightsHeader(*(int(v) for v in header)), str(path), None)
    return model, specs


def decompress(path) -> Model:
    """The model stored in a `.dcz` (cfg, header, every array); quantised weights are exactly codebook[label] at the
    kept positions and 0 elsewhere. Save it with `Model.save(cfg, weights)`."""
    return read_compressed(path)[0]


# ------------------------------------------------------------------------------------------------------------ report

def format_report(report: dict) -> str:
    """The size report as a table, then the compression stages and the accuracy before and after."""
    lines = [format_size_report(report)]
    total = report["total"]
    if "weights_file_bytes" in total:
        lines.append(f"file: {total['weights_file_bytes']} B .weights -> {total['bytes_after']} B .dcz "
                     f"({total['ratio_weights_file']:.1f}x smaller)")
    accuracy = report.get("accuracy") or {}
    metric = report.get("metric", "accuracy")
    stages = [(name, value) for name, value in accuracy.items() if name not in ("before", "after")
              and value is not None]
    if stages:
        lines.append(f"{metric}: " + ", ".join(f"{name} {value:.4f}" for name, value in stages))
    if accuracy.get("before") is not None and accuracy.get("after") is not None:
        lines.append(f"{metric} before {accuracy['before']:.4f}, after {accuracy['after']:.4f} "
                     f"({accuracy['after'] - accuracy['before']:+.4f})")
    if report.get("path"):
        lines.append(f"written: {report['path']}")
    return "\n".join(lines)


def _config_text(config: dict) -> str:
    """The run's settings as a compress config (read back by magnitude.read_compress_config)."""
    lines = ["# darkprune compress: the settings of this run (`darkprune compress --config` reruns it)"]
    for key, path in config.get("files", {}).items():
        if path:
            lines.append(f"{key}={Path(path).resolve()}")
    for key in ("sparsity", "clusters", "index_bits"):
        lines.append(f"{key}=" + ",".join(f"{name}={value if isinstance(value, str) else format(value, 'g')}"
                                          for name, value in config[key].items()))
    lines.append(f"schedule={config['schedule'] or 'layerwise'}")
    for key in ("finetune_iters", "centroid_iters", "init", "seed"):
        lines.append(f"{key}={config[key]}")
    # The rest under the names `darkprune compress --config` reads.
    for key, name in (("finetune_lr", "lr"), ("centroid_lr", "centroid_lr"), ("centroid_gradient", "centroid_gradient"),
                      ("batch", "batch"), ("eval_limit", "limit")):
        if config[key] is not None:
            lines.append(f"{name}={config[key]}")
    if not config["remove_dead"]:
        lines.append("keep_dead=1")
    if config["strip_cfg_comments"]:
        lines.append("strip_comments=1")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
