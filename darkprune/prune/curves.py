"""Measuring one channel group's curve (the metric with each share of the group pruned) for the sensitivity analysis:
the divergence layer where a masked variant first differs from the original model (see analysis.py's doc on the
prefix cache), and the CurveMeasurer that keeps the network, the prefix cache and the metric's inputs between
groups. analysis.py runs it group after group in one process; cluster.py runs it on each Dask worker.
"""
from __future__ import annotations

import numpy as np

from ..darknet.layer_types import PRODUCER, layer_type, role
from ..darknet.model import Model
from ..engine.network import Network
from .criteria import channels_to_prune
from .groups import CROSS_CHANNEL_ACTIVATIONS, NONZERO_AT_ZERO, Group, Grouping, build_grouping
from .masks import masked_group_arrays
from .parallel_variants import ParallelMeasure, fast_enabled
from .variants import Measure, PrefixCache

def metric_name(model: Model) -> str:
    from ..darknet.heads import metric_name
    return metric_name(model.graph)


def evaluation_outputs(network: Network) -> list[int]:
    """The layers evaluate() reads: the [yolo]/[region] heads, or the classifier's output layer."""
    from ..detect import classifier_output, detection_heads
    heads = [index for index, _ in detection_heads(network.graph)]
    return heads or [classifier_output(network)]


# ----------------------------------------------------------------------------------------------------------------
# The masked variant of one group at one rate

def affected_layers(group: Group) -> list[int]:
    """Layers whose parameters masking `group` may change: its members and the layers reading its channels."""
    return group.affected_layers()


def masked_overrides(model: Model, group: Group, channels: np.ndarray,
                     grouping: Grouping | None = None) -> dict[int, dict[str, np.ndarray]]:
    """The parameters of the layers that masking `channels` of `group` changes, exactly as `apply_masks` changes
    them (members' filters, biases and batch-norm rows, standalone batch norms, per-channel shortcut weights and
    the input columns of every reader). Only those layers are copied."""
    grouping = grouping if grouping is not None else build_grouping(model.graph)
    return masked_group_arrays(model, group, channels, grouping)


def divergence_layer(grouping: Grouping, group: Group) -> tuple[int, set[int]]:
    """(d, zeroed): the first layer whose output, with any share of `group` masked, can differ from the original
    other than by the group's channels being exactly zero; and the layers before d whose outputs carry the group's
    (then zero) channels. Layers before d need not be recomputed: their outputs are the original ones with the
    pruned channels set to 0. Conservative: any layer these rules do not know to be safe counts as diverging."""
    graph = grouping.graph
    space = grouping.space
    gid = group.id
    owner = grouping.owner_group
    members = set(group.members)
    zeroed: set[int] = set()              # layers whose output is the original with some group channels at zero
    start = min(members)
    for layer in graph.layers[start:]:
        i = layer.index
        entry, a = layer_type(layer), layer.attrs
        ins_zeroed = [j for j in layer.inputs if j in zeroed]
        own_ids = space.ids[i]
        carries = bool((owner[own_ids] == gid).any())
        if role(layer) == PRODUCER:
            reads = space.input_ids(layer) if layer.sources else np.zeros(0, np.int64)
            reads_group = bool(ins_zeroed) and bool((owner[reads] == gid).any())
            if reads_group:
                if entry.blocks(layer) <= 1 or not _blocks_follow_group(grouping, layer, reads, own_ids, gid):
                    return i, zeroed
            if i in members or carries:
                if not _zero_at_zero(a.get("activation", "linear")):
                    return i, zeroed
                zeroed.add(i)
            elif reads_group:
                return i, zeroed            # (not reached: a grouped conv reading the group is a member)
            continue
        if not ins_zeroed:
            if carries:                     # group channels made by a member not yet reached: cannot happen
                return i, zeroed
            continue
        zero_at_zero = _zero_at_zero(a.get("activation", "linear"))
        # what the entry says about zeros: passed on always (route, upsample, a [batchnorm], whose pruned entries
        # apply_masks clears: 0 -> 0), after an activation that is 0 at 0, or by a sum of tied operands
        if entry.keeps_zero == "always" or (entry.keeps_zero == "activation" and zero_at_zero) or \
                (entry.keeps_zero == "tied" and zero_at_zero and _all_operands_carry(space, layer, owner, gid)):
            zeroed.add(i)
        else:
            return i, zeroed
    return len(graph) - 1, zeroed


def _zero_at_zero(act) -> bool:
    return NONZERO_AT_ZERO.get(act, 0.0) == 0.0 and act not in CROSS_CHANNEL_ACTIVATIONS


def _blocks_follow_group(grouping: Grouping, layer, reads: np.ndarray, own: np.ndarray, gid: int) -> bool:
    """A grouped conv reading the group's channels is safe when every block it reads a group channel in is one
    group channel as a whole (inputs and filters), so pruning that channel removes the whole block's filters."""
    g = layer_type(layer).blocks(layer)
    cin, n = len(reads) // g, len(own) // g
    owner, chan = grouping.owner_group, grouping.owner_channel
    for k in range(g):
        block_in, block_out = reads[k * cin:(k + 1) * cin], own[k * n:(k + 1) * n]
        if not (owner[block_in] == gid).any():
            continue
        ids = np.concatenate([block_in, block_out])
        if not ((owner[ids] == gid).all() and len(np.unique(chan[ids])) == 1):
            return False
    return True


