"""The inference runner: executes a Model's layer graph on a batch with the numba layer kernels.

`Network(model)` prepares each layer once (batch norm folded into conv/connected weights with Darknet's eps 1e-5, or
OpenCV's 1e-6 for tight comparisons), then `forward(x)` runs a (N, C, H, W) float32 batch and returns the outputs of
the requested layers (the detection heads, or the last layer). Activations are freed as soon as their last consumer
has run, so peak memory stays near the largest few tensors rather than the whole network.

`forward(..., start=k, cached=...)` resumes from layer k given the outputs of earlier layers that later layers still
read (`frontier(k)`): the sensitivity analysis reruns only the part of the network after the layer it changed.
"""
from __future__ import annotations

import numpy as np

from ..darknet.graph import Layer
from ..darknet.model import Model
from ..errors import DarkpruneError
from . import activations, conv, pool, reorg, route, sam, scale_channels, shortcut, softmax, upsample, yolo
from . import crop as crop_kernels

# Darknet folds batch norm with eps 1e-5 (fuse_conv_batchnorm); OpenCV's importer with 1e-6.
DARKNET_BN_EPS = 1e-5
OPENCV_BN_EPS = 1e-6

INFERENCE_TYPES = {
    "convolutional", "connected", "maxpool", "local_avgpool", "avgpool", "route", "shortcut", "upsample", "reorg",
    "reorg3d", "softmax", "dropout", "yolo", "region", "scale_channels", "sam", "batchnorm", "activation", "empty",
    "cost", "crop", "contrastive",
}


