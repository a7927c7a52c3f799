"""Which layers are detection heads, whether a network is a detector, and so which metric measures it.

Defined once here; the engine, the trainer, the grouping and the workflow import these names.
"""
from __future__ import annotations

from .layer_types import HEAD, LAYER_TYPES

# Every Darknet detection head type: layers whose outputs are boxes, not channels another layer reads (the layer-type
# table's HEAD entries). The grouping treats them all as fixed (their channel count is set by anchors and classes).
HEAD_TYPES = frozenset(name for name, entry in LAYER_TYPES.items() if entry.channels == HEAD)
# The heads darkprune decodes into boxes and trains (a loss and a backward): [yolo] (v3/v4) and [region] (v2).
DECODED_HEAD_TYPES = ("yolo", "region")


def is_detector(graph) -> bool:
    """True when the network has a head darkprune decodes into boxes; otherwise it is treated as a classifier."""
    return any(layer.type in DECODED_HEAD_TYPES for layer in graph)


def metric_name(graph) -> str:
    """The metric a model is measured by: mAP@0.5 (``map50``) for a detector, top-1 accuracy (``top1``) otherwise."""
    return "map50" if is_detector(graph) else "top1"
