"""Darknet's parameter update (update_convolutional_layer / update_connected_layer / update_batchnorm_layer /
update_shortcut_layer in AlexeyAB's darknet), with per-parameter masks that keep pruned weights exactly zero.

Darknet keeps, per parameter tensor, an `updates` buffer. Backward passes *add* their deltas to it (Darknet's deltas
are negative gradients), across every subdivision of a batch; then once per batch (batch = the cfg's `batch`, i.e.
mini_batch * subdivisions) the update runs:

    SGD (every tensor):     updates += -decay * batch * w          (only tensors with decay: weights, not biases/scales)
                            w       += learning_rate / batch * updates
                            updates *= momentum
    Adam ([net] adam=1):    updates += -decay * batch * w          (Darknet's GPU adam decays every tensor)
                            m = B1 m + (1 - B1) updates;  v = B2 v + (1 - B2) updates^2
                            w += learning_rate * (m / (1 - B1^t)) / (sqrt(v / (1 - B2^t)) + eps);  updates = 0
                            (t = the batch number after this batch's images were counted; AlexeyAB's CPU build has no
                            Adam at all, its GPU build does this)

Here the caller passes true gradients (dL/dparam summed over the images of the batch, the sign where
`param -= lr * grad` descends), with `accumulate(name, grad)` per (sub)batch or `step(grads, lr)` at once; the buffer
keeps Darknet's sign, so `updates` holds minus the accumulated gradient plus momentum, as Darknet's `*_updates` do.

Masks: `add(..., mask=...)` or `set_mask` with a boolean array broadcastable to the tensor (True = kept; e.g. shape
(n, 1, 1, 1) for whole output filters). A masked entry's value and every buffer entry for it are set to exactly 0 at
each update, so finetuning never revives a pruned weight and its momentum never builds up.

State (buffers, masks, step count) is saved by `state_dict()` / restored by `load_state_dict()`, so a resumed run
continues bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _clipped(v, clip):
    """Darknet's weight clipping (clip > 0): v limited to [-clip, clip]."""
    if clip > 0:
        if v > clip:
            return clip
        if v < -clip:
            return -clip
    return v


@njit(cache=True, parallel=True)
def _sgd_update(w, upd, keep, has_mask, lr_over_batch, momentum, decay_batch, clip):
    n = w.size
    for i in prange(n):
        if has_mask and keep[i] == 0:
            w[i] = 0
            upd[i] = 0
            continue
        u = upd[i] - decay_batch * w[i]
        w[i] = _clipped(w[i] + lr_over_batch * u, clip)
        upd[i] = momentum * u


@njit(cache=True, parallel=True)
def _adam_update(w, upd, m, v, keep, has_mask, rate, b1, b2, eps, decay_batch, t, clip):
    n = w.size
    c1 = 1.0 - b1 ** t
    c2 = 1.0 - b2 ** t
    for i in prange(n):
        if has_mask and keep[i] == 0:
            w[i] = 0
            upd[i] = 0
            m[i] = 0
            v[i] = 0
            continue
        d = upd[i] - decay_batch * w[i]
        m[i] = b1 * m[i] + (1 - b1) * d
        v[i] = b2 * v[i] + (1 - b2) * d * d
        mhat = m[i] / c1
        vhat = v[i] / c2
        w[i] = _clipped(w[i] + rate * mhat / (np.sqrt(vhat) + eps), clip)
        upd[i] = 0


@njit(cache=True, parallel=True)
def _subtract_into(upd, grad):
    for i in prange(upd.size):
        upd[i] -= grad[i]


@dataclass
class _Param:
    value: np.ndarray            # the live tensor, updated in place
    updates: np.ndarray          # Darknet's *_updates buffer (flat, same dtype)
    decay: bool
    lr_scale: float
    clip: float
    keep: np.ndarray             # flat uint8, empty when unmasked
    m: np.ndarray | None = None  # Adam moments
    v: np.ndarray | None = None


