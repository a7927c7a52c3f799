"""Darknet's shape rules, one builder per layer type (AlexeyAB's parser.c and *_layer.c): each fills a layer's
attrs, inputs/sources, out_shape, params and BFLOPs from its cfg section. The parameter and BFLOPs counts are
functions of (layer, input channels, output channels), so that the pruning code counts a pruned layer by the same
rule (`layer_cost`).
"""
from __future__ import annotations

import warnings

from ..errors import DarkpruneError
from .cfg import Section
from .layer import Layer, Source

ACTIVATIONS = {
    "logistic", "loggy", "relu", "elu", "selu", "relie", "plse", "hardtan", "lhtan", "linear", "ramp", "leaky",
    "tanh", "stair", "relu6", "swish", "mish", "hard_mish", "normalize_channels", "normalize_channels_softmax",
    "normalize_channels_softmax_maxval", "gelu", "silu", "revleaky",
}


def _relative(section: Section, key: str, value: int, index: int, n_layers_so_far: int) -> int:
    target = index + value if value < 0 else value
    if not 0 <= target < index:
        raise DarkpruneError(f"{section.where(key)}: layer {index} [{section.header}] {key} refers to layer "
                             f"{value} (= {target}), which is not an earlier layer")
    return target


def _activation(section: Section, default: str) -> str:
    act = section.get_str("activation", default).split("#")[0]
    if act not in ACTIVATIONS:
        raise DarkpruneError(f"{section.where('activation')}: [{section.header}] unknown activation '{act}' "
                             f"(Darknet knows: {', '.join(sorted(ACTIVATIONS))})")
    return act


