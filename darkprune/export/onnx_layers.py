"""Darknet layers as ONNX nodes, each computing what darkprune's engine computes for that layer at inference.

One emitter per layer type: `emit(builder, layer, inputs, params, bn_eps) -> output tensor name`, with `inputs` the
tensor names of `layer.inputs` in order. `refusal(layer)` says, before anything is built, why a layer cannot be
exported (None when it can), so an unsupported model is refused with one line naming the layer.

Semantics worth knowing (see DESIGN.md and the engine's modules):
- conv / connected fold batch norm exactly as the engine does (darkprune.engine.conv.fold_batchnorm, Darknet's eps
  1e-5 by default); a dilated conv pads by pad*dilation (Darknet's im2col_cpu_ext).
- maxpool: the window starts at -(padding // 2), so with an odd `padding` the extra cell is right/bottom; padded
  cells never win (ONNX MaxPool ignores pads, Darknet reads -FLT_MAX). local_avgpool averages in-image cells only.
- route slices each source's channel group (groups/group_id) and concatenates; shortcut adds the `from` outputs,
  a differently shaped one over the flat C*H*W prefix both share (AlexeyAB's rule, the engine's).
- softmax runs over each of `groups` contiguous slices of C*H*W (divided by the temperature), or over channels
  per position with spatial=1.
"""
from __future__ import annotations

import numpy as np

from ..darknet.graph import Layer
from ..engine.conv import fold_batchnorm

# Darknet activations with an exact ONNX form (the rest are refused by name).
ACTIVATIONS = ("linear", "leaky", "revleaky", "relie", "relu", "relu6", "logistic", "loggy", "tanh", "mish",
               "hard_mish", "swish", "elu", "selu", "gelu", "ramp", "hardtan", "lhtan", "plse")
# Layers that are the identity at inference.
IDENTITY_TYPES = ("dropout", "cost", "contrastive", "empty")
LAYER_TYPES = ("convolutional", "connected", "maxpool", "local_avgpool", "avgpool", "route", "shortcut", "upsample",
               "reorg", "reorg3d", "softmax", "batchnorm", "activation", "scale_channels", "sam", "crop",
               "yolo", "region") + IDENTITY_TYPES

SELU_LAMBDA = 1.0507
SELU_ALPHA = 1.6732
GELU_A = 0.797885
GELU_B = 0.035677


