"""The training-mode network runner: a forward pass that keeps what the backward pass needs, and the backward pass
through the layer graph, accumulating a gradient for every trainable parameter.

`Network` (engine/network.py) is the inference runner: it folds batch norm into the filters and frees activations
early. Training cannot do either: batch norm runs on the batch's own statistics (and updates the rolling mean and
variance as Darknet does), and every activation a layer's backward reads must stay alive until then. So:

    net = TrainingNetwork(model)                 # uses model.params in place (the optimizer updates them)
    net.forward(x)                               # x (N, C, H, W); train=True: batch statistics, dropout, random crop
    net.backward({layer: dL/d(output of layer)}) # gradients of everything before those layers
    net.gradients()                              # {layer: {"weights": ..., "biases": ..., "scales": ...}}

or, with the loss of the network's own heads, `net.loss_and_gradients(TrainBatch(...))`.

What each layer keeps from its forward: the input (a reference to its producer's output), batch-norm's normalised
values and batch statistics, maxpool's argmax, dropout's mask, crop's offsets, the activation's input where its
derivative cannot be read off the output (leaky, relu, linear and logistic can: their output has the input's sign, or
gives the derivative itself, so those layers keep one array, not two).

Backward runs the layers in reverse. A layer read by several consumers (a route's member, a shortcut's `from`, an SE
block's feature map) gets the sum of their gradients. Gradient conventions: true gradients (param -= lr * grad
descends), summed over the batch (the optimizer divides by the batch, as Darknet's update does).

Losses (see train/losses.py and train/yolo_loss.py for the exact definitions and their Darknet conventions):
- detectors: each [yolo] head's loss (yolo_loss) or [region] head's (region_loss); their gradient is w.r.t. the
  head's raw input, which is what Darknet's heads pass back too, so it is seeded at the layer feeding the head;
- classifiers: softmax cross-entropy of the last [softmax] layer (seeded at its input, the logits: Darknet's softmax
  passes `truth - p` back as is), plus a [cost] layer if the cfg has one (after a softmax its delta is added to the
  same logits, as Darknet does; otherwise it is seeded at the cost layer's input).
The reported cost is Darknet's: the mean of the per-layer costs (get_network_cost).

Darknet options honoured: a layer's `stopbackward=1` (no backward for it and every layer before it; `stopbackward=N`
for the first N-1 iterations), batch-norm rolling statistics momentum `bn_momentum` (default 0.01: pjreddie's darknet
and AlexeyAB's GPU training; AlexeyAB's CPU-only build uses 0.1, which finetune.py uses by default). Not trainable
here: `xnor=1` binary convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from ..darknet.graph import Layer
from ..darknet.heads import DECODED_HEAD_TYPES
from ..darknet.layer_types import layer_type, weights_owner
from ..darknet.model import Model
from ..engine import activations
from ..engine.batchnorm import (DARKNET_MOMENTUM, batchnorm_backward_inference, batchnorm_backward_train,
                                batchnorm_forward_inference, batchnorm_forward_train)
from ..engine.blas import limit_threads
from ..engine.layer_ops import FROM_OUTPUT
from ..errors import DarkpruneError
from . import losses
from .yolo_loss import region_loss, yolo_loss

HEAD_TYPES = DECODED_HEAD_TYPES   # the heads with a loss and a backward

# Layers whose work (values in and out, times the filter size for convolutions) is below this run on one thread.
SMALL_LAYER_WORK = 1 << 16

# Trainable parameter names per layer type, and whether Darknet applies weight decay to them.
DECAYED = {"weights"}


@dataclass
class TrainBatch:
    """One (mini-)batch for `loss_and_gradients`: the network inputs and the ground truth.

    images: (N, C, H, W) float, the network input. Detection: `truths` = per image a (k, 5) array of rows
    (class, cx, cy, w, h), normalised. Classification: `labels` = (N,) class indices (-1: unlabeled).
    `labeled`: None (every image has ground truth), or (N,) bool: the images the task loss is computed on (the
    others, e.g. without a label file when a teacher distils, get none)."""
    images: np.ndarray
    truths: list | None = None
    labels: np.ndarray | None = None
    labeled: np.ndarray | None = None


@dataclass
class LossOutput:
    """What one loss_and_gradients call measured.

    cost: Darknet's network cost of this batch (mean over the layers that have a cost of their `*l.cost`, a sum
    over the batch's images); layer_costs: {layer index: cost}; seeds: the gradients fed to backward
    ({layer: dL/d(its output)}); stats: per head, yolo_loss's statistics (avg IoU, recall, ...); loss: the
    classifier's cross-entropy (the objective its gradient belongs to), None for detectors."""
    cost: float
    layer_costs: dict[int, float]
    seeds: dict[int, np.ndarray]
    stats: dict[int, dict] = field(default_factory=dict)
    loss: float | None = None


