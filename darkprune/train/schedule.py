"""The learning-rate schedule of a Darknet `[net]` section, exactly as AlexeyAB's `get_current_rate` (network.c).

Darknet's "batch number" is `seen / (batch * subdivisions)` where `batch` is the mini-batch (the cfg's `batch` divided
by `subdivisions`): the number of whole cfg batches seen. Darknet counts a batch's images in `seen` *before* it
updates, so the k-th update (k = 1, 2, ...) uses batch_num = k: the very first update already gets
learning_rate * (1/burn_in)^power, and the number Darknet prints in front of each iteration's loss is that k.
`current_batch` computes it from `seen`; `LearningRateSchedule.rate(batch_num)` gives the rate.

Rules (batch_num is an int, all divisions as Darknet does them):
- burn_in:  batch_num < burn_in  ->  learning_rate * (batch_num / burn_in) ** power   (before any policy)
- constant: learning_rate
- step:     learning_rate * scale ** (batch_num // step)                       (C integer division)
- steps:    learning_rate times every scales[i] whose steps[i] <= batch_num, in order
- exp:      learning_rate * gamma ** batch_num
- poly:     learning_rate * (1 - batch_num / max_batches) ** power
- random:   learning_rate * uniform(0, 1) ** power                           (our seeded Generator, not rand())
- sigmoid:  learning_rate / (1 + exp(gamma * (batch_num - step)))
- sgdr:     cosine restarts: cycles of sgdr_cycle batches (default max_batches), each sgdr_mult times (default 2) the
            previous; rate = learning_rate_min + 0.5 (learning_rate - learning_rate_min)(1 + cos(pi * pos / cycle))
            with Darknet's pi = 3.14159265 and a cycle ending only when batch_num exceeds its end (`<` in the loop).
An unknown policy name falls back to constant with a warning, as Darknet does ("Couldn't find policy").
Defaults are parse_net_options's: learning_rate .001, power 4, burn_in 0, max_batches 0, step 1, scale 1, gamma 1,
learning_rate_min .00001, sgdr_cycle = max_batches, sgdr_mult 2. The result is rounded to float32 (Darknet's
`float` return).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import DarkpruneError

POLICIES = ("constant", "step", "steps", "exp", "poly", "random", "sigmoid", "sgdr")


def current_batch(seen: int, batch: int, subdivisions: int = 1) -> int:
    """Darknet's get_current_batch: images seen / (mini_batch * subdivisions). `batch` is the cfg's (full) batch
    when subdivisions=1 is passed; pass the mini-batch and the subdivisions to mirror Darknet's arithmetic."""
    return int(seen) // (int(batch) * int(subdivisions))


