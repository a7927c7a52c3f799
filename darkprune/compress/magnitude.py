"""Fine-grained magnitude pruning (Deep Compression's first stage) and the user's iterative schedule.

A layer's `sparse_ratio` is the share of all its weights that end up zero, smallest |w| first. Pruning is iterative:
the schedule is a list of steps, each raising some layers' ratios and followed by some finetuning iterations; a weight
pruned at one step stays pruned in every later one.

User syntax (command line):
    --sparsity conv1=0.33,conv2=0.8,ip1=0.9,ip2=0.8      final ratios
    --clusters conv1=256,conv2=256,ip1=32,ip2=32         k-means cluster counts (`class_num`)
    --schedule layerwise | oneshot | STEP;STEP;...         default layerwise: one layer per step, in --sparsity order
        STEP = LAYER=RATIO[,LAYER=RATIO...][@ITERS]        e.g. "conv2=0.5@1000;conv2=0.8,ip1=0.9@2000"
Config file (`--config`): one `key=value` a line with the same keys (`sparsity`, `clusters`, `index_bits`,
`schedule`, `finetune_iters`, `centroid_iters`, `init`, `seed`), '#' starts a comment; and/or a section per layer in
the spirit of the Caffe implementation's per-layer `sparse_ratio` / `class_num`:
    [conv1]
    sparse_ratio=0.33
    class_num=256
    index_bits=8
Keys we do not know are collected in `CompressConfig.unknown` (the CLI warns about them by name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darkprune.errors import DarkpruneError

# Defaults per layer type, from the paper (LeNet/AlexNet): 8-bit indices and 256 clusters for conv, 5 bits / 32 for fc.
DEFAULT_CLUSTERS = {"convolutional": 256, "connected": 32}
DEFAULT_INDEX_BITS = {"convolutional": 8, "connected": 5}
MAX_CLUSTERS = 1 << 16


# ---------------------------------------------------------------------------------------------------------- masks

def prune_count(size: int, sparse_ratio: float) -> int:
    """How many of `size` weights a ratio removes: round half up, robust to 0.1 * 10-style float noise."""
    return min(size, int(math.floor(sparse_ratio * size + 0.5 + 1e-9)))


def magnitude_mask(weights, sparse_ratio: float, mask=None) -> np.ndarray:
    """Boolean keep-mask (True = kept) zeroing the `sparse_ratio` share of the smallest |w|.

    Ties in |w| are broken by position (the earlier weight in C order is pruned first), so the mask is a pure function
    of the input. With a previous `mask`, weights already pruned stay pruned and count toward the ratio.
    """
    if not 0.0 <= float(sparse_ratio) <= 1.0:
        raise DarkpruneError(f"sparse ratio {sparse_ratio} is outside [0, 1]")
    weights = np.asarray(weights)
    key = np.abs(weights.astype(np.float64)).ravel()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != weights.shape:
            raise DarkpruneError(f"mask shape {mask.shape} differs from the weights' {weights.shape}")
        key[~mask.ravel()] = -1.0  # already pruned: first in line
    keep = np.ones(key.size, dtype=bool)
    count = prune_count(key.size, float(sparse_ratio))
    if count:
        # Same result as a stable argsort, in linear time: everything below the count-th smallest key goes, then
        # the earliest positions among the keys equal to it.
        threshold = np.partition(key, count - 1)[count - 1]
        keep[key < threshold] = False
        ties = np.flatnonzero(key == threshold)
        keep[ties[:count - int((key < threshold).sum())]] = False
    if mask is not None:
        keep &= mask.ravel()
    return keep.reshape(weights.shape)


def apply_mask(weights, mask) -> np.ndarray:
    """Weights with pruned positions set to exactly 0 (float32 copy)."""
    out = np.array(weights, dtype=np.float32)
    out[~np.asarray(mask, dtype=bool)] = 0.0
    return out


# ------------------------------------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class PruneStep:
    """Raise these layers to these sparse ratios, then finetune `finetune_iters` iterations."""

    ratios: dict
    finetune_iters: int = 0


def _parse_pairs(text: str, where: str, convert, what: str) -> dict:
    pairs: dict = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise DarkpruneError(f"{where}: {item!r} is not LAYER=VALUE")
        name, value = (part.strip() for part in item.split("=", 1))
        if not name:
            raise DarkpruneError(f"{where}: {item!r} has no layer name")
        if name in pairs:
            raise DarkpruneError(f"{where}: layer {name!r} is given twice")
        pairs[name] = convert(value, f"{where}: {name}", what)
    return pairs


def _ratio(value: str, where: str, what: str = "sparse ratio") -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise DarkpruneError(f"{where}: {what} {value!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        hint = " (a share such as 0.8, not a percentage)" if ratio > 1 else ""
        raise DarkpruneError(f"{where}: {what} {value} is outside [0, 1]{hint}")
    return ratio


def _bounded_int(low: int, high: int):
    def convert(value: str, where: str, what: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise DarkpruneError(f"{where}: {what} {value!r} is not an integer") from None
        if not low <= number <= high:
            raise DarkpruneError(f"{where}: {what} {number} is outside [{low}, {high}]")
        return number
    return convert


_cluster_count = _bounded_int(1, MAX_CLUSTERS)
_index_bits = _bounded_int(1, 16)
_iterations = _bounded_int(0, 1 << 40)


def parse_sparsity(text: str, where: str = "sparsity") -> dict:
    """'conv1=0.33,conv2=0.8' -> {'conv1': 0.33, 'conv2': 0.8} (order kept)."""
    return _parse_pairs(text, where, _ratio, "sparse ratio")


def parse_clusters(text: str, where: str = "clusters") -> dict:
    """'conv1=256,ip1=32' -> {'conv1': 256, 'ip1': 32}."""
    return _parse_pairs(text, where, _cluster_count, "cluster count")


def parse_index_bits(text: str, where: str = "index_bits") -> dict:
    """'conv1=8,ip1=5' -> {'conv1': 8, 'ip1': 5}."""
    return _parse_pairs(text, where, _index_bits, "index bits")


def layerwise_schedule(sparsity: dict, finetune_iters: int) -> list:
    """The paper's iterative recipe: prune one layer at a time (in the given order), finetune after each."""
    return [PruneStep({name: ratio}, finetune_iters) for name, ratio in sparsity.items()]


