"""Channel dependency groups: which output channels of which layers must be pruned together.

Every layer's output channels are traced back to the layer that *made* them (a convolutional or connected layer, the
network input, or a layer that mixes channels, such as [reorg]). Pass-through layers (route, maxpool, avgpool,
upsample, dropout, [batchnorm], [activation], shortcut, scale_channels, sam, ...) only forward channels made
elsewhere, so each layer's output is a list of "channel ids" in one global numbering. Ties between channel ids are
collected with a union-find:

- all inputs of a [shortcut] are added channel by channel, so their channel i are one (and so, transitively, is every
  producer reaching the shortcut through pass-through layers, and every shortcut in the same residual chain);
- a grouped convolution (groups > 1) is tied block by block: its k-th block of input channels and its k-th block of
  filters are removed together, or not at all, so that `groups=` can simply count the kept blocks. For a depthwise
  conv (groups == channels == filters) a block is one channel: pruning input channel i removes filter i. For other
  grouped convs (e.g. ResNeXt, groups=32 over 128 channels) whole groups are removed: the exact choice; pruning a few
  channels inside each group would need every group to keep the same number, which Darknet's cfg cannot express
  otherwise;
- a route with `groups`/`group_id` reads one slice of its producer, and Darknet computes that slice from the
  producer's channel count, so the slices are tied symmetrically: channel i is pruned in every slice or in none;
- [scale_channels] multiplies feature channel i by scale i, so the scale vector's producer (the SE block's last conv)
  and the feature map are tied; [sam] multiplies two maps of equal shape channel-wise, so they are tied too;
- a route concatenation ties nothing: a consumer after a route just sees several producers' channels at offsets.

Channels are never prunable ("fixed") when they reach a detection head ([yolo], [region], [detection],
[Gaussian_yolo]) or a layer that mixes channels ([softmax], [reorg], lrn, [local], [crop], a depth maxpool, ...),
when they are the network output or input, when a layer shares weights (`share_index`) or is binary (`xnor`), or
when pruning would not give an exact zero: a producer whose activation is not 0 at 0 (logistic, plse) outputs a
constant, not zero, for a pruned channel. That constant is harmless only when it is multiplied by a pruned (zero)
partner channel, which is exactly the SE case (logistic scale -> [scale_channels]); everywhere else the group is
fixed. A fixed channel fixes every channel tied to it.

A `Group` then collects the connected components that have the same make-up (the same producers, the same number of
channels from each), so the usual group is "channel i of conv A, of conv B and of conv C, for i in 0..n-1". Its
`parts` say which channel of which member each group channel is (a member appears twice when a route slices it in
halves), and `consumers` which layers read the channels and at which of their input channels. A group scores its
channels (`scores`, the criteria), picks the channels a rate prunes (`channels_at`), names its masks (`masks`) and
the layers masking it changes (`affected_layers`); masks.py applies and transform.py removes them (both import
this module, never the other way round, so the pruning modules form no import circle).

What each layer type does to channels (makes them, passes them on, ties its operands, keeps them all as a head, mixes
them) is read from the layer-type table (darknet/layer_types.py), never from type names here. `build_grouping`
returns a `Grouping`, which callers build once per graph and pass to masks, transform and the analysis.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from ..darknet.graph import Graph, Layer
from ..darknet.layer_types import HEAD, MIXER, PRODUCER, layer_type, passes_channels_through, role
from ..errors import DarkpruneError, SettingError
from .criteria import CRITERIA, channels_to_prune, check_criterion, member_scores  # noqa: F401 (CRITERIA re-exported)

# Darknet's elementwise activations that are not 0 at 0 (every other one is: linear, leaky, relu, mish, swish, ...).
NONZERO_AT_ZERO = {"logistic": 0.5, "plse": 0.5}
# Activations that mix channels: a pruned channel would change the others.
CROSS_CHANNEL_ACTIVATIONS = {"normalize_channels", "normalize_channels_softmax", "normalize_channels_softmax_maxval"}

INPUT = -1      # the network input's node id


@dataclass
class Part:
    """One member's share of a group: group channel j is channel `channels[j]` of layer `layer`."""
    layer: int
    channels: np.ndarray


