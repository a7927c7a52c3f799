"""Darknet formats: `.cfg` parsing/writing, the layer graph with Darknet's shape and BFLOPs rules, `.weights` I/O."""
from .cfg import Cfg, Option, Section, parse_cfg_text, read_cfg, write_cfg
from .graph import Graph, Layer, Source, build_graph
from .model import Model, load
from .weights import WeightsHeader, layer_arrays

__all__ = ["Cfg", "Option", "Section", "parse_cfg_text", "read_cfg", "write_cfg", "Graph", "Layer", "Source",
           "build_graph", "Model", "load", "WeightsHeader", "layer_arrays"]
