"""The same network at another input size: `[net] width=` and `height=` changed, the weights shared.

A detector's BFLOPs grow with its input area, and a convolutional network's weights do not depend on it, so a smaller
input is a second way (beside pruning channels) to make a model cheaper, and the two combine. Darknet reads any
width/height its layers accept; what a network accepts is checked here by building its graph: routes and shortcuts
must meet equal feature-map sizes (for YOLO networks: multiples of their total stride, 32 for Yolo-Fastest), and no
layer's parameter count may depend on the size ([connected] and [local] layers do: such a network is refused).

    small = with_input_size(model, 256, 256)     # or dp.with_input_size; `darkprune transform/eval --input-size`
"""
from __future__ import annotations

from ..errors import DarkpruneError
from .graph import build_graph
from .model import Model


def parse_input_size(text: str) -> tuple[int, int]:
    """'256' or '320x256' (width x height) -> (width, height); a DarkpruneError for anything else."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) <= 0:
        raise DarkpruneError(f"input size {text}: expected WIDTH or WIDTHxHEIGHT in pixels, e.g. 256 or 320x256")
    return sizes[0], sizes[-1]


def parse_input_sizes(text: str) -> list[tuple[int, int]]:
    """'288x256,256' -> [(288, 256), (256, 256)] (empty items skipped)."""
    return [parse_input_size(t) for t in str(text).split(",") if t.strip()]


def with_input_size(model: Model, width: int, height: int) -> Model:
    """`model` at input width x height: a new cfg ([net] width/height set), the same parameter arrays (shared, not
    copied) and header; no pruning masks (resize after `transform`). Raises DarkpruneError naming the layer whose
    shapes do not fit, or whose parameters would change size."""
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise DarkpruneError(f"input size {width}x{height}: width and height must be positive")
    graph = model.graph
    if graph.net["width"] * graph.net["height"] <= 1 < graph.input_shape[0]:
        raise DarkpruneError(f"{model.cfg_path or 'the model'}: a flat-input network ([net] inputs=) has no input "
                             f"size to change")
    cfg = model.cfg.copy()
    cfg.net.set("width", width)
    cfg.net.set("height", height)
    if cfg.net.get_int("inputs") == graph.net["width"] * graph.net["height"] * graph.input_shape[0]:
        cfg.net.set("inputs", width * height * graph.input_shape[0])     # an explicit inputs= follows the size
    layout = next((layer.attrs["layout"] for layer in graph if layer.type == "batchnorm"), "alexeyab")
    where = model.cfg_path or "the model"
    try:
        new_graph = build_graph(cfg, layout)
    except DarkpruneError as exc:
        raise DarkpruneError(f"{where} at input {width}x{height}: {exc}") from None
    for old, new in zip(graph, new_graph):
        if old.params != new.params:
            raise DarkpruneError(f"{new.where()}: its parameters depend on the input size ({old.params} at "
                                 f"{graph.net['width']}x{graph.net['height']}, {new.params} at {width}x{height}); "
                                 f"only networks without such layers can be resized")
    # Pruning masks are not carried over: they name the shapes they were made for. Resize the transformed model.
    return Model(cfg, new_graph, model.params, model.header, None, None)