@dataclass
class Consumer:
    """A layer reading a group's channels: input channel `positions[k]` of `layer` is group channel
    `group_channels[k]` (a [connected] layer's input channel c covers its flattened inputs c*H*W..(c+1)*H*W-1)."""
    layer: int
    positions: np.ndarray
    group_channels: np.ndarray


@dataclass
class Group:
    id: int
    members: list[int]                  # producer layer indices (convolutional / connected)
    channels: int                       # how many channels the group has (each one is pruned as a unit)
    prunable: bool
    reason: str = ""                    # why not, when not prunable
    parts: list[Part] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    global_ids: np.ndarray | None = field(default=None, repr=False)   # (channels, k) ids in the ChannelSpace

    def describe(self, graph: Graph | None = None) -> str:
        def name(i: int) -> str:
            return graph[i].name if graph is not None else str(i)
        members = ", ".join(name(m) for m in self.members)
        counts = Counter(p.layer for p in self.parts)
        sliced = [name(m) for m, k in counts.items() if k > 1]
        text = f"group {self.id}: {self.channels} channel{'s' * (self.channels != 1)} of {members}"
        if sliced:
            text += f" (sliced symmetrically: {', '.join(sliced)})"
        readers = sorted({c.layer for c in self.consumers})
        if readers:
            text += "; read by " + ", ".join(name(r) for r in readers)
        text += "; prunable" if self.prunable else f"; not prunable: {self.reason}"
        return text

    # -- behaviour: its scores (criteria), its masks, its slice (transform) --------------------------------------
    def scores(self, model, criterion: str = "l1") -> np.ndarray:
        """Importance of each of the group's channels (float64, length `channels`); low = pruned first. `l1`: the
        L1 norm of each filter (a conv's weights[i], a connected layer's row i), summed over the members (a member
        that a route slices in halves counts once per slice); `bn`: |gamma| (batch-norm `scales`) of the members
        that have batch norm, the filter L1 norm of those that do not."""
        check_criterion(criterion)
        scores = np.zeros(self.channels, dtype=np.float64)
        for part in self.parts:
            arrays = model.params.get(part.layer)
            if not arrays:          # a conv sharing another's weights (never prunable): nothing to score
                continue
            scores += member_scores(arrays, part.channels, criterion)
        return scores

    def channels_at(self, model, rate: float, criterion: str = "l1", divisible: int = 1) -> np.ndarray:
        """The channels pruning `rate` of the group removes: the lowest-scoring ones (criteria.channels_to_prune)."""
        return channels_to_prune(self.scores(model, criterion), rate, divisible)

    def masks(self, channels) -> dict[int, np.ndarray]:
        """The masks that prune `channels` of this group alone ({group id: channels}, as apply_masks takes)."""
        return {self.id: np.asarray(channels, dtype=np.int64)}

    def affected_layers(self) -> list[int]:
        """Layers whose parameters masking the group may change: its members and the layers reading its channels."""
        return sorted({p.layer for p in self.parts} | {c.layer for c in self.consumers})


def describe_groups(groups: list[Group], graph: Graph | None = None) -> str:
    prunable = sum(g.prunable for g in groups)
    lines = [f"{len(groups)} channel groups, {prunable} prunable "
             f"({sum(g.channels for g in groups if g.prunable)} of {sum(g.channels for g in groups)} channels)"]
    lines += ["  " + g.describe(graph) for g in groups]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