class Network:
    def __init__(self, model: Model, bn_eps: float = DARKNET_BN_EPS):
        self.model = model
        self.graph = model.graph
        self.bn_eps = bn_eps
        for layer in self.graph:
            if layer.type not in INFERENCE_TYPES:
                raise DarkpruneError(f"{layer.where()}: the darkprune engine does not run [{layer.section.header}] "
                                     f"layers (supported: {', '.join(sorted(INFERENCE_TYPES))})")
        self._prepared: dict[int, tuple] = {i: self._prepare(self.graph[i]) for i in range(len(self.graph))}
        consumers = self.graph.consumers()
        # last_use[i] = the last layer that reads layer i's output (the output itself if none)
        self.last_use = {i: max(consumers.get(i, [i])) for i in range(-1, len(self.graph))}

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
        p = self.model.params.get(layer.index, {})
        if layer.type == "convolutional":
            a = layer.attrs
            src = p if a["share"] is None else self.model.params[a["share"]]
            w, b = src["weights"], src["biases"]
            if a["batch_normalize"]:
                w, b = conv.fold_batchnorm(w, b, src["scales"], src["rolling_mean"], src["rolling_variance"],
                                           self.bn_eps)
            # Darknet pads a dilated conv by pad*dilation (im2col_cpu_ext), so "same" convs stay "same".
            # A plan keeps the re-laid-out filters (and Winograd transforms) and fuses bias + activation
            plan = conv.prepare_conv2d(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32),
                                       a["stride_x"], a["stride_y"], a["pad"] * a["dilation"], a["dilation"],
                                       a["groups"],
                                       activation=a["activation"])
            return (plan,)
        if layer.type == "connected":
            w, b = p["weights"], p["biases"]
            if layer.attrs["batch_normalize"]:
                scale = p["scales"] / np.sqrt(p["rolling_variance"] + self.bn_eps)
                w = w * scale[:, None]
                # Darknet's connected BN normalises W.x, scales it, then adds the bias
                b = b - p["rolling_mean"] * scale
            return (np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32))
        if layer.type == "batchnorm":
            c = layer.in_shape[0]
            bias = p.get("biases", np.zeros(c, np.float32))
            scale = p["scales"] / np.sqrt(p["rolling_variance"] + self.bn_eps)
            shift = bias - p["rolling_mean"] * scale
            return (scale.astype(np.float32), shift.astype(np.float32))
        if layer.type == "shortcut" and layer.attrs["nweights"]:
            return (np.ascontiguousarray(p["weights"], np.float32),)
        return ()

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
        result: dict[int, np.ndarray] = {}
        last = max(wanted) if wanted else len(self.graph) - 1
        for layer in self.graph.layers[start:last + 1]:
            try:
                ins = [acts[i] for i in layer.inputs]
            except KeyError as missing:
                raise DarkpruneError(f"layer {layer.index}: input from layer {missing} is not available "
                                     f"(resume from layer {start} needs {self.frontier(start)})") from None
            out = self._run(layer, ins)
            acts[layer.index] = out
            if layer.index in wanted:
                result[layer.index] = out
            for i in set(layer.inputs):
                if self.last_use.get(i, -2) <= layer.index and i not in wanted:
                    acts.pop(i, None)
        return result

    def _run(self, layer: Layer, ins: list[np.ndarray]) -> np.ndarray:
        a = layer.attrs
        t = layer.type
        prep = self._prepared[layer.index]
        x = ins[0]
        if t == "convolutional":
            return prep[0].forward(x)
        if t == "connected":
            w, b = prep
            y = np.matmul(x.reshape(x.shape[0], -1), w.T)
            y += b
            return activations.activate_(np.ascontiguousarray(y).reshape(x.shape[0], -1, 1, 1), a["activation"])
        if t == "maxpool":
            if a["maxpool_depth"]:
                return pool.maxpool_depth_forward(x, a["out_channels"])
            return pool.maxpool_forward(x, a["size"], a["stride_x"], a["stride_y"], a["padding"])
        if t == "local_avgpool":
            return pool.local_avgpool_forward(x, a["size"], a["stride_x"], a["stride_y"], a["padding"])
        if t == "avgpool":
            return pool.avgpool_forward(x)
        if t == "route":
            return route.route_forward(ins, a["groups"], a["group_id"])
        if t == "shortcut":
            weights = prep[0] if prep else None
            y = shortcut.shortcut_forward(x, ins[1:], weights, a["weights_type"], a["weights_normalization"])
            return activations.activate_(y, a["activation"])
        if t == "upsample":
            return upsample.upsample_forward(x, a["stride"], a["scale"])
        if t == "reorg":
            return reorg.reorg_forward(x, a["stride"], bool(a["reverse"]))
        if t == "reorg3d":
            return reorg.reorg3d_forward(x, a["stride"], bool(a["reverse"]))
        if t == "softmax":
            return softmax.softmax_forward(x, a["groups"], a["temperature"], bool(a["spatial"]))
        if t in ("dropout", "empty", "cost", "contrastive"):
            return x
        if t == "activation":
            return activations.activate_(x.copy(), a["activation"])
        if t == "batchnorm":
            scale, shift = prep
            return (x * scale[None, :, None, None] + shift[None, :, None, None]).astype(np.float32)
        if t == "scale_channels":
            y = scale_channels.scale_channels_forward(x, ins[1], bool(a["scale_wh"]))
            return activations.activate_(y, a["activation"])
        if t == "sam":
            y = sam.sam_forward(x, ins[1])
            return activations.activate_(y, a["activation"])
        if t == "yolo":
            return yolo.yolo_forward(x, len(a["mask"]), a["classes"], a["scale_x_y"], a["new_coords"])
        if t == "region":
            return yolo.region_forward(x, a["num"], a["classes"], a["coords"], bool(a["softmax"]))
        if t == "crop":
            return crop_kernels.crop_forward(x, a["crop_height"], a["crop_width"], bool(a["noadjust"]))[0]
        raise DarkpruneError(f"{layer.where()}: no forward pass for [{layer.section.header}]")


def run(model: Model, x: np.ndarray, outputs: list[int] | None = None, bn_eps: float = DARKNET_BN_EPS):
    """One-shot convenience: Network(model).forward(x)."""
    return Network(model, bn_eps).forward(x, outputs)
