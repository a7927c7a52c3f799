"""Activation memory of the network runner: one arena per thread, laid out once per kind of forward.

A batched forward used to allocate every activation afresh; the C library serves arrays of megabytes with fresh
mappings, so every layer of every batch paid page faults and zero-filling. Instead the runner plans, for a given
(batch size, first and last layer, wanted outputs), where each intermediate output lives in one flat arena: the
outputs' lifetimes are known from the graph (from the producing layer to its last reader), and outputs whose
lifetimes overlap get disjoint ranges (greedy by size, largest first, each at the lowest free offset), so the arena
is about the size of the largest set of outputs alive at once. Plans are cached; each thread keeps one arena (grown
to the largest plan it ran), reused by every later forward on that thread, of that Network and of its variants.

What may live in the arena: the output of a layer whose kernel writes into a given buffer (`EngineOps.into`), that
is not returned and cannot become part of a returned array. The last point is decided conservatively: a layer
without `into` might return its input itself (an identity such as [dropout]), so an output read by such a layer
lives as long as that layer's output, and stays out of the arena when that one is returned. Inputs the caller
passes (the batch, `cached` frontier outputs) are never in an arena, nor is anything a forward returns: a caller may
keep every array it got back.
"""
from __future__ import annotations

import threading

import numpy as np

_ALIGN = 16   # elements (64 bytes) between the starts of two outputs


class ArenaPlan:
    """Offsets (in elements) of the arena-resident outputs of one kind of forward, and the arena size they need.

    blocks: {block: (elements, (first layer, last layer))}, ranges of the arena placed so that blocks alive at the
    same time do not overlap; members: {layer: (block, offset in the block, elements)}, where each output lives."""

    def __init__(self, blocks: dict[int, tuple[int, tuple[int, int]]], members: dict[int, tuple[int, int, int]],
                 fused: set[int] = frozenset()):
        start: dict[int, int] = {}
        placed: list[tuple[int, int, int, int]] = []        # (start, end, first layer, last layer)
        for blk in sorted(blocks, key=lambda k: (-blocks[k][0], k)):
            count, (t0, t1) = blocks[blk]
            size = -(-count // _ALIGN) * _ALIGN
            offset = 0
            for lo, hi in sorted((lo, hi) for lo, hi, a, b in placed if a <= t1 and t0 <= b):
                if offset + size <= lo:
                    break
                offset = max(offset, hi)
            start[blk] = offset
            placed.append((offset, offset + size, t0, t1))
        self.offsets = {i: start[blk] + off for i, (blk, off, _) in members.items()}
        self.sizes = {i: count for i, (_, _, count) in members.items()}
        self.fused = set(fused)     # routes whose inputs were written in place: nothing left to copy
        self.size = max((hi for _, hi, _, _ in placed), default=0)


def _lifetimes(graph, start, last, wanted, consumers, writes_into):
    """For each layer start..last: the last layer that may read its output (directly or through a layer that might
    pass it on), and whether it may become part of a returned array."""
    end: dict[int, int] = {}
    escapes: dict[int, bool] = {}
    for index in range(last, start - 1, -1):
        until, escaped = index, index in wanted
        for k in consumers.get(index, []):
            if k > last:
                continue
            until = max(until, k)
            if not writes_into(graph[k]):      # k may hand on (a view of) its input as its output
                until = max(until, end[k])
                escaped = escaped or escapes[k]
        end[index], escapes[index] = until, escaped
    return end, escapes


def _elements(batch, shape):
    count = batch
    for s in shape:
        count *= int(s)
    return count


def plan_arena(graph, batch: int, start: int, last: int, wanted: set, consumers: dict, writes_into) -> ArenaPlan:
    """The ArenaPlan of running layers start..last on `batch` images. consumers: {layer: [readers]};
    writes_into(layer) -> whether the layer's kernel writes into a buffer it is given.

    With one image, a concatenating [route] (groups=1) whose inputs are all produced here, in the arena, and in no
    other such route, gets one block, and its inputs are written straight into their channels of it."""
    end, escapes = _lifetimes(graph, start, last, wanted, consumers, writes_into)
    resident = [i for i in range(start, last + 1) if not escapes[i] and writes_into(graph[i])]
    blocks, members, fused, taken = {}, {}, set(), set()
    if batch == 1:
        for index in resident:
            layer = graph[index]
            ins = layer.inputs
            if (layer.type != "route" or layer.attrs["groups"] != 1 or len(ins) < 2 or len(set(ins)) != len(ins)
                    or any(i < start or i in taken or i in fused or escapes[i] or not writes_into(graph[i])
                           or graph[i].out_shape[1:] != layer.out_shape[1:] for i in ins)):
                continue
            offset = 0
            for i in ins:
                members[i] = (index, offset, _elements(1, graph[i].out_shape))
                offset += members[i][2]
            members[index] = (index, 0, _elements(1, layer.out_shape))
            blocks[index] = (members[index][2], (min(ins), max([end[index]] + [end[i] for i in ins])))
            fused.add(index)
            taken.update(ins)
    for index in resident:
        if index not in members:
            members[index] = (index, 0, _elements(batch, graph[index].out_shape))
            blocks[index] = (members[index][2], (index, end[index]))
    return ArenaPlan(blocks, members, fused)


class Arenas:
    """Per-thread arenas and the plan cache of one Network (shared with its variants: the same graph). An arena
    belongs to its thread (threading.local): it goes when the thread or the Network does."""

    def __init__(self):
        self.plans: dict[tuple, ArenaPlan] = {}
        self._local = threading.local()

    def arena(self, elements: int) -> np.ndarray:
        """This thread's arena, at least `elements` float32 long."""
        buf = getattr(self._local, "arena", None)
        if buf is None or buf.size < elements:
            self._local.arena = buf = None      # free the old one before making the larger one
            buf = np.empty(max(elements, 1), np.float32)
            self._local.arena = buf
        return buf

    def release(self) -> None:
        """Free this thread's arena (plans are kept)."""
        self._local.arena = None


class Slots:
    """One forward's allocator: alloc(layer)(shape) -> the layer's range of the arena, reshaped (a fresh array
    when the layer has no range in the plan or asks for another size than planned)."""

    def __init__(self, plan: ArenaPlan, arena: np.ndarray):
        self.plan = plan
        self.arena = arena

    def in_place(self, index: int, ins) -> bool:
        """Whether fused route `index`'s inputs are where the plan put them (then its output is already there)."""
        base = self.arena.ctypes.data
        for i, a in ins:
            offset = self.plan.offsets.get(i)
            if (offset is None or a.size != self.plan.sizes[i] or a.dtype != np.float32
                    or a.ctypes.data != base + 4 * offset or not a.flags.c_contiguous):
                return False
        return True

    def alloc(self, index: int):
        offset = self.plan.offsets.get(index)

        def take(shape, dtype=np.float32):
            count = 1
            for s in shape:
                count *= int(s)
            if offset is None or count != self.plan.sizes[index] or np.dtype(dtype) != np.float32:
                return np.empty(shape, dtype)
            return self.arena[offset:offset + count].reshape(shape)
        return take
