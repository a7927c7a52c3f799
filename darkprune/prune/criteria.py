"""Channel importance within a group, and which channels a pruning rate removes.

`l1` (the default): the L1 norm of each filter (a conv's weights[i] over its input channels and kernel, a connected
layer's row i), summed over the group's members (a member that a route slices in halves counts once per slice).
`bn`: |gamma| (batch-norm `scales`) summed over the members that have batch norm; a member without batch norm
contributes its filter L1 norm instead. Both are deterministic functions of the weights.
"""
from __future__ import annotations

import math

import numpy as np

from ..darknet.model import Model
from ..errors import SettingError

CRITERIA = ("l1", "bn")


def check_criterion(criterion: str) -> str:
    """`criterion` itself when it is one of CRITERIA, else a SettingError naming the choices."""
    if criterion not in CRITERIA:
        raise SettingError("criterion", f"criterion {criterion}: expected one of {', '.join(CRITERIA)}")
    return criterion


def member_scores(arrays: dict, channels: np.ndarray, criterion: str) -> np.ndarray:
    """One group member's contribution to its group's channel scores: |gamma| of `channels` for `bn` when the layer
    has batch norm, else the L1 norm of each of those filters (rows of a connected layer)."""
    if criterion == "bn" and "scales" in arrays:
        return np.abs(arrays["scales"][channels].astype(np.float64))
    w = arrays["weights"][channels].astype(np.float64)
    return np.abs(w).reshape(len(channels), -1).sum(axis=1)


def channel_scores(model: Model, group, criterion: str = "l1") -> np.ndarray:
    """Importance of each of the group's channels (float64, length group.channels); low = pruned first. The group
    scores itself (Group.scores); this is the functional spelling."""
    return group.scores(model, criterion)


def kept_count(channels: int, rate: float, divisible: int = 1) -> int:
    """How many of `channels` survive pruning `rate` of them: channels - round(rate * channels) (half up), at least
    one. With `divisible` > 1 the count is rounded *up* to a multiple of it, so rounding never prunes more than asked;
    if that multiple exceeds `channels`, all channels are kept, and if `channels` < `divisible` (no multiple fits)
    the count stays as computed."""
    if not 0.0 <= rate <= 1.0:
        raise SettingError("rate", f"rate {rate}: a pruning rate must be between 0 and 1")
    if divisible < 1:
        raise SettingError("divisible", f"divisible {divisible}: must be >= 1")
    keep = max(1, channels - int(math.floor(rate * channels + 0.5)))     # round half up, not Python's banker's
    if divisible > 1 and keep % divisible:
        up = -(-keep // divisible) * divisible
        if up <= channels:
            keep = up
        elif channels >= divisible:
            keep = channels
    return keep


def channels_to_prune(scores, rate: float, divisible: int = 1) -> np.ndarray:
    """The lowest-scoring channels to remove at `rate` (sorted indices). Ties go to the lower index first, so the
    result is deterministic. See kept_count for how many."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keep = kept_count(n, rate, divisible)
    order = np.lexsort((np.arange(n), scores))          # by score, then index
    return np.sort(order[: n - keep]).astype(np.int64)


__all__ = ["CRITERIA", "check_criterion", "member_scores", "channel_scores", "kept_count", "channels_to_prune"]
