"""The layer graph of a Darknet network: every layer's type, resolved attributes, inputs, shapes, parameter count and
BFLOPs, computed by Darknet's own rules (AlexeyAB's parser.c and *_layer.c), so that `info` totals equal the
`Total BFLOPS` line Darknet prints.

Shapes are (c, h, w). Layer -1 is the network input. Each layer type's shape rule is its entry's `build` in the
layer-type table (layer_types.py, rules in shapes.py); this module walks the cfg and applies them.
"""
from __future__ import annotations

from ..errors import DarkpruneError
from .cfg import Cfg
from .heads import HEAD_TYPES
from .layer import Layer, Source
from .layer_types import LAYER_TYPES, UNSUPPORTED
from .shapes import ACTIVATIONS

# Layer types whose parameters live in the .weights file.
WEIGHTED_TYPES = {"convolutional", "connected", "batchnorm", "shortcut", "local"}

__all__ = ["Graph", "Layer", "Source", "build_graph", "ACTIVATIONS", "UNSUPPORTED", "WEIGHTED_TYPES", "format_shape",
           "human_count"]


class Graph:
    def __init__(self, cfg: Cfg, layers: list[Layer], net: dict):
        self.cfg = cfg
        self.layers = layers
        self.net = net                      # resolved [net] options: width, height, channels, batch, ...

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.net["channels"], self.net["height"], self.net["width"])

    @property
    def total_bflops(self) -> float:
        return float(sum(l.bflops for l in self.layers))

    @property
    def total_params(self) -> int:
        return int(sum(l.params for l in self.layers))

    def consumers(self) -> dict[int, list[int]]:
        """For each producer index (and -1), the layers that read it, in order."""
        out: dict[int, list[int]] = {}
        for layer in self.layers:
            for src in layer.inputs:
                out.setdefault(src, []).append(layer.index)
        return out

    def output_layers(self) -> list[int]:
        """Layers whose outputs the network reports: yolo/region/detection heads, else the last layer."""
        heads = [l.index for l in self.layers if l.type in HEAD_TYPES]
        if heads:
            return heads
        idx = len(self.layers) - 1
        while idx > 0 and self.layers[idx].type in ("cost",):
            idx -= 1
        return [idx]

    def find(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name or str(layer.index) == name:
                return layer
        raise DarkpruneError(f"no layer named '{name}' in {self.cfg.path} (names look like conv3, connected7; "
                             f"`darkprune info` lists them)")


def _net_options(cfg: Cfg) -> dict:
    s = cfg.net
    net = {
        "width": s.get_int("width", 0), "height": s.get_int("height", 0), "channels": s.get_int("channels", 0),
        "batch": s.get_int("batch", 1), "subdivisions": s.get_int("subdivisions", 1),
        "learning_rate": s.get_float("learning_rate", 0.001), "momentum": s.get_float("momentum", 0.9),
        "decay": s.get_float("decay", 0.0001), "max_batches": s.get_int("max_batches", 0),
        "policy": s.get_str("policy", "constant"), "burn_in": s.get_int("burn_in", 0),
        "power": s.get_float("power", 4.0), "letter_box": s.get_int("letter_box", 0),
    }
    net["inputs"] = s.get_int("inputs", net["width"] * net["height"] * net["channels"])
    if not net["inputs"] and not (net["width"] and net["height"] and net["channels"]):
        raise DarkpruneError(f"{s.where()}: [net] needs width, height and channels (or inputs)")
    if not (net["width"] and net["height"] and net["channels"]):
        # A flat-input network (e.g. a pure [connected] model): treat it as inputs x 1 x 1.
        net["channels"], net["height"], net["width"] = net["inputs"], 1, 1
    return net


def build_graph(cfg: Cfg, batchnorm_layout: str = "alexeyab") -> Graph:
    """Resolve every layer of `cfg`. `batchnorm_layout` says how a standalone [batchnorm] stores its parameters:
    AlexeyAB's darknet writes biases, scales, mean, variance (4 x c); pjreddie's writes scales, mean, variance."""
    net = _net_options(cfg)
    layers: list[Layer] = []
    shape = (net["channels"], net["height"], net["width"])
    for index, section in enumerate(cfg.layers):
        entry = LAYER_TYPES.get(section.type)
        if entry is None:
            kind = "recurrent layers are outside darkprune's scope" if section.type in UNSUPPORTED else \
                "darkprune does not support this layer type"
            raise DarkpruneError(f"{section.path}:{section.line}: layer {index} [{section.header}]: {kind}")
        prev = index - 1
        layer = Layer(index, section.type, section, [prev], shape, shape)
        layer.sources = [Source(prev, 0, shape[0])]
        entry.build(layer, section, layers, net, batchnorm_layout)
        c, h, w = layer.out_shape
        if c <= 0 or h <= 0 or w <= 0:
            raise DarkpruneError(f"{layer.where()}: output shape {w}x{h}x{c} is empty (input {layer.in_shape[2]}x"
                                 f"{layer.in_shape[1]}x{layer.in_shape[0]}): check size/stride/filters")
        layers.append(layer)
        shape = layer.out_shape
    return Graph(cfg, layers, net)



def format_shape(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{w:4d} x{h:4d} x{c:5d}"


def human_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"