def trainable_parameters(model: Model) -> list[tuple[int, str, bool]]:
    """Every (layer index, array name, decayed) the optimizer updates, in layer order (rolling statistics are not
    trained; the layer-type table says which arrays are)."""
    return [(layer.index, name, name in DECAYED) for layer in model.graph
            for name in layer_type(layer).trainable_arrays(layer)]


class LayerSteps:
    """The steps layers share inside one training pass, which the engine's per-type forward and backward
    (engine/layer_ops.py) call back into: the activation (keeping its input only when its derivative needs it),
    batch norm on batch or rolling statistics, and recording parameter gradients."""

    dtype: np.dtype
    bn_momentum: float
    train: bool = True

    def _reset_pass(self) -> None:
        self._acts: dict[int, np.ndarray] = {}
        self._saved: dict[int, tuple] = {}
        self._pre: dict[int, np.ndarray] = {}
        self._current = -1

    def activate(self, y: np.ndarray, act: str, already: bool) -> np.ndarray:
        """Apply `act` in place (unless the conv already fused it). The pre-activation is kept (in self._pre, for
        the layer being run) only when the derivative needs it."""
        if act not in FROM_OUTPUT:
            self._pre[self._current] = y.copy()
            activations.activate_(y, act)
        elif not already:
            activations.activate_(y, act)
        return y

    def bn_forward(self, z: np.ndarray, p: dict, copy: bool = False):
        """Batch norm on z (in place unless copy): batch statistics in training, rolling ones otherwise."""
        c = z.shape[1]
        biases = p["biases"] if "biases" in p else np.zeros(c, self.dtype)
        if self.train:
            out = None if copy else z
            y, cache = batchnorm_forward_train(z, p["scales"], biases, p["rolling_mean"], p["rolling_variance"],
                                               momentum=self.bn_momentum, out=out)
            return y, ("train", cache)
        y = batchnorm_forward_inference(z, p["scales"], biases, p["rolling_mean"], p["rolling_variance"])
        return y, ("inference", z if copy else z.copy())

    def act_backward(self, index: int, g: np.ndarray, act: str) -> np.ndarray:
        """dL/d(pre-activation) of layer `index` from dL/d(its output), in place in g (owned by the caller)."""
        if act == "linear":
            return g
        g = np.ascontiguousarray(g)
        out = self._acts[index]
        x_in = out if act in FROM_OUTPUT else self._pre[index]
        return activations.activation_backward(x_in, out, g, act, out=g)

    def bn_backward(self, saved, g: np.ndarray, p: dict):
        mode, state = saved
        if mode == "train":
            return batchnorm_backward_train(g, state, p["scales"])
        return batchnorm_backward_inference(g, state, p["scales"], p["rolling_mean"], p["rolling_variance"])

    def record(self, index: int, grads: dict[str, np.ndarray]) -> None:
        mine = self._grads.setdefault(index, {})
        for name, value in grads.items():
            value = np.ascontiguousarray(value, dtype=self.dtype)
            if name in mine:
                mine[name] = mine[name] + value       # a shared (share_index) conv: both users' gradients
            else:
                mine[name] = value