class DarknetSGD:
    """Darknet's optimizer for a set of named parameter tensors.

    batch: the cfg's full batch (mini_batch * subdivisions), Darknet's `update_batch`; learning rates given to
    `update` are the schedule's rate (Darknet's `get_current_rate`), scaled per tensor by its `lr_scale` (a layer's
    `learning_rate=` option, Darknet's `learning_rate_scale`). from_cfg takes Darknet's update_batch:
    (batch // subdivisions) * subdivisions."""

    def __init__(self, momentum: float = 0.9, decay: float = 0.0001, batch: int = 1, adam: bool = False,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 0.000001):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.momentum = float(momentum)
        self.decay = float(decay)
        self.batch = int(batch)
        self.adam = bool(adam)
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)
        self.params: dict[str, _Param] = {}
        self.updates_done = 0

    @classmethod
    def from_cfg(cls, source) -> "DarknetSGD":
        """From a Graph, Cfg or [net] Section: momentum, decay, batch, adam/B1/B2/eps with Darknet's defaults."""
        cfg = getattr(source, "cfg", source)
        net = getattr(cfg, "net", cfg)
        adam = bool(net.get_int("adam", 0))
        subdivisions = max(1, net.get_int("subdivisions", 1))
        # Darknet's update_batch = (batch / subdivisions, an int) * subdivisions
        batch = max(1, net.get_int("batch", 1) // subdivisions) * subdivisions
        return cls(momentum=net.get_float("momentum", 0.9), decay=net.get_float("decay", 0.0001),
                   batch=batch, adam=adam,
                   b1=net.get_float("B1", 0.9) if adam else 0.9, b2=net.get_float("B2", 0.999) if adam else 0.999,
                   eps=net.get_float("eps", 0.000001) if adam else 0.000001)

    # -- registration -------------------------------------------------------------------------------------------
    def add(self, name: str, value: np.ndarray, *, decay: bool, mask: np.ndarray | None = None,
            lr_scale: float = 1.0, clip: float = 0.0) -> None:
        """Register a tensor updated in place. decay=True for conv/connected/shortcut weights, False for biases,
        batch-norm scales (Darknet's rule). `clip` > 0 constrains the values to [-clip, clip] after each update
        (a layer's `clip=` option)."""
        if name in self.params:
            raise ValueError(f"parameter '{name}' is already registered")
        if value.dtype not in (np.float32, np.float64) or not value.flags.c_contiguous:
            raise ValueError(f"{name}: parameters must be C-contiguous float32/float64 arrays")
        p = _Param(value, np.zeros(value.size, value.dtype), bool(decay), float(lr_scale), float(clip),
                   np.zeros(0, np.uint8))
        if self.adam:
            p.m = np.zeros(value.size, value.dtype)
            p.v = np.zeros(value.size, value.dtype)
        self.params[name] = p
        if mask is not None:
            self.set_mask(name, mask)

    def set_mask(self, name: str, mask: np.ndarray | None) -> None:
        """Hold `name`'s masked entries at zero from now on (their value and buffers are zeroed right away)."""
        p = self.params[name]
        if mask is None:
            p.keep = np.zeros(0, np.uint8)
            return
        try:
            keep = np.broadcast_to(np.asarray(mask, bool), p.value.shape)
        except ValueError:
            raise ValueError(f"{name}: mask of shape {np.shape(mask)} does not broadcast to {p.value.shape}") from None
        p.keep = np.ascontiguousarray(keep, np.uint8).reshape(-1)
        flat = p.value.reshape(-1)
        dead = p.keep == 0
        flat[dead] = 0
        p.updates[dead] = 0
        if p.m is not None:
            p.m[dead] = 0
            p.v[dead] = 0

    # -- training -----------------------------------------------------------------------------------------------
    def accumulate(self, name: str, grad: np.ndarray) -> None:
        """Add one (sub)batch's gradient dL/dparam (summed over its images) for `name`."""
        p = self.params[name]
        g = np.ascontiguousarray(grad, p.value.dtype).reshape(-1)
        if g.size != p.value.size:
            raise ValueError(f"{name}: gradient has {g.size} values, the parameter {p.value.size}")
        _subtract_into(p.updates, g)

    def update(self, learning_rate: float, t: int | None = None) -> None:
        """Darknet's update for every tensor with the schedule's current rate. For Adam `t` is Darknet's batch number
        after this batch (default: the number of updates done so far, this one included)."""
        self.updates_done += 1
        t = self.updates_done if t is None else int(t)
        for p in self.params.values():
            dt = p.value.dtype.type
            rate = float(learning_rate) * p.lr_scale
            flat = p.value.reshape(-1)
            has_mask = p.keep.size > 0
            if self.adam:
                _adam_update(flat, p.updates, p.m, p.v, p.keep, has_mask, dt(rate), dt(self.b1), dt(self.b2),
                             dt(self.eps), dt(self.decay * self.batch), max(t, 1), dt(p.clip))
            else:
                decay_batch = self.decay * self.batch if p.decay else 0.0
                _sgd_update(flat, p.updates, p.keep, has_mask, dt(rate / self.batch), dt(self.momentum),
                            dt(decay_batch), dt(p.clip))

    def step(self, grads: dict[str, np.ndarray], learning_rate: float, t: int | None = None) -> None:
        """accumulate() every gradient in `grads` (missing names get none), then update()."""
        for name, g in grads.items():
            self.accumulate(name, g)
        self.update(learning_rate, t)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Buffers, masks and the update count as flat arrays (np.savez-able); parameter values are not included."""
        out: dict[str, np.ndarray] = {"__updates_done__": np.array([self.updates_done], np.int64)}
        for name, p in self.params.items():
            out[f"{name}/updates"] = p.updates
            out[f"{name}/keep"] = p.keep
            if p.m is not None:
                out[f"{name}/m"] = p.m
                out[f"{name}/v"] = p.v
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.updates_done = int(np.asarray(state["__updates_done__"]).reshape(-1)[0])
        for name, p in self.params.items():
            upd = np.asarray(state[f"{name}/updates"])
            if upd.size != p.value.size:
                raise ValueError(f"{name}: checkpoint holds {upd.size} update values, the parameter {p.value.size}")
            p.updates[...] = upd.reshape(-1)
            keep = np.asarray(state.get(f"{name}/keep", np.zeros(0, np.uint8)), np.uint8).reshape(-1)
            p.keep = keep.copy()
            if p.m is not None:
                p.m[...] = np.asarray(state[f"{name}/m"]).reshape(-1)
                p.v[...] = np.asarray(state[f"{name}/v"]).reshape(-1)