class ChannelSpace:
    """The global channel numbering: every node (a layer that makes channels, or the network input) owns a range of
    ids, and `ids[layer]` lists the ids of a layer's output channels in order."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.base: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.ids: dict[int, np.ndarray] = {}
        total = 0

        def new_node(node: int, channels: int) -> np.ndarray:
            nonlocal total
            self.base[node], self.count[node] = total, channels
            total += channels
            return np.arange(self.base[node], total, dtype=np.int64)

        self.ids[INPUT] = new_node(INPUT, graph.input_shape[0])
        for layer in graph:
            if passes_channels_through(layer):
                out = self._pass_through(layer)
            else:
                out = new_node(layer.index, layer.out_shape[0])
            if len(out) != layer.out_shape[0]:
                raise DarkpruneError(f"{layer.where()}: {len(out)} channels traced, the graph says "
                                     f"{layer.out_shape[0]} (internal error in channel tracing)")
            self.ids[layer.index] = out
        self.total = total
        self.nodes = sorted(self.base, key=self.base.get)
        self._starts = np.array([self.base[n] for n in self.nodes], dtype=np.int64)

    def operand(self, layer: Layer, k: int) -> np.ndarray:
        src = layer.sources[k]
        return self.ids[src.layer][src.start:src.stop]

    def input_ids(self, layer: Layer) -> np.ndarray:
        """The channel ids a layer reads, concatenated in its sources' order."""
        return np.concatenate([self.operand(layer, k) for k in range(len(layer.sources))])

    def _pass_through(self, layer: Layer) -> np.ndarray:
        """The channels a pass-through layer outputs: the operand its table entry names (a [scale_channels]
        outputs the feature map it scales), or all of them concatenated (a route)."""
        passes = layer_type(layer).passes
        return self.input_ids(layer) if passes is None else self.operand(layer, passes)

    def node_of(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.nodes, dtype=np.int64)[np.searchsorted(self._starts, ids, side="right") - 1]

    def layer_channels(self, node: int, ids: np.ndarray) -> np.ndarray:
        return ids - self.base[node]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)



@dataclass
class Grouping:
    """Everything build_grouping computes: the groups, the channel numbering, and which group channel each id is.
    Callers build it once per graph and pass it on (to masks, transform, the criteria, the analysis)."""
    graph: Graph
    space: ChannelSpace
    groups: list[Group]
    owner_group: np.ndarray           # id -> group id (-1: not in a group, e.g. network input channels)
    owner_channel: np.ndarray         # id -> group channel

    def group(self, group_id: int) -> Group:
        if not 0 <= group_id < len(self.groups):
            raise DarkpruneError(f"no channel group {group_id} in {self.graph.cfg.path} "
                                 f"(it has groups 0..{len(self.groups) - 1})")
        return self.groups[group_id]

    def excluding(self, exclude) -> "Grouping":
        """The same grouping with every group holding a channel of an `exclude`d layer (indices or names such as
        conv12) made unprunable. Group ids do not change, so masks saved under one exclude list stay valid."""
        indices = _resolve_exclude(self.graph, exclude)
        if not indices:
            return self
        groups = list(self.groups)
        for index in indices:
            why = f"excluded by the user ({self.graph[index].name})"
            for gid in np.unique(self.owner_group[self.space.ids[index]]).tolist():
                if gid >= 0 and groups[gid].prunable:
                    groups[gid] = replace(groups[gid], prunable=False, reason=why)
        return replace(self, groups=groups)


def _fix(reasons: list, ids, reason: str) -> None:
    for i in np.asarray(ids).tolist():
        if reasons[i] is None:
            reasons[i] = reason


def _activation_of(layer: Layer) -> str | None:
    return layer.attrs.get("activation")


def _constant_is_zeroed(layer: Layer, space: ChannelSpace, graph: Graph, readers: dict[int, list[int]]) -> bool:
    """A producer whose activation is not 0 at 0 may still be pruned when everything reading its channels (through
    layers that keep a constant a constant) multiplies them by a tied channel made by a zero-at-zero producer: the
    SE block's logistic scale feeding [scale_channels]."""
    own = set(space.ids[layer.index].tolist())
    for reader in readers.get(layer.index, []):
        r = graph[reader]
        entry = layer_type(r)
        if entry.keeps_constant:
            continue       # the constant travels on; what reads it next is checked through `readers`
        operands = [set(space.operand(r, k).tolist()) for k in range(len(r.sources))]
        touched = [k for k, ops in enumerate(operands) if ops & own]
        partner_of = entry.multiplies(r)
        if len(touched) != 1 or touched[0] not in partner_of:
            return False
        partner = space.operand(r, partner_of[touched[0]])
        for node in set(space.node_of(partner).tolist()):
            if node == INPUT or role(graph[node]) != PRODUCER or \
                    NONZERO_AT_ZERO.get(_activation_of(graph[node]), 0.0) != 0.0:
                return False
    return True


def _transitive_readers(graph: Graph, space: ChannelSpace) -> dict[int, list[int]]:
    """For each producer, the layers reading any of its channels (directly or after pass-through layers)."""
    out: dict[int, list[int]] = {}
    for layer in graph:
        ids = space.input_ids(layer) if layer.sources else np.zeros(0, np.int64)
        for node in set(space.node_of(ids).tolist()):
            out.setdefault(node, []).append(layer.index)
    return out


