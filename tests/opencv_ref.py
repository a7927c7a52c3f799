"""OpenCV's Darknet importer as the independent reference: load a pair, run it, and find each Darknet layer's
output among OpenCV's layer names."""
import re
from pathlib import Path

import numpy as np

# OpenCV names a layer's activation after the *next* layer's index (conv_0, bn_0, leaky_1 are all Darknet layer 0).
_ACTIVATION_PREFIXES = {"leaky", "relu", "logistic", "tanh", "mish", "swish", "relu6", "elu", "selu", "gelu",
                        "hardswish", "sigmoid", "hard_mish"}


def darknet_layer_names(net) -> dict[int, str]:
    """Map each Darknet layer index to the OpenCV layer whose output is that layer's final output."""
    last: dict[int, str] = {}
    for name in net.getLayerNames():
        m = re.fullmatch(r"([A-Za-z_0-9]+?)_(\d+)", name)
        if not m:
            continue
        prefix, k = m.group(1), int(m.group(2))
        index = k - 1 if prefix in _ACTIVATION_PREFIXES else k
        last[index] = name
    return last


def pre_activation_names(net) -> dict[int, str]:
    """For Darknet layers whose OpenCV output is a separate activation layer: the blob just before it."""
    names = list(net.getLayerNames())
    out = {}
    for prev, name in zip(names, names[1:]):
        m = re.fullmatch(r"([A-Za-z_0-9]+?)_(\d+)", name)
        if m and m.group(1) in _ACTIVATION_PREFIXES:
            out[int(m.group(2)) - 1] = prev
    return out


def opencv_forward(cfg: Path, weights: Path, x: np.ndarray, layers: list[int], pre_activation: list[int] = ()):
    """Outputs of Darknet `layers` from OpenCV; with `pre_activation`, also {("pre", i): blob before i's activation}."""
    import cv2
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.enableFusion(False)  # fused layers overwrite the intermediate blobs we compare
    net.setInput(np.ascontiguousarray(x, dtype=np.float32))
    names = darknet_layer_names(net)
    pre = pre_activation_names(net)
    keys = list(layers) + [("pre", i) for i in pre_activation if i in pre]
    wanted = [names[k] if not isinstance(k, tuple) else pre[k[1]] for k in keys]
    outs = net.forward(wanted)
    return {k: o for k, o in zip(keys, outs)}