def _all_operands_carry(space, layer, owner: np.ndarray, gid: int) -> bool:
    """Every operand of a shortcut has the group's channels at the same positions (they are tied)."""
    operands = [owner[space.operand(layer, k)] == gid for k in range(len(layer.sources))]
    return all(len(o) == len(operands[0]) and (o == operands[0]).all() for o in operands)


class CurveMeasurer:
    """Measures one group's curve (the metric at every rate) on one set of validation images: what that needs is
    built once and kept between groups (the network, the prefix cache moved forward group by group, the metric's
    Measure with its cached inputs). `analyze` visits its groups with one; each cluster worker keeps one too.
    Not thread-safe: one group at a time. `fast` (default: $DARKPRUNE_ANA_FAST, on) measures the variants on a
    pool of workers (parallel_variants.py), once per distinct set of pruned channels; `fast=False` one after
    another, every rate, with the same figures."""

    def __init__(self, model: Model, dataset, rates, criterion: str, divisible: int, batch: int,
                 prefix_cache: bool = True, cache_dir=None, grouping: Grouping | None = None,
                 network: Network | None = None, prefix: PrefixCache | None = None, fast: bool | None = None):
        self.model = model
        self.grouping = grouping if grouping is not None else build_grouping(model.graph)
        self.network = network if network is not None else Network(model)
        self.prefix = prefix if prefix is not None else PrefixCache(
            self.network, evaluation_outputs(self.network), len(dataset), enabled=prefix_cache)
        self.rates, self.criterion, self.divisible = list(rates), criterion, divisible
        self.batch, self.prefix_cache = batch, prefix_cache
        self.fast = fast_enabled(fast)
        if self.fast:               # the variants' batches on every core (parallel_variants.py)
            self.measure = ParallelMeasure(self.network, dataset, metric_name(model), batch, cache_dir)
            self.prefix.pool = self.measure.pool
        else:
            self.measure = Measure(self.network, dataset, metric_name(model), batch, cache_dir)
        self.positions: dict[int, tuple[int, set[int]]] = {}

    def position(self, group: Group) -> tuple[int, set[int]]:
        """The group's divergence layer and the layers before it carrying its channels (see divergence_layer)."""
        if group.id not in self.positions:
            self.positions[group.id] = divergence_layer(self.grouping, group)
        return self.positions[group.id]

    def curve(self, group: Group, bar=None, refit=None) -> dict[float, float]:
        """The metric with each rate of `group` pruned (each variant scored while the next one runs). `refit`
        (group, channels, overrides) -> overrides changes the variants (ana --reconstruct: SingleGroupRefit); it
        only touches layers reading the pruned channels, which the divergence layer does not precede."""
        position, zeroed_layers = self.position(group)
        scores = group.scores(self.model, self.criterion)
        if self.prefix_cache:
            self.prefix.advance(position, self.batch)
        futures, seen = {}, {}
        for rate in self.rates:
            chans = channels_to_prune(scores, rate, self.divisible)
            if self.fast and chans.tobytes() in seen:
                # a small group prunes the same channels at neighbouring rates: the same variant, the same figure
                futures[rate] = seen[chans.tobytes()]
                if bar is not None:
                    bar.update(1)
                continue
            overrides = masked_group_arrays(self.model, group, chans, self.grouping)
            variant = self.network.variant(overrides if refit is None else refit(group, chans, overrides))
            forward = None
            if self.prefix_cache:
                zero = _zero_positions(self.grouping, group, chans, self.prefix.need(position), zeroed_layers)
                forward = self.prefix.runner(variant, position, zero)
            futures[rate] = seen[chans.tobytes()] = self.measure.submit(variant, forward)
            if bar is not None:
                bar.update(1)
                _show_done(bar, group.id, futures, self.measure.metric)
        curve = {rate: future.result() for rate, future in futures.items()}
        if bar is not None:
            _show_done(bar, group.id, futures, self.measure.metric)
        return curve

    def close(self) -> None:
        self.prefix.pool = None
        self.measure.close()


def group_info(model: Model, group: Group) -> dict:
    """What the sensitivity file says about a group besides its curve."""
    return {"members": [model.graph[m].name for m in group.members], "channels": int(group.channels)}


def _show_done(bar, group_id: int, futures: dict, metric: str) -> None:
    """The progress bar's note: the last finished variant of this group (the newest one is usually still being
    scored)."""
    done = [rate for rate, future in futures.items() if future.done() and future.exception() is None]
    if done:
        rate = done[-1]
        bar.set_postfix_str(f"group {group_id} rate {rate:g}: {metric} {futures[rate].result():.4f}")


def _zero_positions(grouping: Grouping, group: Group, chans: np.ndarray, need: list[int],
                    zeroed_layers: set[int]) -> dict[int, np.ndarray]:
    """For each frontier layer carrying the group's channels: which of its output channels are pruned."""
    pruned = group.global_ids[chans].ravel()
    out = {}
    for i in need:
        if i in zeroed_layers:
            pos = np.flatnonzero(np.isin(grouping.space.ids[i], pruned))
            if len(pos):
                out[i] = pos
    return out