def _resolve_exclude(graph: Graph, exclude) -> list[int]:
    out = []
    for item in exclude or ():
        if isinstance(item, (int, np.integer)):
            if not 0 <= int(item) < len(graph):
                raise SettingError("exclude", f"exclude {item}: no layer {item} in {graph.cfg.path} (it has layers "
                                              f"0..{len(graph) - 1})")
            out.append(int(item))
        else:
            text = str(item).strip()
            if not text:
                continue
            out.append(graph.find(text).index)
    return out


def _layer_rules(layer: Layer, graph: Graph, space: ChannelSpace, uf: _UnionFind, reasons: list) -> None:
    """What one layer's table entry says about the channels it reads and makes: the ones it fixes (a head's or a
    channel mixer's inputs, an activation that is not 0 at 0 or mixes channels, a lock such as weight sharing), and
    the ones it ties (a shortcut's operands, a grouped conv's blocks, a route's symmetric slices)."""
    entry, kind = layer_type(layer), role(layer)
    own = space.ids[layer.index]
    reads = space.input_ids(layer) if layer.sources else np.zeros(0, np.int64)
    if kind == HEAD:
        _fix(reasons, reads, f"feeds the [{layer.section.header}] head (layer {layer.index})")
    elif kind == MIXER:
        _fix(reasons, reads, f"read by [{layer.section.header}] layer {layer.index}, which mixes channels")
    act = _activation_of(layer)
    if act in CROSS_CHANNEL_ACTIVATIONS:
        _fix(reasons, own, f"layer {layer.index} has the cross-channel activation {act}")
    elif act in NONZERO_AT_ZERO and kind != PRODUCER:
        _fix(reasons, own, f"layer {layer.index}'s activation {act}(0)={NONZERO_AT_ZERO[act]} is not 0")
    for why, others in entry.locks(layer):
        _fix(reasons, own, why)
        _fix(reasons, reads, why)
        for other in others:
            _fix(reasons, space.ids[other], why)
            _fix(reasons, space.input_ids(graph[other]), why)
    blocks = entry.blocks(layer)
    if blocks > 1:
        cin, n = len(reads) // blocks, len(own) // blocks
        for k in range(blocks):
            block = np.concatenate([reads[k * cin:(k + 1) * cin], own[k * n:(k + 1) * n]])
            uf.tie(block[:1].repeat(len(block) - 1), block[1:])
    tied = entry.tied(layer)
    if tied:
        operands = [space.operand(layer, k) for k in tied]
        if len({len(o) for o in operands}) > 1:
            why = f"[{layer.type}] layer {layer.index} adds inputs with different channel counts"
            for o in operands:
                _fix(reasons, o, why)
        else:
            for o in operands[1:]:
                uf.tie(operands[0], o)
    slices = entry.slices(layer)
    if slices > 1:
        for src in layer.sources:
            full = space.ids[src.layer]
            part = len(full) // slices
            for k in range(1, slices):
                uf.tie(full[:part], full[k * part:(k + 1) * part])


def _channel_rules(graph: Graph, space: ChannelSpace) -> tuple[np.ndarray, list]:
    """Union-find roots of every channel id, and per id the first reason it cannot be pruned (None: it can)."""
    uf = _UnionFind(space.total)
    reasons: list = [None] * space.total
    # Nodes that are not producer layers (convolutional/connected) are never pruned.
    _fix(reasons, space.ids[INPUT], "tied to the network input")
    for layer in graph:
        if role(layer) in (HEAD, MIXER):
            _fix(reasons, space.ids[layer.index], f"made by [{layer.section.header}] layer {layer.index}")
    for layer in graph:
        _layer_rules(layer, graph, space, uf, reasons)
    for index in graph.output_layers():
        if role(graph[index]) != HEAD:
            _fix(reasons, space.ids[index], f"network output (layer {index})")
    readers = _transitive_readers(graph, space)
    for layer in graph:
        act = _activation_of(layer)
        if role(layer) == PRODUCER and act in NONZERO_AT_ZERO and \
                not _constant_is_zeroed(layer, space, graph, readers):
            _fix(reasons, space.ids[layer.index],
                 f"{layer.name}'s activation {act}(0)={NONZERO_AT_ZERO[act]} is not 0, so a pruned channel "
                 f"would not output zero")
    return uf.roots(), reasons