@dataclass
class LearningRateSchedule:
    learning_rate: float = 0.001
    policy: str = "constant"
    burn_in: int = 0
    power: float = 4.0
    max_batches: int = 0
    step: int = 1
    scale: float = 1.0
    steps: tuple[int, ...] = field(default_factory=tuple)
    scales: tuple[float, ...] = field(default_factory=tuple)
    gamma: float = 1.0
    learning_rate_min: float = 0.00001
    sgdr_cycle: int | None = None          # None -> max_batches (Darknet's default)
    sgdr_mult: int = 2

    def __post_init__(self):
        if self.policy not in POLICIES:
            warnings.warn(f"learning-rate policy '{self.policy}' is unknown; Darknet goes with constant, and so do we",
                          stacklevel=2)
            self.policy = "constant"
        if self.policy == "steps" and len(self.scales) < len(self.steps):
            raise DarkpruneError(f"policy=steps has {len(self.steps)} steps but only {len(self.scales)} scales "
                                 f"(Darknet reads past the end of scales and crashes)")
        if self.policy == "poly" and self.max_batches <= 0:
            raise DarkpruneError("policy=poly needs max_batches > 0 in [net] (Darknet divides by it)")

    @classmethod
    def from_cfg(cls, source) -> "LearningRateSchedule":
        """From a Graph, a Cfg or a [net] Section, with parse_net_options's defaults and rules (step/scale only for
        policy=step, steps/scales for steps and sgdr, gamma for exp and sigmoid, step for sigmoid)."""
        net = _net_section(source)
        policy = net.get_str("policy", "constant")
        max_batches = net.get_int("max_batches", 0)
        kw = dict(learning_rate=net.get_float("learning_rate", 0.001), policy=policy,
                  burn_in=net.get_int("burn_in", 0), power=net.get_float("power", 4.0), max_batches=max_batches,
                  learning_rate_min=net.get_float("learning_rate_min", 0.00001),
                  sgdr_cycle=net.get_int("sgdr_cycle", max_batches), sgdr_mult=net.get_int("sgdr_mult", 2))
        if policy == "step":
            kw.update(step=net.get_int("step", 1), scale=net.get_float("scale", 1.0))
        elif policy in ("steps", "sgdr"):
            steps = net.get_list("steps", int)
            scales = net.get_list("scales", float)
            if policy == "steps" and (steps is None or scales is None):
                raise DarkpruneError(f"{net.where('policy')}: policy=steps needs steps= and scales= in [net] "
                                     f"(Darknet stops with the same complaint)")
            steps = steps or []
            scales = list(scales or [])
            if policy == "steps" and len(scales) < len(steps):
                raise DarkpruneError(f"{net.where('scales')}: [net] has {len(steps)} steps but {len(scales)} scales")
            scales = (scales + [1.0] * len(steps))[: len(steps)]
            kw.update(steps=tuple(steps), scales=tuple(scales))
        elif policy == "exp":
            kw.update(gamma=net.get_float("gamma", 1.0))
        elif policy == "sigmoid":
            kw.update(gamma=net.get_float("gamma", 1.0), step=net.get_int("step", 1))
        return cls(**kw)

    def rate(self, batch_num: int, rng: np.random.Generator | None = None) -> float:
        """The learning rate for batch number `batch_num` (see the module doc). `rng` is used by policy=random."""
        b = int(batch_num)
        lr = self.learning_rate
        if b < self.burn_in:
            return _f32(lr * math.pow(np.float32(b) / np.float32(self.burn_in), self.power))
        p = self.policy
        if p == "constant":
            return _f32(lr)
        if p == "step":
            return _f32(lr * math.pow(self.scale, _c_div(b, self.step)))
        if p == "steps":
            rate = np.float32(lr)
            for s, sc in zip(self.steps, self.scales):
                if s > b:
                    break
                rate = np.float32(rate * np.float32(sc))
            return float(rate)
        if p == "exp":
            return _f32(lr * math.pow(self.gamma, b))
        if p == "poly":
            base = 1.0 - float(np.float32(b) / np.float32(self.max_batches))
            return _f32(lr * _c_pow(base, self.power))
        if p == "random":
            if rng is None:
                raise ValueError("policy=random needs an rng (a numpy Generator)")
            return _f32(lr * math.pow(float(rng.random()), self.power))
        if p == "sigmoid":
            return _f32(lr * (1.0 / (1.0 + math.exp(self.gamma * (b - self.step)))))
        if p == "sgdr":
            start = 0
            cycle = self.max_batches if self.sgdr_cycle is None else int(self.sgdr_cycle)
            if cycle <= 0:
                raise DarkpruneError("policy=sgdr needs sgdr_cycle > 0 (or max_batches > 0)")
            while start + cycle < b:
                start += cycle
                cycle *= int(self.sgdr_mult)
            lr_min = float(np.float32(self.learning_rate_min))
            pos = float(np.float32(b - start))
            return _f32(lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(pos * 3.14159265 / cycle)))
        raise AssertionError(p)


def get_current_rate(schedule: LearningRateSchedule, batch_num: int, rng: np.random.Generator | None = None) -> float:
    """Darknet's get_current_rate(net) for the given batch number."""
    return schedule.rate(batch_num, rng)


def _net_section(source):
    cfg = getattr(source, "cfg", source)        # Graph -> Cfg
    return getattr(cfg, "net", cfg)             # Cfg -> [net] Section


def _c_div(a: int, b: int) -> int:
    """C's truncating integer division."""
    if b == 0:
        raise DarkpruneError("policy=step needs step > 0")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _c_pow(base: float, power: float) -> float:
    """C's pow for the poly policy: past max_batches the base goes negative; pow() of a negative base with a
    non-integer power is NaN in C, an integer power is fine."""
    if base < 0 and power != int(power):
        return math.nan
    return math.pow(base, power)


def _f32(v: float) -> float:
    return float(np.float32(v))


def finetune_schedule(graph, iters: int, learning_rate: float | None = None) -> LearningRateSchedule:
    """The cfg's schedule compressed to `iters` iterations, with an optional base rate: when iters differs from
    max_batches, burn_in, steps, step and sgdr_cycle are scaled by iters / max_batches and max_batches becomes iters
    (a 300-iteration finetune of a cfg trained for 500,000 keeps the same shape: a short warm-up, the steps at the
    same fractions)."""
    sched = LearningRateSchedule.from_cfg(graph)
    if learning_rate is not None:
        sched.learning_rate = float(learning_rate)
    full = sched.max_batches
    if full > 0 and iters != full:
        f = iters / full
        sched.burn_in = int(sched.burn_in * f)
        sched.steps = tuple(max(1, int(round(s * f))) for s in sched.steps)
        sched.step = max(1, int(round(sched.step * f)))
        if sched.sgdr_cycle:
            sched.sgdr_cycle = max(1, int(round(sched.sgdr_cycle * f)))
    sched.max_batches = iters
    return sched


def schedule_json(s: LearningRateSchedule) -> dict:
    return {"learning_rate": s.learning_rate, "policy": s.policy, "burn_in": s.burn_in, "power": s.power,
            "max_batches": s.max_batches, "steps": list(s.steps), "scales": list(s.scales), "step": s.step,
            "scale": s.scale, "gamma": s.gamma}