def oneshot_schedule(sparsity: dict, finetune_iters: int) -> list:
    return [PruneStep(dict(sparsity), finetune_iters)] if sparsity else []


def parse_schedule(text: str, sparsity: dict | None = None, finetune_iters: int = 0,
                   where: str = "schedule") -> list:
    """`layerwise`, `oneshot` (both need `sparsity`) or explicit steps 'a=0.5@1000;a=0.8,b=0.9' (see module doc)."""
    text = text.strip()
    if text in ("layerwise", "oneshot"):
        if not sparsity:
            raise DarkpruneError(f"{where}: '{text}' needs the per-layer sparsity (the sparsity setting)")
        steps = (layerwise_schedule if text == "layerwise" else oneshot_schedule)(sparsity, finetune_iters)
    else:
        steps = []
        for number, chunk in enumerate(text.split(";"), start=1):
            chunk = chunk.strip()
            if not chunk:
                continue
            iters = finetune_iters
            if "@" in chunk:
                chunk, iters_text = chunk.rsplit("@", 1)
                iters = _iterations(iters_text.strip(), f"{where}: step {number}", "finetune iterations")
            ratios = _parse_pairs(chunk, f"{where}: step {number}", _ratio, "sparse ratio")
            if not ratios:
                raise DarkpruneError(f"{where}: step {number} names no layer")
            steps.append(PruneStep(ratios, iters))
    validate_schedule(steps, where)
    if sparsity:
        final = final_ratios(steps)
        if final != dict(sparsity):
            raise DarkpruneError(f"{where}: the schedule ends at {_format(final)}, the sparsity asks for "
                                 f"{_format(sparsity)}")
    return steps


def validate_schedule(steps: list, where: str = "schedule") -> None:
    """A layer's ratio may only grow from step to step: a pruned weight never comes back."""
    reached: dict = {}
    for number, step in enumerate(steps, start=1):
        for name, ratio in step.ratios.items():
            if name in reached and ratio < reached[name]:
                raise DarkpruneError(f"{where}: step {number} lowers {name} from {reached[name]} to {ratio} "
                                     "(pruned weights never come back)")
            reached[name] = ratio


def final_ratios(steps: list) -> dict:
    out: dict = {}
    for step in steps:
        out.update(step.ratios)
    return out


def format_schedule(steps: list) -> str:
    """The explicit form `parse_schedule` reads back."""
    return ";".join(f"{_format(step.ratios)}@{step.finetune_iters}" for step in steps)


def _format(ratios: dict) -> str:
    return ",".join(f"{name}={value:g}" for name, value in ratios.items())


# ----------------------------------------------------------------------------------------------------- config file

@dataclass
class CompressConfig:
    sparsity: dict = field(default_factory=dict)       # layer name -> final sparse ratio
    clusters: dict = field(default_factory=dict)       # layer name -> k-means cluster count
    index_bits: dict = field(default_factory=dict)     # layer name -> relative index bits
    schedule: list = field(default_factory=list)       # list[PruneStep]
    finetune_iters: int = 0                            # per pruning step, unless a step says otherwise
    centroid_iters: int = 0                            # centroid finetuning after quantisation
    init: str = "linear"                               # k-means initialisation
    seed: int = 0
    unknown: list = field(default_factory=list)        # "FILE:LINE: key" for keys we do not support