def refusal(layer: Layer, graph) -> str | None:
    """Why the exporter cannot write `layer` of `graph` (a phrase naming what is not covered), or None."""
    a = layer.attrs
    if layer.type not in LAYER_TYPES:
        return f"[{layer.section.header}] layers"
    act = a.get("activation")
    if act is not None and act not in ACTIVATIONS:
        return f"activation={act}"
    if layer.type == "convolutional":
        if a["xnor"]:
            return "binary (xnor=1) convolutions"
        c, h, w = layer.in_shape
        k, d, p = a["size"], a["dilation"], a["pad"] * a["dilation"]
        span = d * (k - 1) + 1
        onnx_hw = ((h + 2 * p - span) // a["stride_y"] + 1, (w + 2 * p - span) // a["stride_x"] + 1)
        if onnx_hw != layer.out_shape[1:]:
            return (f"this dilated convolution (size={k}, dilation={d}, padding={a['pad']}): Darknet's output size "
                    f"{layer.out_shape[2]}x{layer.out_shape[1]} is not a convolution's")
    if layer.type == "maxpool" and a["maxpool_depth"]:
        return "maxpool_depth=1 (channel-wise max pooling)"
    if layer.type == "shortcut":
        if a["weights_type"] != "none":
            return f"weighted shortcuts (weights_type={a['weights_type']})"
    if layer.type == "upsample" and a["stride"] < 0:
        return "downsampling [upsample] (negative stride)"
    if layer.type == "reorg3d" and a["reverse"]:
        return "reverse=1 [reorg3d]"
    return None


# ----------------------------------------------------------------------------------------------------------------
# activations


def activation(b, x: str, name: str, stem: str) -> str:
    """Darknet's elementwise activation `name` applied to tensor x (the engine's formulas)."""
    s = stem
    if name == "linear":
        return x
    if name in ("leaky", "revleaky"):
        return b.op("LeakyRelu", [x], s, alpha=0.1)
    if name == "relie":
        return b.op("LeakyRelu", [x], s, alpha=0.01)
    if name == "relu":
        return b.op("Relu", [x], s)
    if name == "relu6":
        return b.clip(x, 0.0, 6.0, s)
    if name == "logistic":
        return b.op("Sigmoid", [x], s)
    if name == "loggy":
        return b.affine(b.op("Sigmoid", [x], s), 2.0, -1.0, s)
    if name == "tanh":
        return b.op("Tanh", [x], s)
    if name == "mish":
        # x * tanh(softplus(x)); Darknet's softplus threshold (20) changes nothing in float32
        return b.mul(x, b.op("Tanh", [b.op("Softplus", [x], s)], s), s)
    if name == "hard_mish":
        # x > 0: x; -2 < x <= 0: x^2/2 + x = x * (x/2 + 1); else 0  ==  x * clip(x/2 + 1, 0, 1)
        return b.mul(x, b.clip(b.affine(x, 0.5, 1.0, s), 0.0, 1.0, s), s)
    if name == "swish":
        return b.mul(x, b.op("Sigmoid", [x], s), s)
    if name == "elu":
        return b.op("Elu", [x], s, alpha=1.0)
    if name == "selu":
        return b.op("Selu", [x], s, alpha=SELU_ALPHA, gamma=SELU_LAMBDA)
    if name == "gelu":
        cube = b.mul(b.mul(x, x, s), x, s)
        inner = b.add(b.mul(x, b.scalar(GELU_A), s), b.mul(cube, b.scalar(GELU_B), s), s)
        return b.mul(b.mul(x, b.scalar(0.5), s), b.affine(b.op("Tanh", [inner], s), 1.0, 1.0, s), s)
    if name == "ramp":
        return b.add(b.op("Relu", [x], s), b.mul(x, b.scalar(0.1), s), s)
    if name == "hardtan":
        return b.clip(x, -1.0, 1.0, s)
    if name == "lhtan":
        # clip(x, 0, 1) + 0.001 * (x - clip(x, 0, 1))
        c = b.clip(x, 0.0, 1.0, s)
        return b.add(c, b.mul(b.op("Sub", [x, c], s), b.scalar(0.001), s), s)
    if name == "plse":
        # 0.125 * clip(x, -4, 4) + 0.5 + 0.01 * (x - clip(x, -4, 4))
        c = b.clip(x, -4.0, 4.0, s)
        return b.add(b.affine(c, 0.125, 0.5, s), b.mul(b.op("Sub", [x, c], s), b.scalar(0.01), s), s)
    raise AssertionError(f"activation {name} passed refusal()")  # refusal() lists the same names


# ----------------------------------------------------------------------------------------------------------------
# layers


def _conv(b, layer, ins, params, model_params, bn_eps):
    a = layer.attrs
    src = params if a["share"] is None else model_params[a["share"]]
    w, bias = src["weights"], src["biases"]
    if a["batch_normalize"]:
        w, bias = fold_batchnorm(w, bias, src["scales"], src["rolling_mean"], src["rolling_variance"], bn_eps)
    stem = layer.name
    wn = b.const(f"{stem}.weight", np.asarray(w, np.float32))
    bn = b.const(f"{stem}.bias", np.asarray(bias, np.float32))
    p = a["pad"] * a["dilation"]
    y = b.op("Conv", [ins[0], wn, bn], stem, kernel_shape=[a["size"], a["size"]],
             strides=[a["stride_y"], a["stride_x"]], pads=[p, p, p, p], dilations=[a["dilation"], a["dilation"]],
             group=a["groups"])
    return activation(b, y, a["activation"], stem)


def _connected(b, layer, ins, params, model_params, bn_eps):
    a = layer.attrs
    w, bias = params["weights"], params["biases"]
    if a["batch_normalize"]:
        # as the engine: Darknet's connected BN normalises W.x, scales it, then adds the bias
        scale = params["scales"] / np.sqrt(params["rolling_variance"] + bn_eps)
        w = w * scale[:, None]
        bias = bias - params["rolling_mean"] * scale
    stem = layer.name
    flat = b.op("Flatten", [ins[0]], stem, axis=1)
    y = b.op("Gemm", [flat, b.const(f"{stem}.weight", np.asarray(w, np.float32)),
                      b.const(f"{stem}.bias", np.asarray(bias, np.float32))], stem, transB=1)
    y = activation(b, y, a["activation"], stem)
    return b.reshape(y, [0, a["output"], 1, 1], stem)


def _pool_pads(a) -> list[int]:
    # Darknet: the first window starts at -(padding // 2); the rest of `padding` lies right/bottom
    begin = a["padding"] // 2
    end = a["padding"] - begin
    return [begin, begin, end, end]


def _maxpool(b, layer, ins, *_):
    a = layer.attrs
    return b.op("MaxPool", [ins[0]], layer.name, kernel_shape=[a["size"], a["size"]],
                strides=[a["stride_y"], a["stride_x"]], pads=_pool_pads(a))


def _local_avgpool(b, layer, ins, *_):
    a = layer.attrs
    return b.op("AveragePool", [ins[0]], layer.name, kernel_shape=[a["size"], a["size"]],
                strides=[a["stride_y"], a["stride_x"]], pads=_pool_pads(a), count_include_pad=0)


def _avgpool(b, layer, ins, *_):
    return b.op("GlobalAveragePool", [ins[0]], layer.name)


def _route(b, layer, ins, *_):
    parts = []
    for src, name in zip(layer.sources, ins):
        full = b.shapes[src.layer][0]
        parts.append(name if (src.start, src.stop) == (0, full) else
                     b.slice(name, 1, src.start, src.stop, layer.name))
    return b.concat(parts, 1, layer.name)


def _shortcut(b, layer, ins, *_):
    c, h, w = layer.in_shape
    stem = layer.name
    y = ins[0]
    for src, name in zip(layer.inputs[1:], ins[1:]):
        shape = b.shapes[src]
        if shape == (c, h, w):
            y = b.add(y, name, stem)
            continue
        # AlexeyAB's shortcut adds a differently shaped input over the flat C*H*W prefix both share (the engine's
        # rule; for equal H, W that is the first channels)
        size, other = c * h * w, shape[0] * shape[1] * shape[2]
        flat = b.reshape(name, [0, -1], stem)
        if other > size:
            flat = b.slice(flat, 1, 0, size, stem)
        elif other < size:
            flat = b.op("Pad", [flat, b.ints([0, 0, 0, size - other])], stem)
        y = b.add(y, b.reshape(flat, [0, c, h, w], stem), stem)
    return activation(b, y, layer.attrs["activation"], stem)


def _upsample(b, layer, ins, *_):
    a = layer.attrs
    s = float(a["stride"])
    scales = b.const(f"{layer.name}.scales", np.asarray([1.0, 1.0, s, s], np.float32))
    # nearest, out[y][x] = in[y // s][x // s]
    y = b.op("Resize", [ins[0], "", scales], layer.name, mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return b.affine(y, a["scale"], 0.0, layer.name)


def _reorg(b, layer, ins, *_):
    s = layer.attrs["stride"]
    c, h, w = layer.in_shape
    stem = layer.name
    if layer.attrs["reverse"]:
        # depth-to-space: out[c2, j*s + dy, i*s + dx] = in[(dy*s + dx) * c/s^2 + c2, j, i]
        x = b.reshape(ins[0], [0, s, s, c // (s * s), h, w], stem)
        x = b.transpose(x, [0, 3, 4, 1, 5, 2], stem)
        return b.reshape(x, [0, c // (s * s), h * s, w * s], stem)
    # Darknet's old reorg reads the input as (c/s^2, h*s, w*s) and writes, for off = dy*s + dx and c2 < c/s^2,
    # out[off*c/s^2 + c2, j, i] = in_view[c2, j*s + dy, i*s + dx] over j < h, i < w; the result is then taken as
    # (c*s^2, h/s, w/s) (see darkprune.engine.reorg)
    cp = c // (s * s)
    x = b.reshape(ins[0], [0, cp, h, s, w, s], stem)
    x = b.transpose(x, [0, 3, 5, 1, 2, 4], stem)
    return b.reshape(x, [0, c * s * s, h // s, w // s], stem)


def _reorg3d(b, layer, ins, *_):
    # space-to-depth: out[(dy*s + dx)*c + k, j, i] = in[k, j*s + dy, i*s + dx]
    s = layer.attrs["stride"]
    c, h, w = layer.in_shape
    stem = layer.name
    x = b.reshape(ins[0], [0, c, h // s, s, w // s, s], stem)
    x = b.transpose(x, [0, 3, 5, 1, 2, 4], stem)
    return b.reshape(x, [0, c * s * s, h // s, w // s], stem)


def _softmax(b, layer, ins, *_):
    a = layer.attrs
    c, h, w = layer.in_shape
    stem = layer.name
    if a["spatial"]:
        return b.op("Softmax", [ins[0]], stem, axis=1)
    x = b.reshape(ins[0], [0, a["groups"], -1], stem)
    if a["temperature"] != 1.0:
        x = b.op("Div", [x, b.scalar(a["temperature"])], stem)
    x = b.op("Softmax", [x], stem, axis=2)
    return b.reshape(x, [0, c, h, w], stem)


def _batchnorm(b, layer, ins, params, model_params, bn_eps):
    c = layer.in_shape[0]
    bias = params.get("biases", np.zeros(c, np.float32))
    scale = params["scales"] / np.sqrt(params["rolling_variance"] + bn_eps)
    shift = bias - params["rolling_mean"] * scale
    stem = layer.name
    y = b.mul(ins[0], b.const(f"{stem}.scale", scale.astype(np.float32).reshape(1, c, 1, 1)), stem)
    return b.add(y, b.const(f"{stem}.shift", shift.astype(np.float32).reshape(1, c, 1, 1)), stem)


def _activation_layer(b, layer, ins, *_):
    y = activation(b, ins[0], layer.attrs["activation"], layer.name)
    return y if y != ins[0] else b.op("Identity", [y], layer.name)


def _scale_channels(b, layer, ins, *_):
    # the previous layer's (C, 1, 1) scales (or (1, H, W) with scale_wh) times the `from` layer's feature map
    y = b.mul(ins[1], ins[0], layer.name)
    return activation(b, y, layer.attrs["activation"], layer.name)


def _sam(b, layer, ins, *_):
    y = b.mul(ins[0], ins[1], layer.name)
    return activation(b, y, layer.attrs["activation"], layer.name)


def _crop(b, layer, ins, *_):
    a = layer.attrs
    _, h, w = layer.in_shape
    dh, dw = (h - a["crop_height"]) // 2, (w - a["crop_width"]) // 2
    stem = layer.name
    y = b.op("Slice", [ins[0], b.ints([dh, dw]), b.ints([dh + a["crop_height"], dw + a["crop_width"]]),
                       b.ints([2, 3])], stem)
    return y if a["noadjust"] else b.affine(y, 2.0, -1.0, stem)  # Darknet maps the crop to x*2 - 1


def _identity(b, layer, ins, *_):
    return ins[0]


EMITTERS = {
    "convolutional": _conv, "connected": _connected, "maxpool": _maxpool, "local_avgpool": _local_avgpool,
    "avgpool": _avgpool, "route": _route, "shortcut": _shortcut, "upsample": _upsample, "reorg": _reorg,
    "reorg3d": _reorg3d, "softmax": _softmax, "batchnorm": _batchnorm, "activation": _activation_layer,
    "scale_channels": _scale_channels, "sam": _sam, "crop": _crop,
    **{t: _identity for t in IDENTITY_TYPES},
}