def _components(graph: Graph, space: ChannelSpace, roots: np.ndarray, reasons: list) -> list[tuple]:
    """The connected components holding a producer's channels, bucketed by make-up (the nodes of their ids, and
    whether they are fixed), as (first member, its first channel, members, parts, ids, reason), in group order."""
    # Components, each as its ids ascending (so ordered by node, then channel); a component's root is its smallest
    # id, so sorting by root orders components by where they start.
    order = np.lexsort((np.arange(space.total), roots))
    cuts = (np.flatnonzero(np.diff(roots[order])) + 1).tolist()
    order_list = order.tolist()
    nodes_list = space.node_of(order).tolist()
    producer_nodes = {l.index for l in graph if role(l) == PRODUCER}

    buckets: dict[tuple, list[list[int]]] = {}
    bucket_reason: dict[tuple, str] = {}
    for start, stop in zip([0] + cuts, cuts + [space.total]):
        nodes = tuple(nodes_list[start:stop])
        if not producer_nodes.intersection(nodes):
            continue
        comp = order_list[start:stop]
        why = next((reasons[i] for i in comp if reasons[i] is not None), None)
        key = (nodes, why is not None)
        buckets.setdefault(key, []).append(comp)
        if why is not None and key not in bucket_reason:
            bucket_reason[key] = why

    raw_groups = []
    for key, comps in buckets.items():
        ids = np.array(comps, dtype=np.int64)               # (channels, k)
        parts = [Part(node, space.layer_channels(node, ids[:, col])) for col, node in enumerate(key[0])
                 if node in producer_nodes]
        members = sorted({p.layer for p in parts})
        raw_groups.append((members[0], int(parts[0].channels[0]), members, parts, ids, bucket_reason.get(key, "")))
    raw_groups.sort(key=lambda g: (g[0], g[1]))
    return raw_groups


def _attach_consumers(graph: Graph, space: ChannelSpace, groups: list[Group], owner_group: np.ndarray,
                      owner_channel: np.ndarray) -> None:
    """Consumers: layers whose parameters are indexed by the channels they read (their entry's slicing says by
    which: the channels they read, or, for a per-channel shortcut, their own)."""
    for layer in graph:
        indexed_by = layer_type(layer).slicing(layer).indexed_by
        if indexed_by is None or not layer.sources:
            continue
        reads = space.ids[layer.index] if indexed_by == "output" else space.input_ids(layer)
        owners = owner_group[reads]
        for gid in np.unique(owners[owners >= 0]).tolist():
            positions = np.flatnonzero(owners == gid)
            groups[gid].consumers.append(Consumer(layer.index, positions, owner_channel[reads[positions]]))


def build_grouping(graph: Graph, exclude=()) -> Grouping:
    """The channel groups of `graph` with the channel bookkeeping that masks and transform need. Group ids depend
    only on the graph (never on `exclude`, which only marks groups unprunable: see Grouping.excluding), so masks
    saved under one exclude list stay valid."""
    space = ChannelSpace(graph)
    roots, reasons = _channel_rules(graph, space)
    owner_group = np.full(space.total, -1, dtype=np.int64)
    owner_channel = np.full(space.total, -1, dtype=np.int64)
    groups = []
    for gid, (_, _, members, parts, ids, why) in enumerate(_components(graph, space, roots, reasons)):
        channels = ids.shape[0]
        prunable = not why
        if prunable and channels == 1:
            prunable, why = False, "a single channel (every group keeps at least one)"
        groups.append(Group(gid, members, channels, prunable, why, parts, [], ids))
        owner_group[ids] = gid
        owner_channel[ids] = np.arange(channels)[:, None]
    _attach_consumers(graph, space, groups, owner_group, owner_channel)
    return Grouping(graph, space, groups, owner_group, owner_channel).excluding(exclude)


def find_groups(graph: Graph, exclude=()) -> list[Group]:
    """The channel dependency groups of `graph`, ordered by their first member. `exclude` (layer indices or names
    such as conv12) makes every group holding one of those layers' output channels unprunable."""
    return build_grouping(graph, exclude).groups
