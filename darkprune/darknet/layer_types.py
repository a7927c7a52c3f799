"""The layer-type table: one `LayerType` entry per Darknet layer type darkprune supports, saying everything the rest
of the package needs to know about that type, so that no other module branches on type names.

An entry holds Darknet facts:
- `build`: the shape rule (darknet/shapes.py): attrs, inputs, output shape, params and BFLOPs from the cfg section;
- `arrays`: the float32 arrays the type stores in .weights, in file order, with their shapes; `trainable`: which of
  them training updates (in the optimizer's order); `cost`: params and BFLOPs for given input/output channel counts;
- how its channels relate (`channels`): PRODUCER makes new channels that pruning removes (conv, connected); PASS
  outputs channels it reads, in order (`passes`: which operand, None = all of them concatenated, as a route does);
  TIED is a pass layer whose operands are combined channel by channel, so their channel i are one (`tied`: which
  operands; `multiplies`: operand -> the operand it is multiplied by, the SE block's scale and [sam]); HEAD is a
  detection head, which keeps every channel it reads; MIXER makes channels from all its inputs (softmax, reorg,
  local, crop...), so neither its inputs nor its outputs can be pruned. `blocks` (a grouped conv ties input block k
  to filter block k) and `slices` (a route's groups/group_id slices its producers symmetrically) add the remaining
  ties; `locks` names what makes a layer unprunable outright (weight sharing, xnor);
- how it is sliced when channels are removed (`slicing`): which arrays follow its output channels and along which
  axis, which follow the channels it reads, and which cfg key (`count_key`) states its output channel count.

The engine's side of a type (preparing its parameters, its inference forward, its training forward and its backward)
is attached to the same entry as `engine` by darkprune/engine/layer_ops.py when the engine is imported: darknet/ sits
below engine/ in the package's layers and may not import it, yet the runner should find a type's shape rule and its
kernels in one object. Adding a layer type is then one entry here (and its shape rule in shapes.py) and one set of
engine functions registered in layer_ops.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import shapes
from .layer import Layer

PRODUCER, PASS, TIED, HEAD, MIXER = "producer", "pass", "tied", "head", "mixer"

# The value a cleared (pruned) entry of an array takes, where 0 would not do: a pruned batch-norm channel keeps a
# variance of 1 so that its normalisation stays finite.
NEUTRAL = {"rolling_variance": 1.0}


@dataclass(frozen=True)
class Slicing:
    """How a layer's arrays follow removed channels: `out_axes` {array: axis} are indexed by the layer's output
    channels, `in_axes` by the channels it reads (`flat_inputs`: input channel c covers the flattened inputs
    c*H*W..(c+1)*H*W-1, a connected layer's columns). `indexed_by` says which channels are the positions of the
    layer's parameters ("input" or "output"; None: none of its parameters is indexed by channel)."""
    out_axes: dict = field(default_factory=dict)
    in_axes: dict = field(default_factory=dict)
    flat_inputs: bool = False
    indexed_by: str | None = None


NOT_SLICED = Slicing()


def _none(layer: Layer):
    return ()


def _one(layer: Layer) -> int:
    return 1


def _not_sliced(layer: Layer) -> Slicing:
    return NOT_SLICED


@dataclass
class LayerType:
    name: str
    build: Callable                                   # shape rule: (layer, section, layers, net, bn layout)
    channels: str                                     # PRODUCER, PASS, TIED, HEAD or MIXER
    arrays: Callable[[Layer], list] = _none           # [(array name, shape)] in .weights order
    trainable: tuple[str, ...] = ()                   # arrays training updates, in the optimizer's order
    cost: Callable | None = None                      # (layer, c_in, c_out) -> (params, BFLOPs); None: fixed
    passes: int | None = 0                            # PASS/TIED: the operand output (None: all, concatenated)
    tied: Callable[[Layer], tuple] = _none            # TIED: operands added/multiplied channel by channel
    multiplies: Callable[[Layer], dict] = lambda layer: {}   # operand -> the operand it is multiplied by
    blocks: Callable[[Layer], int] = _one             # input block k and output block k pruned together
    slices: Callable[[Layer], int] = _one             # producers read in this many symmetric slices
    locks: Callable[[Layer], list] = lambda layer: []  # [(reason, other layers locked with it)]: never pruned
    keeps_constant: bool = False                      # PASS: a constant channel stays that constant
    keeps_zero: str = ""                              # "always", "activation" (if act(0)=0), "tied" (all carry)
    slicing: Callable[[Layer], Slicing] = _not_sliced
    count_key: str | None = None                      # cfg key (and attr) stating the output channel count
    fingerprint: tuple[str, ...] = ()                 # attrs that decide channels (masks' structure fingerprint)
    role_of: Callable[[Layer], str] | None = None     # when the relation depends on the layer's options
    engine: object = None                             # attached by darkprune.engine.layer_ops

    def role(self, layer: Layer) -> str:
        return self.role_of(layer) if self.role_of is not None else self.channels

    def trainable_arrays(self, layer: Layer) -> list[str]:
        stored = {name for name, _ in self.arrays(layer)}
        return [name for name in self.trainable if name in stored]

    def live_cost(self, layer: Layer, c_in: int, c_out: int) -> tuple[int, float]:
        return self.cost(layer, c_in, c_out) if self.cost is not None else (layer.params, layer.bflops)


def weights_owner(layer: Layer) -> int:
    """The layer whose arrays this layer computes with: a conv with share_index uses another's."""
    share = layer.attrs.get("share")
    return layer.index if share is None else share


# -- arrays (Darknet's load_weights order) -------------------------------------------------------------------------
def _bn_rows(n: int) -> list:
    return [("scales", (n,)), ("rolling_mean", (n,)), ("rolling_variance", (n,))]


def _conv_arrays(layer: Layer) -> list:
    a = layer.attrs
    if a["share"] is not None:
        return []
    n, c = a["filters"], layer.in_shape[0]
    return [("biases", (n,))] + (_bn_rows(n) if a["batch_normalize"] else []) + \
        [("weights", (n, c // a["groups"], a["size"], a["size"]))]


def _connected_arrays(layer: Layer) -> list:
    a = layer.attrs
    n = a["output"]
    return [("biases", (n,)), ("weights", (n, a["inputs"]))] + (_bn_rows(n) if a["batch_normalize"] else [])


def _batchnorm_arrays(layer: Layer) -> list:
    c = layer.in_shape[0]
    return ([("biases", (c,))] if layer.attrs["layout"] == "alexeyab" else []) + _bn_rows(c)


def _shortcut_arrays(layer: Layer) -> list:
    a = layer.attrs
    if not a["nweights"]:
        return []
    n = len(a["from_layers"]) + 1
    return [("weights", (n,) if a["weights_type"] == "per_feature" else (n, layer.out_shape[0]))]


def _local_arrays(layer: Layer) -> list:
    n, oh, ow = layer.out_shape
    size = layer.attrs["size"]
    return [("biases", (n * oh * ow,)), ("weights", (size * size * layer.in_shape[0] * n * oh * ow,))]


# -- slicing -------------------------------------------------------------------------------------------------------
def _rows(layer: Layer) -> dict:
    return {name: 0 for name, _ in layer_type(layer).arrays(layer)}


def _conv_slicing(layer: Layer) -> Slicing:
    # a grouped conv's pruned inputs come in whole blocks, whose filters go with them (its out_axes)
    shared = layer.attrs["share"] is not None
    inputs = {"weights": 1} if layer.attrs["groups"] == 1 and not shared else {}
    return Slicing(_rows(layer), inputs, False, "input")


def _connected_slicing(layer: Layer) -> Slicing:
    return Slicing(_rows(layer), {"weights": 1}, True, "input")


def _batchnorm_slicing(layer: Layer) -> Slicing:
    return Slicing(_rows(layer), {}, False, "input")


def _shortcut_slicing(layer: Layer) -> Slicing:
    if layer.attrs["weights_type"] != "per_channel":
        return NOT_SLICED
    return Slicing({"weights": 1}, {}, False, "output")


# -- channel relations ---------------------------------------------------------------------------------------------
def _conv_locks(layer: Layer) -> list:
    a = layer.attrs
    out = []
    if a["share"] is not None:
        out.append((f"layer {layer.index} shares weights with layer {a['share']}", (a["share"],)))
    if a["xnor"]:
        out.append((f"layer {layer.index} is a binary (xnor) convolution", ()))
    return out


def _all_operands(layer: Layer) -> tuple:
    return tuple(range(len(layer.sources)))


def _scale_channels_tied(layer: Layer) -> tuple:
    return () if layer.attrs["scale_wh"] else (0, 1)


def _maxpool_role(layer: Layer) -> str:
    return MIXER if layer.attrs.get("maxpool_depth") else PASS      # a depth maxpool makes new channels


_CONV_FINGERPRINT = ("size", "stride_x", "stride_y", "groups", "batch_normalize", "activation", "share", "xnor")


def _table() -> dict[str, LayerType]:
    entries = [
        LayerType("convolutional", shapes._conv, PRODUCER, _conv_arrays, ("weights", "biases", "scales"),
                  shapes.conv_cost, blocks=lambda layer: layer.attrs["groups"], locks=_conv_locks,
                  slicing=_conv_slicing, count_key="filters", fingerprint=_CONV_FINGERPRINT),
        LayerType("connected", shapes._connected, PRODUCER, _connected_arrays, ("weights", "biases", "scales"),
                  shapes.connected_cost, slicing=_connected_slicing, count_key="output",
                  fingerprint=("batch_normalize", "activation")),
        LayerType("local", shapes._local, MIXER, _local_arrays),
        LayerType("maxpool", shapes._pool, PASS, cost=shapes.pool_cost, keeps_constant=True, role_of=_maxpool_role),
        LayerType("local_avgpool", shapes._pool, PASS, cost=shapes.pool_cost, keeps_constant=True),
        LayerType("avgpool", shapes._avgpool, PASS, keeps_constant=True, keeps_zero="always"),
        LayerType("route", shapes._route, PASS, passes=None, slices=lambda layer: layer.attrs["groups"],
                  keeps_constant=True, keeps_zero="always"),
        LayerType("shortcut", shapes._shortcut, TIED, _shortcut_arrays, ("weights",), shapes.shortcut_cost,
                  tied=_all_operands, keeps_zero="tied", slicing=_shortcut_slicing,
                  fingerprint=("weights_type", "activation")),
        LayerType("scale_channels", shapes._scale_channels, TIED, passes=1, tied=_scale_channels_tied,
                  multiplies=lambda layer: {} if layer.attrs["scale_wh"] else {0: 1}),
        LayerType("sam", shapes._sam, TIED, tied=lambda layer: (0, 1), multiplies=lambda layer: {0: 1, 1: 0}),
        LayerType("upsample", shapes._upsample, PASS, keeps_constant=True, keeps_zero="always"),
        LayerType("dropout", shapes._dropout, PASS, keeps_constant=True, keeps_zero="always"),
        LayerType("empty", shapes._same_shape, PASS, keeps_constant=True, keeps_zero="always"),
        LayerType("activation", shapes._activation_layer, PASS, keeps_zero="activation"),
        LayerType("batchnorm", shapes._batchnorm, PASS, _batchnorm_arrays, ("scales", "biases"),
                  shapes.batchnorm_cost, keeps_zero="always", slicing=_batchnorm_slicing),
        LayerType("reorg", shapes._reorg, MIXER),
        LayerType("reorg3d", shapes._reorg, MIXER),
        LayerType("softmax", shapes._softmax, MIXER),
        LayerType("normalization", shapes._same_shape, MIXER),
        LayerType("crop", shapes._crop, MIXER),
        LayerType("cost", shapes._cost, MIXER),
        LayerType("contrastive", shapes._contrastive, MIXER),
        LayerType("yolo", shapes._yolo, HEAD),
        LayerType("gaussian_yolo", shapes._yolo, HEAD),
        LayerType("region", shapes._region, HEAD),
        LayerType("detection", shapes._detection, HEAD),
    ]
    return {entry.name: entry for entry in entries}


LAYER_TYPES: dict[str, LayerType] = _table()
# Types the graph does not model: recurrent layers are outside darkprune's scope.
UNSUPPORTED = {"rnn", "gru", "lstm", "crnn", "conv_lstm", "history", "implicit", "normalization_unused"}


def layer_type(layer: Layer) -> LayerType:
    """The table entry of a layer of the graph (build_graph refuses types without one)."""
    return LAYER_TYPES[layer.type]


def role(layer: Layer) -> str:
    return LAYER_TYPES[layer.type].role(layer)


def passes_channels_through(layer: Layer) -> bool:
    """True for layers whose output channels are channels they read (PASS and TIED)."""
    return role(layer) in (PASS, TIED)
