"""The engine's half of the layer-type table: per Darknet layer type, how its parameters are prepared for inference,
its inference forward, its training forward and its backward, attached to the type's entry in
darkprune/darknet/layer_types.py (`LAYER_TYPES[name].engine`). The runners (engine/network.py for inference,
train/backprop.py for training) are plain loops over the layers that call these; neither branches on type names.

The kernels themselves live in one module per type (conv.py, pool.py, route.py, ...); the functions here only say
which kernel a layer calls with which of its attributes, and what its backward needs kept from the forward.

Signatures (all optional but `infer`):
- `prepare(net, layer, p)` -> tuple: parameters ready for inference (batch norm folded with `net.bn_eps`); p is the
  layer's own arrays ({} for none);
- `infer(layer, prep, ins)` -> output: `ins` are the outputs of `layer.inputs`, in order;
- `forward(run, layer, ins, p, rng)` -> (output, saved): training-mode forward; `run` is the training runner
  (train/backprop.py), which supplies `train` (batch statistics or rolling ones), `dtype`, `bn_momentum` and the
  shared steps `activate`, `bn_forward`; p are the arrays the layer computes with (a shared conv's owner's);
- `backward(run, layer, g, saved, ins, out, p)` -> iterable of (producer index, dL/d(producer output)), with the
  parameter gradients handed to `run.record`; `run.act_backward` and `run.bn_backward` undo the shared steps;
- `work(layer)` -> the factor by which the layer's work exceeds its values in and out (a conv's filter size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..darknet.layer_types import LAYER_TYPES
from . import activations, conv, pool, reorg, route, sam, scale_channels, shortcut, softmax, upsample, yolo
from . import crop as crop_kernels
from . import dropout as dropout_kernels
from .batchnorm import batchnorm_backward_inference, batchnorm_forward_inference
from .connected import connected_backward, connected_forward_train

# Activations whose derivative can be computed from the output alone (passed as the "input" to the backward):
# leaky/relu keep the input's sign, logistic's derivative is y(1-y), linear's is 1.
FROM_OUTPUT = {"linear", "leaky", "revleaky", "relu", "logistic"}


@dataclass
class EngineOps:
    infer: Callable
    forward: Callable
    backward: Callable
    prepare: Callable | None = None
    work: Callable | None = None
    # `into(layer, prep, ins, alloc)` -> output: infer writing into `alloc(shape)` (the runner's buffer pool)
    into: Callable | None = None


def _identity_infer(layer, prep, ins):
    return ins[0]


def _identity_forward(run, layer, ins, p, rng):
    return ins[0], ()


def _identity_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], g


# -- convolutional ---------------------------------------------------------------------------------------------------
def _conv_prepare(net, layer, p):
    a = layer.attrs
    src = p if a["share"] is None else net.model.params[a["share"]]
    w, b = src["weights"], src["biases"]
    if a["batch_normalize"]:
        w, b = conv.fold_batchnorm(w, b, src["scales"], src["rolling_mean"], src["rolling_variance"], net.bn_eps)
    # Darknet pads a dilated conv by pad*dilation (im2col_cpu_ext), so "same" convs stay "same".
    # A plan keeps the re-laid-out filters (and Winograd transforms) and fuses bias + activation
    plan = conv.prepare_conv2d(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32),
                               a["stride_x"], a["stride_y"], a["pad"] * a["dilation"], a["dilation"], a["groups"],
                               activation=a["activation"])
    return (plan,)


def _conv_infer(layer, prep, ins):
    return prep[0].forward(ins[0])


def _conv_into(layer, prep, ins, alloc):
    plan = prep[0]
    return plan.forward(ins[0], out=alloc(plan.output_shape(ins[0].shape)))


def _conv_forward(run, layer, ins, p, rng):
    a = layer.attrs
    act = a["activation"]
    fused = act if (act in FROM_OUTPUT and not a["batch_normalize"]) else "linear"
    bias = p["biases"] if not a["batch_normalize"] else np.zeros(a["filters"], run.dtype)
    plan = conv.prepare_conv2d(p["weights"], bias, a["stride_x"], a["stride_y"], a["pad"] * a["dilation"],
                               a["dilation"], a["groups"], activation=fused)
    z = plan.forward(ins[0], out_h=layer.out_shape[1], out_w=layer.out_shape[2])
    bn = None
    if a["batch_normalize"]:
        z, bn = run.bn_forward(z, p)
    return run.activate(z, act, fused != "linear"), (bn,)


def _conv_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    g = run.act_backward(layer.index, g, a["activation"])
    grads = {}
    if a["batch_normalize"]:
        g, grads["scales"], grads["biases"] = run.bn_backward(saved[0], g, p)
    gx, gw, gb = conv.conv2d_backward(ins[0], p["weights"], g, a["stride_x"], a["stride_y"], a["pad"] * a["dilation"],
                                      a["dilation"], a["groups"], need_grad_x=layer.inputs[0] >= 0)
    grads["weights"] = gw
    if not a["batch_normalize"]:
        grads["biases"] = gb
    run.record(a["share"] if a["share"] is not None else layer.index, grads)
    if gx is not None:
        yield layer.inputs[0], gx


def _conv_work(layer):
    a = layer.attrs
    return a["size"] ** 2 * max(1, layer.in_shape[0] // a["groups"]) // 4 + 1


# -- connected -------------------------------------------------------------------------------------------------------
def _connected_prepare(net, layer, p):
    w, b = p["weights"], p["biases"]
    if layer.attrs["batch_normalize"]:
        scale = p["scales"] / np.sqrt(p["rolling_variance"] + net.bn_eps)
        w = w * scale[:, None]
        # Darknet's connected BN normalises W.x, scales it, then adds the bias
        b = b - p["rolling_mean"] * scale
    return (np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32))


def _connected_infer(layer, prep, ins):
    x = ins[0]
    w, b = prep
    y = np.matmul(x.reshape(x.shape[0], -1), w.T)
    y += b
    return activations.activate_(np.ascontiguousarray(y).reshape(x.shape[0], -1, 1, 1), layer.attrs["activation"])


def _connected_forward(run, layer, ins, p, rng):
    a = layer.attrs
    x = ins[0]
    n = x.shape[0]
    if run.train or not a["batch_normalize"]:
        bn_args = (p["scales"], p["rolling_mean"], p["rolling_variance"]) if a["batch_normalize"] else ()
        y, cache = connected_forward_train(x, p["weights"], p["biases"], *bn_args, momentum=run.bn_momentum,
                                           update_rolling=run.train)
        saved = (cache, None)
    else:
        z = np.matmul(x.reshape(n, -1), p["weights"].T.astype(run.dtype, copy=False))
        y = batchnorm_forward_inference(z, p["scales"], p["biases"], p["rolling_mean"], p["rolling_variance"])
        saved = (None, z)
    y = np.ascontiguousarray(y).reshape(n, -1, 1, 1)
    return run.activate(y, a["activation"], False), saved


def _connected_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    x = ins[0]
    first = layer.inputs[0] < 0
    g = run.act_backward(layer.index, g, a["activation"])
    n = g.shape[0]
    g2 = np.ascontiguousarray(g.reshape(n, -1))
    cache, z = saved
    if cache is not None:
        gx, gw, gb, gs = connected_backward(g2, p["weights"], cache, p["scales"] if a["batch_normalize"] else None,
                                            need_grad_x=not first)
    else:
        gz, gs, gb = batchnorm_backward_inference(g2, z, p["scales"], p["rolling_mean"], p["rolling_variance"])
        gw = gz.T @ x.reshape(n, -1)
        gx = (gz @ p["weights"]).reshape(x.shape) if not first else None
    grads = {"weights": gw, "biases": gb}
    if a["batch_normalize"]:
        grads["scales"] = gs
    run.record(layer.index, grads)
    if gx is not None:
        yield layer.inputs[0], gx


# -- batchnorm -------------------------------------------------------------------------------------------------------
def _batchnorm_prepare(net, layer, p):
    c = layer.in_shape[0]
    bias = p.get("biases", np.zeros(c, np.float32))
    scale = p["scales"] / np.sqrt(p["rolling_variance"] + net.bn_eps)
    shift = bias - p["rolling_mean"] * scale
    return (scale.astype(np.float32), shift.astype(np.float32))


def _batchnorm_infer(layer, prep, ins):
    scale, shift = prep
    return (ins[0] * scale[None, :, None, None] + shift[None, :, None, None]).astype(np.float32)


def _batchnorm_forward(run, layer, ins, p, rng):
    return run.bn_forward(ins[0], p, copy=True)


def _batchnorm_backward(run, layer, g, saved, ins, out, p):
    gx, gs, gb = run.bn_backward(saved, g, p)
    grads = {"scales": gs}
    if "biases" in p:
        grads["biases"] = gb
    run.record(layer.index, grads)
    yield layer.inputs[0], gx


# -- pooling ---------------------------------------------------------------------------------------------------------
def _maxpool_infer(layer, prep, ins):
    a = layer.attrs
    if a["maxpool_depth"]:
        return pool.maxpool_depth_forward(ins[0], a["out_channels"])
    return pool.maxpool_forward(ins[0], a["size"], a["stride_x"], a["stride_y"], a["padding"])


def _maxpool_into(layer, prep, ins, alloc):
    a = layer.attrs
    if a["maxpool_depth"]:
        return _maxpool_infer(layer, prep, ins)
    n, c, h, w = ins[0].shape
    shape = (n, c) + pool.pool_output_hw(h, w, a["size"], a["stride_x"], a["stride_y"], a["padding"])
    if min(shape) < 1:
        return _maxpool_infer(layer, prep, ins)   # its own error message
    return pool.maxpool_forward(ins[0], a["size"], a["stride_x"], a["stride_y"], a["padding"], out=alloc(shape))


def _maxpool_forward(run, layer, ins, p, rng):
    a = layer.attrs
    if a["maxpool_depth"]:
        y, idx = pool.maxpool_depth_forward(ins[0], a["out_channels"], return_indices=True)
    else:
        y, idx = pool.maxpool_forward(ins[0], a["size"], a["stride_x"], a["stride_y"], a["padding"],
                                      return_indices=True)
    return y, (idx,)


def _maxpool_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], pool.maxpool_backward(g, saved[0], ins[0].shape)


def _local_avgpool_infer(layer, prep, ins):
    a = layer.attrs
    return pool.local_avgpool_forward(ins[0], a["size"], a["stride_x"], a["stride_y"], a["padding"])


def _local_avgpool_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    yield layer.inputs[0], pool.local_avgpool_backward(g, ins[0].shape, a["size"], a["stride_x"], a["stride_y"],
                                                       a["padding"])


def _avgpool_infer(layer, prep, ins):
    return pool.avgpool_forward(ins[0])


def _avgpool_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], pool.avgpool_backward(g, ins[0].shape)


# -- routing and combining -------------------------------------------------------------------------------------------
def _route_infer(layer, prep, ins):
    return route.route_forward(ins, layer.attrs["groups"], layer.attrs["group_id"])


def _route_into(layer, prep, ins, alloc):
    a = layer.attrs
    shape = route.route_output_shape([v.shape for v in ins], a["groups"], a["group_id"])
    return route.route_forward(ins, a["groups"], a["group_id"], out=alloc(shape))


def _route_backward(run, layer, g, saved, ins, out, p):
    parts = route.route_backward(g, [v.shape for v in ins], layer.attrs["groups"], layer.attrs["group_id"])
    yield from zip(layer.inputs, parts)


def _shortcut_prepare(net, layer, p):
    return (np.ascontiguousarray(p["weights"], np.float32),) if layer.attrs["nweights"] else ()


def _shortcut_infer(layer, prep, ins):
    a = layer.attrs
    weights = prep[0] if prep else None
    y = shortcut.shortcut_forward(ins[0], ins[1:], weights, a["weights_type"], a["weights_normalization"])
    return activations.activate_(y, a["activation"])


def _shortcut_into(layer, prep, ins, alloc):
    a = layer.attrs
    weights = prep[0] if prep else None
    y = shortcut.shortcut_forward(ins[0], ins[1:], weights, a["weights_type"], a["weights_normalization"],
                                  out=alloc(ins[0].shape))
    return activations.activate_(y, a["activation"])


def _shortcut_forward(run, layer, ins, p, rng):
    a = layer.attrs
    weights = p.get("weights") if a["nweights"] else None
    y = shortcut.shortcut_forward(ins[0], ins[1:], weights, a["weights_type"], a["weights_normalization"])
    return run.activate(y, a["activation"], False), ()


def _shortcut_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    g = run.act_backward(layer.index, g, a["activation"])
    weights = p.get("weights") if a["nweights"] else None
    gp, gfs, gw = shortcut.shortcut_backward(g, ins[0], ins[1:], weights, a["weights_type"],
                                             a["weights_normalization"])
    if gw is not None:
        run.record(layer.index, {"weights": gw})
    yield layer.inputs[0], gp
    yield from zip(layer.inputs[1:], gfs)


def _scale_channels_infer(layer, prep, ins):
    y = scale_channels.scale_channels_forward(ins[0], ins[1], bool(layer.attrs["scale_wh"]))
    return activations.activate_(y, layer.attrs["activation"])


def _scale_channels_forward(run, layer, ins, p, rng):
    y = scale_channels.scale_channels_forward(ins[0], ins[1], bool(layer.attrs["scale_wh"]))
    return run.activate(y, layer.attrs["activation"], False), ()


def _scale_channels_backward(run, layer, g, saved, ins, out, p):
    g = run.act_backward(layer.index, g, layer.attrs["activation"])
    gp, gf = scale_channels.scale_channels_backward(g, ins[0], ins[1], bool(layer.attrs["scale_wh"]))
    yield layer.inputs[0], gp
    yield layer.inputs[1], gf


def _sam_infer(layer, prep, ins):
    return activations.activate_(sam.sam_forward(ins[0], ins[1]), layer.attrs["activation"])


def _sam_forward(run, layer, ins, p, rng):
    return run.activate(sam.sam_forward(ins[0], ins[1]), layer.attrs["activation"], False), ()


def _sam_backward(run, layer, g, saved, ins, out, p):
    g = run.act_backward(layer.index, g, layer.attrs["activation"])
    gp, gf = sam.sam_backward(g, ins[0], ins[1])
    yield layer.inputs[0], gp
    yield layer.inputs[1], gf


# -- reshaping -------------------------------------------------------------------------------------------------------
def _upsample_infer(layer, prep, ins):
    return upsample.upsample_forward(ins[0], layer.attrs["stride"], layer.attrs["scale"])


def _upsample_into(layer, prep, ins, alloc):
    shape = upsample.upsample_output_shape(ins[0].shape, layer.attrs["stride"])
    return upsample.upsample_forward(ins[0], layer.attrs["stride"], layer.attrs["scale"], out=alloc(shape))


def _upsample_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], upsample.upsample_backward(g, ins[0].shape, layer.attrs["stride"], layer.attrs["scale"])


def _reorg_infer(layer, prep, ins):
    return reorg.reorg_forward(ins[0], layer.attrs["stride"], bool(layer.attrs["reverse"]))


def _reorg_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], reorg.reorg_backward(g, ins[0].shape, layer.attrs["stride"], bool(layer.attrs["reverse"]))


def _reorg3d_infer(layer, prep, ins):
    return reorg.reorg3d_forward(ins[0], layer.attrs["stride"], bool(layer.attrs["reverse"]))


def _reorg3d_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], reorg.reorg3d_backward(g, ins[0].shape, layer.attrs["stride"],
                                                  bool(layer.attrs["reverse"]))


def _crop_infer(layer, prep, ins):
    a = layer.attrs
    return crop_kernels.crop_forward(ins[0], a["crop_height"], a["crop_width"], bool(a["noadjust"]))[0]


def _crop_forward(run, layer, ins, p, rng):
    a = layer.attrs
    y, params = crop_kernels.crop_forward(ins[0], a["crop_height"], a["crop_width"], bool(a["noadjust"]),
                                          bool(a["flip"]), train=run.train, rng=rng)
    return np.ascontiguousarray(y, dtype=run.dtype), (params,)


def _crop_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], crop_kernels.crop_backward(g, ins[0].shape, saved[0], bool(layer.attrs["noadjust"]))


# -- elementwise -----------------------------------------------------------------------------------------------------
def _softmax_infer(layer, prep, ins):
    a = layer.attrs
    return softmax.softmax_forward(ins[0], a["groups"], a["temperature"], bool(a["spatial"]))


def _softmax_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    yield layer.inputs[0], softmax.softmax_backward(g, out, a["groups"], a["temperature"], bool(a["spatial"]))


def _dropout_forward(run, layer, ins, p, rng):
    y, mask = dropout_kernels.dropout_forward(ins[0], layer.attrs["probability"], train=run.train, rng=rng)
    return y, (mask,)


def _dropout_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], dropout_kernels.dropout_backward(g, saved[0])


def _activation_infer(layer, prep, ins):
    return activations.activate_(ins[0].copy(), layer.attrs["activation"])


def _activation_forward(run, layer, ins, p, rng):
    return run.activate(ins[0].copy(), layer.attrs["activation"], False), ()


def _activation_backward(run, layer, g, saved, ins, out, p):
    yield layer.inputs[0], run.act_backward(layer.index, g, layer.attrs["activation"])


# -- heads -----------------------------------------------------------------------------------------------------------
def _yolo_infer(layer, prep, ins):
    a = layer.attrs
    return yolo.yolo_forward(ins[0], len(a["mask"]), a["classes"], a["scale_x_y"], a["new_coords"])


def _yolo_forward(run, layer, ins, p, rng):
    a = layer.attrs
    return yolo.yolo_forward(ins[0], len(a["mask"]), a["classes"], a["scale_x_y"], bool(a["new_coords"])), ()


def _yolo_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    yield layer.inputs[0], yolo.yolo_backward(g, out, len(a["mask"]), a["classes"], a["scale_x_y"],
                                              bool(a["new_coords"]))


def _region_infer(layer, prep, ins):
    a = layer.attrs
    return yolo.region_forward(ins[0], a["num"], a["classes"], a["coords"], bool(a["softmax"]))


def _region_backward(run, layer, g, saved, ins, out, p):
    a = layer.attrs
    yield layer.inputs[0], yolo.region_backward(g, out, a["num"], a["classes"], a["coords"], bool(a["softmax"]))


def _stateless(infer, backward) -> EngineOps:
    """A layer whose training forward is its inference forward and keeps nothing for the backward."""
    return EngineOps(infer, lambda run, layer, ins, p, rng: (infer(layer, (), ins), ()), backward)


_IDENTITY = EngineOps(_identity_infer, _identity_forward, _identity_backward)

ENGINE_OPS = {
    "convolutional": EngineOps(_conv_infer, _conv_forward, _conv_backward, _conv_prepare, _conv_work),
    "connected": EngineOps(_connected_infer, _connected_forward, _connected_backward, _connected_prepare),
    "batchnorm": EngineOps(_batchnorm_infer, _batchnorm_forward, _batchnorm_backward, _batchnorm_prepare),
    "maxpool": EngineOps(_maxpool_infer, _maxpool_forward, _maxpool_backward),
    "local_avgpool": _stateless(_local_avgpool_infer, _local_avgpool_backward),
    "avgpool": _stateless(_avgpool_infer, _avgpool_backward),
    "route": _stateless(_route_infer, _route_backward),
    "shortcut": EngineOps(_shortcut_infer, _shortcut_forward, _shortcut_backward, _shortcut_prepare),
    "scale_channels": EngineOps(_scale_channels_infer, _scale_channels_forward, _scale_channels_backward),
    "sam": EngineOps(_sam_infer, _sam_forward, _sam_backward),
    "upsample": _stateless(_upsample_infer, _upsample_backward),
    "reorg": _stateless(_reorg_infer, _reorg_backward),
    "reorg3d": _stateless(_reorg3d_infer, _reorg3d_backward),
    "crop": EngineOps(_crop_infer, _crop_forward, _crop_backward),
    "softmax": _stateless(_softmax_infer, _softmax_backward),
    "dropout": EngineOps(_identity_infer, _dropout_forward, _dropout_backward),
    "activation": EngineOps(_activation_infer, _activation_forward, _activation_backward),
    "empty": _IDENTITY, "cost": _IDENTITY, "contrastive": _IDENTITY,
    "yolo": EngineOps(_yolo_infer, _yolo_forward, _yolo_backward),
    "region": _stateless(_region_infer, _region_backward),
}

for _name, _into in (("convolutional", _conv_into), ("maxpool", _maxpool_into), ("route", _route_into),
                     ("shortcut", _shortcut_into), ("upsample", _upsample_into)):
    ENGINE_OPS[_name].into = _into

for _name, _ops in ENGINE_OPS.items():
    LAYER_TYPES[_name].engine = _ops

# The layer types the engine runs (the others have shape rules only: `info` shows them, the engine refuses them).
INFERENCE_TYPES = frozenset(ENGINE_OPS)