def _conv(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    n = s.get_int("filters", 1)
    groups = s.get_int("groups", 1)
    size = s.get_int("size", 1)
    stride = s.get_int("stride", 1)
    stride_x = s.get_int("stride_x", -1)
    stride_y = s.get_int("stride_y", -1)
    if stride_x < 1:
        stride_x = stride
    if stride_y < 1:
        stride_y = stride
    dilation = s.get_int("dilation", 1)
    if size == 1:
        dilation = 1
    pad = s.get_int("pad", 0)
    padding = s.get_int("padding", 0)
    if pad:
        padding = size // 2
    if s.get_int("antialiasing", 0):
        raise DarkpruneError(f"{layer.where()}: antialiasing=1 is not supported by darkprune")
    if n < 1 or size < 1 or groups < 1 or stride_x < 1 or stride_y < 1:
        raise DarkpruneError(f"{layer.where()}: filters, size, groups and stride must be >= 1")
    if c % groups or n % groups:
        raise DarkpruneError(f"{layer.where()}: groups={groups} must divide the input channels ({c}) and filters ({n})")
    share_index = s.get_int("share_index", -1000000000)
    share = None
    if share_index != -1000000000:
        share = share_index if share_index >= 0 else layer.index + share_index
    bn = s.get_int("batch_normalize", 0)
    xnor = s.get_int("xnor", 0)
    out_h = (h + 2 * padding - size) // stride_y + 1
    out_w = (w + 2 * padding - size) // stride_x + 1
    layer.out_shape = (n, out_h, out_w)
    nweights = (c // groups) * n * size * size
    layer.attrs = dict(filters=n, size=size, stride_x=stride_x, stride_y=stride_y, dilation=dilation,
                       pad=padding, groups=groups, batch_normalize=bn, activation=_activation(s, "logistic"),
                       share=share, xnor=xnor, nweights=nweights)
    layer.params, layer.bflops = conv_cost(layer, c, n)


def conv_cost(layer: Layer, c_in: int, n_out: int) -> tuple[int, float]:
    """(params, BFLOPs) of a conv reading c_in channels into n_out filters; a grouped conv keeps whole blocks, so
    its group count is c_in over the channels per block."""
    a = layer.attrs
    groups = c_in // (layer.in_shape[0] // a["groups"]) if a["groups"] > 1 else 1
    _, out_h, out_w = layer.out_shape
    nweights = (c_in // groups) * n_out * a["size"] * a["size"]
    params = 0 if a["share"] is not None else nweights + n_out + (3 * n_out if a["batch_normalize"] else 0)
    bflops = 2.0 * nweights * out_h * out_w / 1e9
    return params, bflops / 32 if a["xnor"] else bflops


def _connected(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    inputs = c * h * w
    out = s.get_int("output", 1)
    bn = s.get_int("batch_normalize", 0)
    layer.out_shape = (out, 1, 1)
    layer.attrs = dict(output=out, inputs=inputs, batch_normalize=bn, activation=_activation(s, "logistic"))
    layer.params, layer.bflops = connected_cost(layer, c, out)


def connected_cost(layer: Layer, c_in: int, n_out: int) -> tuple[int, float]:
    """(params, BFLOPs) with c_in input channels (each c_in covers H*W flattened inputs) and n_out outputs.
    Darknet's layer table gives connected layers no BFLOPs."""
    _, h, w = layer.in_shape
    inputs = c_in * h * w
    return inputs * n_out + n_out + (3 * n_out if layer.attrs["batch_normalize"] else 0), 0.0


def _local(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    n = s.get_int("filters", 1)
    size = s.get_int("size", 1)
    stride = s.get_int("stride", 1)
    pad = s.get_int("pad", 0)
    out_h = (h - (size if not pad else 1)) // stride + 1
    out_w = (w - (size if not pad else 1)) // stride + 1
    layer.out_shape = (n, out_h, out_w)
    layer.attrs = dict(filters=n, size=size, stride=stride, pad=pad, activation=_activation(s, "logistic"))
    locations = out_h * out_w
    layer.params = n * out_h * out_w + size * size * c * n * locations


def _pool(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    stride = s.get_int("stride", 1)
    stride_x = s.get_int("stride_x", stride)
    stride_y = s.get_int("stride_y", stride)
    size = s.get_int("size", stride)
    padding = s.get_int("padding", size - 1)
    depth = s.get_int("maxpool_depth", 0) if layer.type == "maxpool" else 0
    out_channels = s.get_int("out_channels", 1) if layer.type == "maxpool" else 1
    if s.get_int("antialiasing", 0):
        raise DarkpruneError(f"{layer.where()}: antialiasing=1 is not supported by darkprune")
    if size < 1 or stride_x < 1 or stride_y < 1:
        raise DarkpruneError(f"{layer.where()}: size and stride must be >= 1")
    if depth:
        out_c, out_h, out_w = out_channels, h, w
    else:
        out_c = c
        out_w = (w + padding - size) // stride_x + 1
        out_h = (h + padding - size) // stride_y + 1
    layer.out_shape = (out_c, out_h, out_w)
    layer.attrs = dict(size=size, stride_x=stride_x, stride_y=stride_y, padding=padding, maxpool_depth=depth,
                       out_channels=out_channels)
    layer.bflops = pool_cost(layer, c, out_c)[1]


def pool_cost(layer: Layer, c_in: int, n_out: int) -> tuple[int, float]:
    _, out_h, out_w = layer.out_shape
    return 0, layer.attrs["size"] * layer.attrs["size"] * c_in * out_h * out_w / 1e9


def _avgpool(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    layer.out_shape = (c, 1, 1)


def _route(layer: Layer, s: Section, layers: list[Layer], net, _bn):
    values = s.get_list("layers", int)
    if not values:
        raise DarkpruneError(f"{layer.where()}: [route] needs layers=...")
    groups = s.get_int("groups", 1)
    group_id = s.get_int("group_id", 0)
    if groups < 1 or not 0 <= group_id < groups:
        raise DarkpruneError(f"{layer.where()}: group_id={group_id} must be in 0..groups-1 (groups={groups})")
    idx = [_relative(s, "layers", v, layer.index, len(layers)) for v in values]
    first = layers[idx[0]]
    sources, total = [], 0
    for i in idx:
        pc, ph, pw = layers[i].out_shape
        if (ph, pw) != first.out_shape[1:]:
            raise DarkpruneError(f"{layer.where()}: route inputs differ in size: layer {idx[0]} is "
                                 f"{first.out_shape[2]}x{first.out_shape[1]}, layer {i} is {pw}x{ph}")
        if pc % groups:
            raise DarkpruneError(f"{layer.where()}: layer {i} has {pc} channels, not divisible by groups={groups}")
        part = pc // groups
        sources.append(Source(i, part * group_id, part * (group_id + 1)))
        total += pc
    layer.inputs = idx
    layer.sources = sources
    layer.in_shape = first.out_shape
    layer.out_shape = (total // groups, first.out_shape[1], first.out_shape[2])
    layer.attrs = dict(layers=idx, groups=groups, group_id=group_id)


def _shortcut(layer: Layer, s: Section, layers: list[Layer], net, _bn):
    values = s.get_list("from", int)
    if not values:
        raise DarkpruneError(f"{layer.where()}: [shortcut] needs from=...")
    frm = [_relative(s, "from", v, layer.index, len(layers)) for v in values]
    weights_type = s.get_str("weights_type", "none")
    if weights_type == "per_layer":
        weights_type = "per_feature"
    if weights_type not in ("none", "per_feature", "per_channel"):
        raise DarkpruneError(f"{s.where('weights_type')}: [shortcut] weights_type={weights_type}: expected none, "
                             f"per_feature or per_channel")
    normalization = s.get_str("weights_normalization", "none")
    if normalization == "avg_relu":
        normalization = "relu"
    if normalization not in ("none", "relu", "softmax"):
        raise DarkpruneError(f"{s.where('weights_normalization')}: weights_normalization={normalization}: expected "
                             f"none, relu or softmax")
    c, h, w = layer.in_shape
    prev = layer.index - 1
    layer.inputs = [prev] + frm
    layer.sources = [Source(prev, 0, c)] + [Source(i, 0, layers[i].out_shape[0]) for i in frm]
    layer.out_shape = (c, h, w)
    n = len(frm)
    nweights = {"none": 0, "per_feature": n + 1, "per_channel": (n + 1) * c}[weights_type]
    layer.attrs = dict(from_layers=frm, weights_type=weights_type, weights_normalization=normalization,
                       activation=_activation(s, "linear"), nweights=nweights)
    layer.params, layer.bflops = shortcut_cost(layer, c, c)


def shortcut_cost(layer: Layer, c_in: int, n_out: int) -> tuple[int, float]:
    """(params, BFLOPs) of a shortcut adding its inputs' n_out channels (fusion weights per input or per channel)."""
    a = layer.attrs
    _, h, w = layer.out_shape
    n = len(a["from_layers"])
    nweights = {"none": 0, "per_feature": n + 1, "per_channel": (n + 1) * n_out}[a["weights_type"]]
    return nweights, n_out * h * w * n / 1e9 * (2 if a["weights_type"] != "none" else 1)


def _upsample(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    stride = s.get_int("stride", 2)
    scale = s.get_float("scale", 1.0)
    if stride == 0:
        raise DarkpruneError(f"{layer.where()}: stride must not be 0")
    if stride < 0:
        out_h, out_w = h // -stride, w // -stride
    else:
        out_h, out_w = h * stride, w * stride
    layer.out_shape = (c, out_h, out_w)
    layer.attrs = dict(stride=stride, scale=scale)


def _reorg(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    stride = s.get_int("stride", 1)
    reverse = s.get_int("reverse", 0)
    if stride < 1:
        raise DarkpruneError(f"{layer.where()}: stride must be >= 1")
    if reverse:
        out = (c // (stride * stride), h * stride, w * stride)
    else:
        if h % stride or w % stride:
            raise DarkpruneError(f"{layer.where()}: input {w}x{h} is not divisible by stride {stride}")
        out = (c * stride * stride, h // stride, w // stride)
    layer.out_shape = out
    layer.attrs = dict(stride=stride, reverse=reverse)


def _same_shape(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape


def _softmax(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape
    layer.attrs = dict(groups=s.get_int("groups", 1), temperature=s.get_float("temperature", 1.0),
                       spatial=s.get_float("spatial", 0.0))


def _dropout(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape
    layer.attrs = dict(probability=s.get_float("probability", 0.2))


def _activation_layer(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape
    layer.attrs = dict(activation=_activation(s, "linear"))


def _batchnorm(layer: Layer, s: Section, layers, net, batchnorm_layout):
    c = layer.in_shape[0]
    layer.out_shape = layer.in_shape
    layer.attrs = dict(layout=batchnorm_layout)
    layer.params = batchnorm_cost(layer, c, c)[0]


def batchnorm_cost(layer: Layer, c_in: int, n_out: int) -> tuple[int, float]:
    return (4 if layer.attrs["layout"] == "alexeyab" else 3) * n_out, 0.0


def _head_common(s: Section) -> dict:
    return dict(
        ignore_thresh=s.get_float("ignore_thresh", 0.5), truth_thresh=s.get_float("truth_thresh", 1.0),
        jitter=s.get_float("jitter", 0.2), random=s.get_float("random", 0.0),
    )


def _yolo(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    classes = s.get_int("classes", 20)
    total = s.get_int("num", 1)
    mask = s.get_list("mask", int)
    if mask is None:
        mask = list(range(total))
    anchors = s.get_list("anchors", float) or []
    coords = 8 if layer.type == "gaussian_yolo" else 4
    expected = len(mask) * (classes + coords + 1)
    if c != expected:
        raise DarkpruneError(f"{layer.where()}: its input has {c} channels but mask has {len(mask)} anchors and "
                             f"classes={classes}, so filters= of the layer before must be {expected}")
    # Darknet reads these without checking (zeroed memory, or past the end of its anchor array); we warn and use
    # zero anchors, so that such cfgs (two ship in AlexeyAB's repo) still load and get shapes.
    if len(anchors) < 2 * total or any(m < 0 or m >= total for m in mask):
        warnings.warn(f"{layer.where()}: mask {mask} and num={total} need anchors for every mask entry; got "
                      f"{len(anchors)} values, missing ones are taken as 0", stacklevel=2)
        needed = 2 * max([total] + [m + 1 for m in mask])
        anchors = anchors + [0.0] * (needed - len(anchors))
    layer.out_shape = layer.in_shape
    layer.attrs = dict(
        classes=classes, num=total, mask=mask, anchors=anchors,
        scale_x_y=s.get_float("scale_x_y", 1.0), new_coords=s.get_int("new_coords", 0),
        nms_kind=s.get_str("nms_kind", "default"), beta_nms=s.get_float("beta_nms", 0.6),
        iou_loss=s.get_str("iou_loss", "mse"), iou_normalizer=s.get_float("iou_normalizer", 0.75),
        obj_normalizer=s.get_float("obj_normalizer", 1.0), cls_normalizer=s.get_float("cls_normalizer", 1.0),
        iou_thresh=s.get_float("iou_thresh", 1.0), label_smooth_eps=s.get_float("label_smooth_eps", 0.0),
        max_delta=s.get_float("max_delta", float("inf")), objectness_smooth=s.get_int("objectness_smooth", 0),
        focal_loss=s.get_int("focal_loss", 0), max_boxes=s.get_int("max", 200), **_head_common(s),
    )


def _region(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    coords = s.get_int("coords", 4)
    classes = s.get_int("classes", 20)
    num = s.get_int("num", 1)
    expected = num * (coords + classes + 1)
    if c != expected:
        raise DarkpruneError(f"{layer.where()}: its input has {c} channels but num={num}, coords={coords}, "
                             f"classes={classes} need filters={expected} in the layer before")
    anchors = s.get_list("anchors", float) or []
    layer.out_shape = layer.in_shape
    layer.attrs = dict(coords=coords, classes=classes, num=num, anchors=(anchors + [0.5] * (2 * num))[: 2 * num],
                       softmax=s.get_int("softmax", 0), thresh=s.get_float("thresh", 0.5),
                       bias_match=s.get_int("bias_match", 0), rescore=s.get_int("rescore", 0),
                       coord_scale=s.get_float("coord_scale", 1.0), object_scale=s.get_float("object_scale", 1.0),
                       noobject_scale=s.get_float("noobject_scale", 1.0), class_scale=s.get_float("class_scale", 1.0),
                       absolute=s.get_int("absolute", 0), max_boxes=s.get_int("max", 200), **_head_common(s))


def _detection(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape
    layer.attrs = dict(coords=s.get_int("coords", 1), classes=s.get_int("classes", 1), num=s.get_int("num", 1),
                       side=s.get_int("side", 7), sqrt=s.get_int("sqrt", 0), softmax=s.get_int("softmax", 0))


def _from_layer(layer: Layer, s: Section, layers: list[Layer]) -> tuple[list[int], int]:
    """The `from=` values of a two-input layer and the earlier layer the first one names."""
    frm = s.get_list("from", int)
    if not frm:
        raise DarkpruneError(f"{layer.where()}: [{layer.type}] needs from=...")
    return frm, _relative(s, "from", frm[0], layer.index, len(layers))


def _scale_channels(layer: Layer, s: Section, layers: list[Layer], net, _bn):
    frm, src = _from_layer(layer, s, layers)
    # The `from` layer is the feature map being scaled (and gives the output shape); the previous layer holds the
    # scales: one per channel (1x1xC, an SE block), or one per position with scale_wh (HxWx1).
    c, h, w = layer.in_shape
    fc, fh, fw = layers[src].out_shape
    scale_wh = s.get_int("scale_wh", 0)
    if scale_wh:
        ok = (fh, fw) == (h, w) and c == 1
    else:
        ok = fc == c and h == 1 and w == 1
    if not ok:
        raise DarkpruneError(f"{layer.where()}: the previous layer gives {w}x{h}x{c}, which cannot scale "
                             f"from={frm[0]}'s {fw}x{fh}x{fc}")
    prev = layer.index - 1
    layer.inputs = [prev, src]
    layer.sources = [Source(prev, 0, c), Source(src, 0, fc)]
    layer.out_shape = (fc, fh, fw)
    layer.attrs = dict(from_layer=src, scale_wh=scale_wh, activation=_activation(s, "linear"))


def _sam(layer: Layer, s: Section, layers: list[Layer], net, _bn):
    frm, src = _from_layer(layer, s, layers)
    c, h, w = layer.in_shape
    if layers[src].out_shape != (c, h, w):
        fc, fh, fw = layers[src].out_shape
        raise DarkpruneError(f"{layer.where()}: from={frm[0]} gives {fw}x{fh}x{fc}, [sam] needs {w}x{h}x{c}")
    prev = layer.index - 1
    layer.inputs = [prev, src]
    layer.sources = [Source(prev, 0, c), Source(src, 0, c)]
    layer.out_shape = layer.in_shape
    layer.attrs = dict(from_layer=src, activation=_activation(s, "linear"))


def _crop(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    ch = s.get_int("crop_height", 1)
    cw = s.get_int("crop_width", 1)
    layer.out_shape = (c, ch, cw)
    layer.attrs = dict(crop_height=ch, crop_width=cw, flip=s.get_int("flip", 0), shift=s.get_float("shift", 0.0),
                       noadjust=s.get_int("noadjust", 0))


def _cost(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape
    layer.attrs = dict(cost_type=s.get_str("type", "sse"), scale=s.get_float("scale", 1.0))


def _contrastive(layer: Layer, s: Section, layers, net, _bn):
    layer.out_shape = layer.in_shape
    layer.attrs = dict(classes=s.get_int("classes", 1000))