class _GradientSum:
    """dL/d(output) per layer, summed over the layer's readers as backward reaches them. Arrays handed over by the
    layer kernels are owned and summed into in place; a caller's seed is copied before anything is added to it."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.grads: dict[int, np.ndarray] = {}
        self.owned: set[int] = set()

    def add(self, index: int, g: np.ndarray, take: bool = False) -> None:
        if index < 0:
            return
        g = np.asarray(g)
        if g.dtype != self.dtype:
            g = g.astype(self.dtype)
            take = True
        grads, owned = self.grads, self.owned
        if index not in grads:
            grads[index] = g
            if take:
                owned.add(index)
        elif index in owned:
            grads[index] += g
        else:
            grads[index] = grads[index] + g
            owned.add(index)

    def take(self, index: int) -> np.ndarray | None:
        """The finished sum for `index` (every reader has run), as an array the caller may modify."""
        g = self.grads.pop(index, None)
        if g is not None and index not in self.owned:
            g = g.copy()
        return g


class TrainingNetwork(LayerSteps):
    """Forward (training or inference mode) and backward over a Model's layer graph; see the module doc. Each
    layer's forward and backward are its type's (engine/layer_ops.py), found through the layer-type table.

    dtype: float32 (training) or float64 (gradient checks). The model's parameter arrays are used in place; any
    not of `dtype` (or not C-contiguous) is replaced in `model.params` by a converted copy. `seed` seeds the
    Generator used by dropout and [crop] in training mode (forward(..., rng=) overrides it for one call)."""

    def __init__(self, model: Model, dtype=np.float32, bn_momentum: float = DARKNET_MOMENTUM, seed: int = 0):
        self.model = model
        self.graph = model.graph
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        self.bn_momentum = float(bn_momentum)
        self.rng = np.random.default_rng(seed)
        self._max_threads = numba.get_num_threads()
        for layer in self.graph:
            if layer_type(layer).engine is None:
                raise DarkpruneError(f"{layer.where()}: the darkprune engine does not run [{layer.section.header}] "
                                     f"layers")
            if layer.attrs.get("xnor"):
                raise DarkpruneError(f"{layer.where()}: xnor=1 (binary) convolutions cannot be trained by darkprune")
        for index, arrays in model.params.items():
            for name, arr in list(arrays.items()):
                if arr.dtype != self.dtype or not arr.flags.c_contiguous:
                    arrays[name] = np.ascontiguousarray(arr, dtype=self.dtype)
        self.stop_backward = {layer.index: layer.section.get_int("stopbackward", 0) for layer in self.graph
                              if layer.section.get_int("stopbackward", 0)}
        self._reset_pass()
        self._grads: dict[int, dict[str, np.ndarray]] = {}
        self.train = True

    # -- parameters ---------------------------------------------------------------------------------------------
    def _params(self, layer: Layer) -> dict:
        return self.model.params.get(weights_owner(layer), {})

    def trainable(self) -> list[tuple[int, str, bool]]:
        return trainable_parameters(self.model)

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, train: bool = True, rng: np.random.Generator | None = None,
                outputs: list[int] | None = None) -> dict[int, np.ndarray]:
        """Run every layer on x (N, C, H, W), keeping what backward needs. train=True: batch-norm on batch
        statistics (rolling statistics updated in place), dropout and [crop] randomness from `rng` (default: the
        network's Generator); train=False: inference behaviour (the gradient then treats the rolling statistics
        as constants). Returns {layer: output} for `outputs` (default: the graph's output layers)."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:]) != self.graph.input_shape:
            raise DarkpruneError(f"input batch has shape {tuple(x.shape[1:])}, the network expects "
                                 f"{self.graph.input_shape} (channels, height, width)")
        self.train = bool(train)
        rng = self.rng if rng is None else rng
        self._reset_pass()
        self._acts[-1] = x
        for layer in self.graph:
            self._current = layer.index
            ins = [self._acts[i] for i in layer.inputs]
            with limit_threads(self._threads(layer, x.shape[0])):
                out, saved = layer_type(layer).engine.forward(self, layer, ins, self._params(layer), rng)
            self._acts[layer.index] = out
            self._saved[layer.index] = saved
        wanted = self.graph.output_layers() if outputs is None else outputs
        return {i: self._acts[i] for i in wanted}

    def _threads(self, layer: Layer, batch: int) -> int:
        """One thread for small layers: a parallel region's wake-up costs more than their work (milliseconds on a
        busy machine); the kernels' own thresholds decide beyond that."""
        c, h, w = layer.out_shape
        ic, ih, iw = layer.in_shape
        work = batch * (c * h * w + ic * ih * iw)
        factor = layer_type(layer).engine.work
        if factor is not None:
            work *= factor(layer)
        return 1 if work < SMALL_LAYER_WORK else self._max_threads

    def output(self, index: int) -> np.ndarray:
        """Layer `index`'s output from the last forward (-1: the input)."""
        return self._acts[index]

    # -- backward -----------------------------------------------------------------------------------------------
    def backward(self, output_grads: dict[int, np.ndarray], iteration: int | None = None) -> None:
        """Backpropagate {layer index: dL/d(output of that layer)} (arrays of the outputs' shapes) through every
        layer, computing the parameter gradients of this pass (see gradients()). `iteration` (1-based) is used
        by `stopbackward=N` layers. The activations of the forward pass are released as it goes (call forward
        again before another backward)."""
        if not self._acts:
            raise DarkpruneError("backward() needs a forward() first")
        grads = _GradientSum(self.dtype)
        for index, g in output_grads.items():
            out = self._acts[int(index)]
            g = np.asarray(g)
            if g.shape != out.shape:
                raise ValueError(f"gradient for layer {index} has shape {g.shape}, its output {out.shape}")
            grads.add(int(index), g)
        stop = self._stop_layer(iteration)
        self._grads = {}
        for layer in reversed(self.graph.layers):
            i = layer.index
            if i <= stop:
                break
            g = grads.take(i)
            if g is None:
                continue
            ins = [self._acts[k] for k in layer.inputs]
            with limit_threads(self._threads(layer, g.shape[0])):
                for src, gin in layer_type(layer).engine.backward(self, layer, g, self._saved[i], ins,
                                                                  self._acts[i], self._params(layer)):
                    grads.add(src, gin, take=True)
            # every reader of this output came later in the graph and is done: free what only backward needed
            self._acts.pop(i, None)
            self._saved.pop(i, None)
            self._pre.pop(i, None)
        self._reset_pass()

    def _stop_layer(self, iteration: int | None) -> int:
        """The last layer backward does not reach (-1: none): the latest `stopbackward` in force."""
        stop = -1
        for index, value in self.stop_backward.items():
            if value == 1 or (iteration is not None and value > iteration):
                stop = max(stop, index)
        return stop

    def gradients(self) -> dict[int, dict[str, np.ndarray]]:
        """Parameter gradients of the last backward: {layer index: {name: dL/dparam}}, for every trainable array
        (zeros where no gradient reached the layer)."""
        out: dict[int, dict[str, np.ndarray]] = {}
        for index, name, _ in self.trainable():
            got = self._grads.get(index, {}).get(name)
            if got is None:
                got = np.zeros_like(self.model.params[index][name])
            out.setdefault(index, {})[name] = got
        return out

    # -- losses -------------------------------------------------------------------------------------------------
    def loss_and_gradients(self, batch: TrainBatch, train: bool = True, rng: np.random.Generator | None = None,
                           seen: int = 0, iteration: int | None = None) -> LossOutput:
        """forward + the network's loss + backward. Detectors need batch.truths, classifiers batch.labels.
        `seen`: images trained on so far including this batch ([region]'s warm-up rule)."""
        self.forward(batch.images, train=train, rng=rng, outputs=[])
        if any(layer.type in HEAD_TYPES for layer in self.graph):
            if batch.truths is None:
                raise DarkpruneError("a detector's training batch needs truths (boxes per image)")
            result = detector_loss(self, batch.truths, seen)
        else:
            if batch.labels is None:
                raise DarkpruneError("a classifier's training batch needs labels")
            result = classifier_loss(self, batch.labels)
        self.backward(result.seeds, iteration)
        return result


# ---------------------------------------------------------------------------------------------------------------
# losses at the heads

def detector_loss(net: TrainingNetwork, truths, seen: int = 0) -> LossOutput:
    """The [yolo]/[region] losses of the last forward; gradients seeded at each head's input layer."""
    graph = net.graph
    seeds: dict[int, np.ndarray] = {}
    costs: dict[int, float] = {}
    stats: dict[int, dict] = {}
    for layer in graph:
        if layer.type not in HEAD_TYPES:
            continue
        raw = net.output(layer.inputs[0])
        if layer.type == "yolo":
            result = yolo_loss(raw, truths, layer, graph.net["width"], graph.net["height"])
        else:
            result = region_loss(raw, truths, layer, seen)
        src = layer.inputs[0]
        seeds[src] = seeds[src] + result.grad if src in seeds else result.grad
        costs[layer.index] = result.cost
        stats[layer.index] = result.stats
    return LossOutput(losses.network_cost(list(costs.values())), costs, seeds, stats)


def _classifier_layers(graph):
    softmaxes = [layer for layer in graph if layer.type == "softmax"]
    costs = [layer for layer in graph if layer.type == "cost"]
    return (softmaxes[-1] if softmaxes else None), (costs[-1] if costs else None)


def classifier_loss(net: TrainingNetwork, labels) -> LossOutput:
    """Softmax cross-entropy (+ [cost]) of the last forward; see the module doc for where gradients are seeded."""
    graph = net.graph
    soft, cost = _classifier_layers(graph)
    if soft is None and cost is None:
        raise DarkpruneError(f"{graph.cfg.path}: the network has no [softmax], [cost], [yolo] or [region] layer, "
                             f"so there is no loss to train it with")
    eps = graph.cfg.net.get_float("label_smooth_eps", 0.0)
    labels = np.asarray(labels)
    seeds: dict[int, np.ndarray] = {}
    costs: dict[int, float] = {}
    loss = None
    truth = None
    if soft is not None:
        a = soft.attrs
        logits = net.output(soft.inputs[0])
        n = logits.shape[0]
        if a["spatial"]:
            raise DarkpruneError(f"{soft.where()}: spatial softmax has no classifier loss here")
        if labels.ndim == 1 and a["groups"] == 1:
            truth = losses.smoothed_targets(labels, int(np.prod(logits.shape[1:])), eps, net.dtype)
        else:
            truth = labels.astype(net.dtype).reshape(n, -1)
        result = losses.softmax_cross_entropy(logits, truth.reshape(logits.shape), temperature=a["temperature"],
                                              groups=a["groups"])
        seeds[soft.inputs[0]] = result.grad.reshape(logits.shape)
        costs[soft.index] = result.darknet_cost
        loss = result.loss
    if cost is not None:
        src = cost.inputs[0]
        pred = net.output(src)
        n = pred.shape[0]
        if truth is None:
            truth = losses.smoothed_targets(labels, int(np.prod(pred.shape[1:])), eps, net.dtype) \
                if labels.ndim == 1 else labels.astype(net.dtype)
        result = losses.cost_layer(pred, truth.reshape(pred.shape), cost.attrs["cost_type"], cost.attrs["scale"])
        # Darknet: the cost's delta goes into the softmax's delta, which the softmax passes on to its input as is
        target = soft.inputs[0] if (soft is not None and src == soft.index) else src
        g = result.grad.reshape(net.output(target).shape)
        seeds[target] = seeds[target] + g if target in seeds else g
        costs[cost.index] = result.darknet_cost
    return LossOutput(losses.network_cost(list(costs.values())), costs, seeds, {}, loss)