_GLOBAL_KEYS = {"sparsity", "clusters", "index_bits", "schedule", "finetune_iters", "centroid_iters", "init", "seed"}
_LAYER_KEYS = {"sparse_ratio": "sparsity", "sparsity": "sparsity", "class_num": "clusters", "clusters": "clusters",
               "index_bits": "index_bits"}


def build_compress_config(sparsity=None, clusters=None, index_bits=None, schedule=None, finetune_iters: int = 0,
                          centroid_iters: int = 0, init: str = "linear", seed: int = 0,
                          where: str = "options") -> CompressConfig:
    """Assembles and validates the options (strings as typed on the command line, or already-parsed dicts)."""
    sparsity = parse_sparsity(sparsity, f"{where}: sparsity") if isinstance(sparsity, str) else dict(sparsity or {})
    clusters = parse_clusters(clusters, f"{where}: clusters") if isinstance(clusters, str) else dict(clusters or {})
    if isinstance(index_bits, str):
        index_bits = parse_index_bits(index_bits, f"{where}: index_bits")
    from darkprune.compress.kmeans import INITS
    if init not in INITS:
        raise DarkpruneError(f"{where}: unknown k-means initialisation {init!r} (choose from {', '.join(INITS)})")
    if isinstance(schedule, str):
        steps = parse_schedule(schedule, sparsity or None, finetune_iters, f"{where}: schedule")
    elif schedule:
        steps = list(schedule)
        validate_schedule(steps, f"{where}: schedule")
    else:
        steps = layerwise_schedule(sparsity, finetune_iters)
    if not sparsity:
        sparsity = final_ratios(steps)
    return CompressConfig(sparsity=sparsity, clusters=clusters, index_bits=dict(index_bits or {}), schedule=steps,
                          finetune_iters=finetune_iters, centroid_iters=centroid_iters, init=init, seed=seed)


def read_compress_config(path) -> CompressConfig:
    """Reads a compress config file (see the module doc); errors name FILE:LINE."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DarkpruneError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DarkpruneError(f"{path}: not a UTF-8 text file") from None
    values: dict = {}
    per_layer = {"sparsity": {}, "clusters": {}, "index_bits": {}}
    unknown: list = []
    section = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            if not section:
                raise DarkpruneError(f"{where}: empty section name")
            if section in ("compress", "deep_compression"):
                section = None
            continue
        if "=" not in line:
            raise DarkpruneError(f"{where}: expected key=value, got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        key = key.replace("-", "_").lower()
        if section is None:
            if key not in _GLOBAL_KEYS:
                unknown.append(f"{where}: {key}")
                continue
            values[key] = (value, where)
        else:
            target = _LAYER_KEYS.get(key)
            if target is None:
                unknown.append(f"{where}: [{section}] {key}")
                continue
            convert = {"sparsity": _ratio, "clusters": _cluster_count, "index_bits": _index_bits}[target]
            per_layer[target][section] = convert(value, f"{where}: {section}",
                                                 {"sparsity": "sparse ratio", "clusters": "cluster count",
                                                  "index_bits": "index bits"}[target])

    def merged(key: str, parse) -> dict:
        out = {}
        if key in values:
            text_value, where = values[key]
            out = parse(text_value, where)
        for name, value in per_layer[key].items():
            if name in out and out[name] != value:
                raise DarkpruneError(f"{path}: layer {name!r} has two different {key} values")
            out[name] = value
        return out

    def scalar(key: str, convert, default):
        if key not in values:
            return default
        text_value, where = values[key]
        return convert(text_value, where, key)

    sparsity = merged("sparsity", parse_sparsity)
    finetune_iters = scalar("finetune_iters", _iterations, 0)
    schedule_text = values.get("schedule", ("layerwise", str(path)))
    if schedule_text[0] in ("layerwise", "oneshot") and not sparsity:
        steps = []
    else:
        steps = parse_schedule(schedule_text[0], sparsity or None, finetune_iters, schedule_text[1])
    init = values.get("init", ("linear", ""))[0]
    config = build_compress_config(
        sparsity=sparsity or final_ratios(steps), clusters=merged("clusters", parse_clusters),
        index_bits=merged("index_bits", parse_index_bits), schedule=steps, finetune_iters=finetune_iters,
        centroid_iters=scalar("centroid_iters", _iterations, 0), init=init,
        seed=scalar("seed", _bounded_int(0, (1 << 63) - 1), 0), where=str(path))
    config.unknown = unknown
    return config


__all__ = ["DEFAULT_CLUSTERS", "DEFAULT_INDEX_BITS", "prune_count", "magnitude_mask", "apply_mask", "PruneStep",
           "parse_sparsity", "parse_clusters", "parse_index_bits", "layerwise_schedule", "oneshot_schedule",
           "parse_schedule", "validate_schedule", "final_ratios", "format_schedule", "CompressConfig",
           "build_compress_config", "read_compress_config"]
