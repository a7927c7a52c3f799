"""`Model`: a cfg, its layer graph and its parameters, loadable from and savable to a Darknet `.cfg`/`.weights` pair."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DarkpruneError
from ..util.files import atomic_write_bytes
from .cfg import Cfg, read_cfg
from .graph import Graph, build_graph
from .weights import (WeightsHeader, expected_floats, random_params, read_header, read_weights, weights_bytes)


class Model:
    """A Darknet network with its parameters.

    `params[i]` holds layer i's arrays by Darknet's names (`biases`, `scales`, `rolling_mean`, `rolling_variance`,
    `weights`), float32, with conv weights shaped (filters, channels/groups, size, size) and connected weights
    (outputs, inputs). Layers without parameters have no entry.
    """

    def __init__(self, cfg: Cfg, graph: Graph, params: dict, header: WeightsHeader | None = None,
                 cfg_path: str | None = None, weights_path: str | None = None):
        self.cfg = cfg
        self.graph = graph
        self.params = params
        self.header = header or WeightsHeader()
        self.cfg_path = cfg_path
        self.weights_path = weights_path

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_cfg(cls, cfg: Cfg, params: dict | None = None, header: WeightsHeader | None = None, seed: int = 0,
                 batchnorm_layout: str = "alexeyab") -> "Model":
        graph = build_graph(cfg, batchnorm_layout)
        return cls(cfg, graph, params if params is not None else random_params(graph, seed), header)

    def copy(self) -> "Model":
        params = {i: {k: v.copy() for k, v in p.items()} for i, p in self.params.items()}
        header = WeightsHeader(self.header.major, self.header.minor, self.header.revision, self.header.seen)
        return Model(self.cfg, self.graph, params, header, self.cfg_path, self.weights_path)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.graph.input_shape

    def __repr__(self) -> str:
        return (f"Model({self.cfg_path or 'in memory'}: {len(self.graph)} layers, input "
                f"{self.input_shape[2]}x{self.input_shape[1]}x{self.input_shape[0]}, "
                f"{self.graph.total_params} params, {self.graph.total_bflops:.3f} BFLOPs)")

    # -- saving -------------------------------------------------------------------------------------------------
    def weights_bytes(self) -> bytes:
        return weights_bytes(self.graph, self.header, self.params)

    def save(self, cfg_path: str | os.PathLike, weights_path: str | os.PathLike) -> None:
        """Write the pair atomically (temp file + rename); refuses to overwrite the files this model was read from."""
        inputs = [p for p in (self.cfg_path, self.weights_path) if p]
        if Path(cfg_path).resolve() == Path(weights_path).resolve():
            raise DarkpruneError(f"{cfg_path}: cfg and weights outputs must be different files")
        data = self.weights_bytes()
        atomic_write_bytes(cfg_path, self.cfg.text().encode("ascii"), inputs)
        atomic_write_bytes(weights_path, data, inputs)


def _pick_batchnorm_layout(cfg: Cfg, weights_path: str | None) -> str:
    """A standalone [batchnorm] stores 4 x c floats in AlexeyAB's darknet and 3 x c in pjreddie's: take the one
    whose total matches the file (AlexeyAB's when both or neither do)."""
    if weights_path is None or not any(s.type == "batchnorm" for s in cfg.layers):
        return "alexeyab"
    try:
        with open(weights_path, "rb") as fh:
            head = fh.read(20)
        size = os.path.getsize(weights_path)
        header = read_header(weights_path, head)
    except (OSError, DarkpruneError):
        return "alexeyab"
    floats = (size - header.nbytes) // 4
    for layout in ("alexeyab", "pjreddie"):
        if expected_floats(build_graph(cfg, layout)) == floats:
            return layout
    return "alexeyab"


def load(cfg_path: str | os.PathLike, weights_path: str | os.PathLike | None = None, seed: int = 0,
         lenient: bool = False) -> Model:
    """Load a Darknet model. Without weights, parameters are seeded random (He-scaled, finite through any depth).
    `lenient=True` accepts a weights file that stops early (Darknet's partial load, e.g. backbone weights); the layers
    it does not reach keep random parameters."""
    cfg_path = str(cfg_path)
    cfg = read_cfg(cfg_path)
    weights_path = str(weights_path) if weights_path is not None else None
    layout = _pick_batchnorm_layout(cfg, weights_path)
    graph = build_graph(cfg, layout)
    params = random_params(graph, seed)
    header = WeightsHeader()
    if weights_path is not None:
        header, loaded = read_weights(weights_path, graph, lenient=lenient)
        params.update(loaded)
    model = Model(cfg, graph, params, header, cfg_path, weights_path)
    _check_finite(model)
    return model


def _check_finite(model: Model) -> None:
    for index, arrays in model.params.items():
        for name, arr in arrays.items():
            if not np.isfinite(arr).all():
                layer = model.graph[index]
                raise DarkpruneError(f"{model.weights_path}: layer {index} ({layer.name}) has NaN or infinite values "
                                     f"in '{name}': corrupt weights")
