"""The inference runner: executes a Model's layer graph on a batch with the numba layer kernels.

`Network(model)` prepares each layer once (batch norm folded into conv/connected weights with Darknet's eps 1e-5, or
OpenCV's 1e-6 for tight comparisons), then `forward(x)` runs a (N, C, H, W) float32 batch and returns the outputs of
the requested layers (the detection heads, or the last layer). Intermediate outputs live in a per-thread arena laid
out once per kind of forward from the outputs' lifetimes (buffers.py): a range is reused once its output's last
reader has run, so memory stays near the largest set of outputs alive at once, and batched forwards stop allocating.
Returned outputs are always fresh arrays, and arrays passed in are never written. With several numba threads, a
batch is split into one shard per thread, each run through the whole network on its own thread; a forward that
cannot be split runs its kernels on all threads or on one, whichever recent forwards of its kind measured faster
(parallel.py: on a busy machine two threads can lose to one).

`forward(..., start=k, cached=...)` resumes from layer k given the outputs of earlier layers that later layers still
read (`frontier(k)`): the sensitivity analysis reruns only the part of the network after the layer it changed.
"""
from __future__ import annotations

import numpy as np

from ..darknet.graph import Layer
from ..darknet.layer_types import layer_type
from ..darknet.model import Model
from ..errors import DarkpruneError
from . import parallel
from .buffers import Arenas, Slots, plan_arena
from .layer_ops import INFERENCE_TYPES

# Darknet folds batch norm with eps 1e-5 (fuse_conv_batchnorm); OpenCV's importer with 1e-6.
DARKNET_BN_EPS = 1e-5
OPENCV_BN_EPS = 1e-6


class Network:
    def __init__(self, model: Model, bn_eps: float = DARKNET_BN_EPS):
        self.model = model
        self.graph = model.graph
        self.bn_eps = bn_eps
        for layer in self.graph:
            if layer_type(layer).engine is None:
                raise DarkpruneError(f"{layer.where()}: the darkprune engine does not run [{layer.section.header}] "
                                     f"layers (supported: {', '.join(sorted(INFERENCE_TYPES))})")
        self._prepared: dict[int, tuple] = {i: self._prepare(self.graph[i]) for i in range(len(self.graph))}
        consumers = self.graph.consumers()
        # last_use[i] = the last layer that reads layer i's output (the output itself if none)
        self.last_use = {i: max(consumers.get(i, [i])) for i in range(-1, len(self.graph))}
        self._consumers = consumers
        # where intermediate outputs live, and the measured thread choice (both shared with variants: same graph)
        self._arenas = Arenas()
        self._thread_choice = parallel.ThreadChoice()

    def variant(self, overrides: dict[int, dict[str, np.ndarray]]) -> "Network":
        """A Network for the same graph with some layers' parameters replaced; only those layers are prepared
        again (the sensitivity analysis builds hundreds of such variants, each differing in a few layers)."""
        other = object.__new__(Network)
        other.__dict__.update(self.__dict__)
        params = dict(self.model.params)
        params.update(overrides)
        other.model = Model(self.model.cfg, self.graph, params, self.model.header, self.model.cfg_path,
                            self.model.weights_path)
        other._prepared = dict(self._prepared)
        for index in overrides:
            other._prepared[index] = other._prepare(self.graph[index])
        return other

    # -- preparation ------------------------------------------------------------------------------------------
    def _prepare(self, layer: Layer) -> tuple:
        prepare = layer_type(layer).engine.prepare
        return prepare(self, layer, self.model.params.get(layer.index, {})) if prepare is not None else ()

    # -- running ----------------------------------------------------------------------------------------------
    def frontier(self, start: int) -> list[int]:
        """Outputs of layers before `start` that layers from `start` on read (plus -1 for the input)."""
        need = set()
        for layer in self.graph.layers[start:]:
            need.update(i for i in layer.inputs if i < start)
        return sorted(need)

    def forward(self, x: np.ndarray | None, outputs: list[int] | None = None, start: int = 0,
                cached: dict[int, np.ndarray] | None = None, keep: list[int] | None = None) -> dict[int, np.ndarray]:
        """Run layers `start`.. on input `x` (N, C, H, W) float32 (or on `cached` frontier outputs when start > 0).
        Returns {layer: output} for `outputs` (default: the graph's output layers) and `keep`."""
        outputs = list(self.graph.output_layers() if outputs is None else outputs)
        wanted = set(outputs) | set(keep or ())
        acts: dict[int, np.ndarray] = dict(cached or {})
        if x is not None:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.ndim == 3:
                x = x[None]
            expected = self.graph.input_shape
            if tuple(x.shape[1:]) != expected:
                raise DarkpruneError(f"input batch has shape {tuple(x.shape[1:])}, the network expects "
                                     f"{expected} (channels, height, width)")
            acts[-1] = x
        last = max(wanted) if wanted else len(self.graph) - 1
        shards = parallel.batch_shards(acts, self.graph.layers[start:last + 1])
        if len(shards) > 1:
            return parallel.run_shards(self._forward_layers, acts, shards, start, last, wanted)
        key = (next(iter(acts.values())).shape[0] if acts else 0, start, last, frozenset(wanted))
        return self._thread_choice.run(key, lambda: self._forward_layers(acts, start, last, wanted))

    def _forward_layers(self, acts: dict, start: int, last: int, wanted: set) -> dict[int, np.ndarray]:
        """The layer loop: intermediate outputs in this thread's arena (buffers.py), returned ones fresh."""
        batch = next(iter(acts.values())).shape[0] if acts else 0
        key = (batch, start, last, frozenset(wanted))
        plan = self._arenas.plans.get(key)
        if plan is None:
            plan = plan_arena(self.graph, batch, start, last, wanted, self._consumers, _writes_into)
            self._arenas.plans[key] = plan
        slots = Slots(plan, self._arenas.arena(plan.size))
        result: dict[int, np.ndarray] = {}
        for layer in self.graph.layers[start:last + 1]:
            try:
                ins = [acts[i] for i in layer.inputs]
            except KeyError as missing:
                raise DarkpruneError(f"layer {layer.index}: input from layer {missing} is not available "
                                     f"(resume from layer {start} needs {self.frontier(start)})") from None
            if layer.index in plan.fused and slots.in_place(layer.index, zip(layer.inputs, ins)):
                out = slots.alloc(layer.index)((batch,) + tuple(layer.out_shape))
            elif layer.index in plan.offsets:
                out = layer_type(layer).engine.into(layer, self._prepared[layer.index], ins, slots.alloc(layer.index))
            else:
                out = self._run(layer, ins)
            acts[layer.index] = out
            if layer.index in wanted:
                result[layer.index] = out
            for i in set(layer.inputs):
                if self.last_use.get(i, -2) <= layer.index and i not in wanted:
                    acts.pop(i, None)
        return result

    def _run(self, layer: Layer, ins: list[np.ndarray]) -> np.ndarray:
        return layer_type(layer).engine.infer(layer, self._prepared[layer.index], ins)


def _writes_into(layer: Layer) -> bool:
    return layer_type(layer).engine.into is not None


def run(model: Model, x: np.ndarray, outputs: list[int] | None = None, bn_eps: float = DARKNET_BN_EPS):
    """One-shot convenience: Network(model).forward(x)."""
    return Network(model, bn_eps).forward(x, outputs)
