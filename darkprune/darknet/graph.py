"""The layer graph of a Darknet network: every layer's type, resolved attributes, inputs, shapes, parameter count and
BFLOPs, computed by Darknet's own rules (AlexeyAB's parser.c and *_layer.c), so that `info` totals equal the
`Total BFLOPS` line Darknet prints.

Shapes are (c, h, w). Layer -1 is the network input. Which channels a layer reads from which producer is explicit in
`Layer.sources`: a list of `Source(layer, start, stop)` channel slices, in the order the layer consumes them (a route
concatenates its sources; a shortcut adds them; a conv reads its single source). Pruning walks these.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import DarkpruneError
from .cfg import Cfg, Section

ACTIVATIONS = {
    "logistic", "loggy", "relu", "elu", "selu", "relie", "plse", "hardtan", "lhtan", "linear", "ramp", "leaky",
    "tanh", "stair", "relu6", "swish", "mish", "hard_mish", "normalize_channels", "normalize_channels_softmax",
    "normalize_channels_softmax_maxval", "gelu", "silu", "revleaky",
}

# Layer types whose parameters live in the .weights file.
WEIGHTED_TYPES = {"convolutional", "connected", "batchnorm", "shortcut", "local"}
# Types the graph does not model: recurrent layers are outside darkprune's scope.
UNSUPPORTED = {"rnn", "gru", "lstm", "crnn", "conv_lstm", "history", "implicit", "normalization_unused"}


@dataclass(frozen=True)
class Source:
    layer: int      # producer index, -1 = network input
    start: int      # first channel of the producer's output read
    stop: int       # one past the last channel read


@dataclass
class Layer:
    index: int
    type: str
    section: Section
    inputs: list[int]                     # producer indices in consumption order (-1 = network input)
    in_shape: tuple[int, int, int]        # (c, h, w) of the primary input
    out_shape: tuple[int, int, int]       # (c, h, w)
    attrs: dict = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    params: int = 0
    bflops: float = 0.0                   # Darknet's figure for this layer (what its layer table prints)

    @property
    def name(self) -> str:
        """The name `info` prints and users pass to --exclude/--sparsity: e.g. conv12, connected3, maxpool2."""
        short = {"convolutional": "conv"}.get(self.type, self.type)
        return f"{short}{self.index}"

    @property
    def outputs(self) -> int:
        c, h, w = self.out_shape
        return c * h * w

    def where(self) -> str:
        return f"{self.section.path}:{self.section.line}: layer {self.index} [{self.section.header}]"


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
        heads = [l.index for l in self.layers if l.type in ("yolo", "region", "detection", "gaussian_yolo")]
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
        builder = _BUILDERS.get(section.type)
        if builder is None:
            kind = "recurrent layers are outside darkprune's scope" if section.type in UNSUPPORTED else \
                "darkprune does not support this layer type"
            raise DarkpruneError(f"{section.path}:{section.line}: layer {index} [{section.header}]: {kind}")
        prev = index - 1
        layer = Layer(index, section.type, section, [prev], shape, shape)
        layer.sources = [Source(prev, 0, shape[0])]
        builder(layer, section, layers, net, batchnorm_layout)
        c, h, w = layer.out_shape
        if c <= 0 or h <= 0 or w <= 0:
            raise DarkpruneError(f"{layer.where()}: output shape {w}x{h}x{c} is empty (input {layer.in_shape[2]}x"
                                 f"{layer.in_shape[1]}x{layer.in_shape[0]}): check size/stride/filters")
        layers.append(layer)
        shape = layer.out_shape
    return Graph(cfg, layers, net)


# ---------------------------------------------------------------------------------------------------------------
# One builder per layer type. Each fills attrs, inputs/sources, out_shape, params and bflops.

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
    layer.params = 0 if share is not None else nweights + n + (3 * n if bn else 0)
    bflops = 2.0 * nweights * out_h * out_w / 1e9
    layer.bflops = bflops / 32 if xnor else bflops


def _connected(layer: Layer, s: Section, layers, net, _bn):
    c, h, w = layer.in_shape
    inputs = c * h * w
    out = s.get_int("output", 1)
    bn = s.get_int("batch_normalize", 0)
    layer.out_shape = (out, 1, 1)
    layer.attrs = dict(output=out, inputs=inputs, batch_normalize=bn, activation=_activation(s, "logistic"))
    layer.params = inputs * out + out + (3 * out if bn else 0)
    layer.bflops = 0.0    # Darknet's layer table gives connected layers no BFLOPs


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
    layer.bflops = size * size * c * out_h * out_w / 1e9


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
    layer.params = nweights
    layer.bflops = c * h * w * n / 1e9 * (2 if weights_type != "none" else 1)


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
    layer.params = (4 if batchnorm_layout == "alexeyab" else 3) * c


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


def _scale_channels(layer: Layer, s: Section, layers: list[Layer], net, _bn):
    frm = s.get_list("from", int)
    if not frm:
        raise DarkpruneError(f"{layer.where()}: [scale_channels] needs from=...")
    src = _relative(s, "from", frm[0], layer.index, len(layers))
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
    frm = s.get_list("from", int)
    if not frm:
        raise DarkpruneError(f"{layer.where()}: [sam] needs from=...")
    src = _relative(s, "from", frm[0], layer.index, len(layers))
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


_BUILDERS = {
    "convolutional": _conv, "connected": _connected, "local": _local,
    "maxpool": _pool, "local_avgpool": _pool, "avgpool": _avgpool,
    "route": _route, "shortcut": _shortcut, "upsample": _upsample, "reorg": _reorg, "reorg3d": _reorg,
    "softmax": _softmax, "dropout": _dropout, "activation": _activation_layer, "batchnorm": _batchnorm,
    "normalization": _same_shape, "empty": _same_shape,
    "yolo": _yolo, "gaussian_yolo": _yolo, "region": _region, "detection": _detection,
    "scale_channels": _scale_channels, "sam": _sam, "crop": _crop, "cost": _cost, "contrastive": _contrastive,
}


def format_shape(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{w:4d} x{h:4d} x{c:5d}"


def human_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"

