"""Darknet's get_current_rate (AlexeyAB network.c) against hand-computed values, and the [net] parsing rules."""
import math

import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.darknet.graph import build_graph
from darkprune.errors import DarkpruneError
from darkprune.train.schedule import LearningRateSchedule, current_batch, get_current_rate


def _net(text: str):
    return parse_cfg_text("[net]\nwidth=8\nheight=8\nchannels=1\n" + text + "\n[connected]\noutput=2\n")


def close(a, b):
    return a == pytest.approx(b, rel=1e-6, abs=1e-12)


def test_current_batch_counts_whole_cfg_batches():
    # seen = images; batch 64 split in 16 subdivisions of 4: batch number = seen / (4 * 16)
    assert current_batch(6400, 4, 16) == 100
    assert current_batch(6463, 64) == 100
    assert current_batch(6464, 64) == 101


def test_burn_in_ramp():
    s = LearningRateSchedule(learning_rate=0.001, burn_in=1000, power=4)
    assert s.rate(0) == 0.0
    assert close(s.rate(500), 0.001 * 0.5 ** 4)          # 6.25e-5
    assert close(s.rate(250), 0.001 * 0.25 ** 4)
    assert close(s.rate(1000), 0.001)                     # burn-in over: constant
    s2 = LearningRateSchedule(learning_rate=0.01, burn_in=100, power=2)
    assert close(s2.rate(10), 0.01 * 0.01)


def test_steps_policy():
    s = LearningRateSchedule(learning_rate=0.001, policy="steps", steps=(400000, 450000), scales=(0.1, 0.1),
                             burn_in=1000)
    assert close(s.rate(399999), 0.001)
    assert close(s.rate(400000), 0.0001)                  # a step applies from its batch number on
    assert close(s.rate(449999), 0.0001)
    assert close(s.rate(450000), 0.00001)
    s2 = LearningRateSchedule(learning_rate=0.1, policy="steps", steps=(10, 20, 30), scales=(10, 0.1, 0.5))
    assert close(s2.rate(15), 1.0)
    assert close(s2.rate(25), 0.1)
    assert close(s2.rate(99), 0.05)


def test_step_exp_poly_sigmoid_constant():
    assert close(LearningRateSchedule(learning_rate=0.001).rate(12345), 0.001)
    step = LearningRateSchedule(learning_rate=0.001, policy="step", step=100, scale=0.5)
    assert close(step.rate(99), 0.001)
    assert close(step.rate(250), 0.001 * 0.25)            # 250 // 100 = 2 halvings
    exp = LearningRateSchedule(learning_rate=0.001, policy="exp", gamma=0.999)
    assert close(exp.rate(1000), 0.001 * 0.999 ** 1000)   # 3.6769e-4
    poly = LearningRateSchedule(learning_rate=0.001, policy="poly", power=4, max_batches=1000)
    assert close(poly.rate(500), 0.001 * 0.0625)
    assert close(poly.rate(900), 0.001 * 0.1 ** 4)
    sig = LearningRateSchedule(learning_rate=0.002, policy="sigmoid", gamma=0.01, step=500)
    assert close(sig.rate(500), 0.001)
    assert close(sig.rate(600), 0.002 / (1 + math.e))


def test_sgdr_cosine_restarts():
    s = LearningRateSchedule(learning_rate=0.01, policy="sgdr", learning_rate_min=0.00001, sgdr_cycle=100,
                             sgdr_mult=2)
    lo, hi = 0.00001, 0.01
    half = lo + 0.5 * (hi - lo) * (1 + math.cos(50 * 3.14159265 / 100))
    assert close(s.rate(0), hi)
    assert close(s.rate(50), half)                        # mid-cycle: (lo + hi) / 2
    assert close(s.rate(100), lo + 0.5 * (hi - lo) * (1 + math.cos(3.14159265)))   # end of the first cycle
    # batch 101 starts the second cycle (length 200): position 1
    assert close(s.rate(101), lo + 0.5 * (hi - lo) * (1 + math.cos(1 * 3.14159265 / 200)))
    assert close(s.rate(300), lo + 0.5 * (hi - lo) * (1 + math.cos(200 * 3.14159265 / 200)))
    assert close(s.rate(301), lo + 0.5 * (hi - lo) * (1 + math.cos(1 * 3.14159265 / 400)))


def test_random_policy_is_seeded():
    s = LearningRateSchedule(learning_rate=0.01, policy="random", power=2)
    a = [s.rate(5, np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    u = np.random.default_rng(3).random()
    assert close(a[0], 0.01 * u ** 2)
    with pytest.raises(ValueError):
        s.rate(5)


def test_from_cfg_reads_net_section_like_darknet():
    cfg = _net("batch=64\nsubdivisions=16\nlearning_rate=0.00261\nburn_in=1000\nmax_batches=500500\n"
               "policy=steps\nsteps=400000,450000\nscales=.1,.1\n")
    s = LearningRateSchedule.from_cfg(cfg)
    assert (s.policy, s.burn_in, s.steps, s.scales, s.power) == ("steps", 1000, (400000, 450000), (0.1, 0.1), 4.0)
    assert close(get_current_rate(s, 420000), 0.000261)
    # also from a Graph
    assert LearningRateSchedule.from_cfg(build_graph(cfg)).steps == (400000, 450000)
    sg = LearningRateSchedule.from_cfg(_net("learning_rate=0.01\npolicy=sgdr\nmax_batches=300\n"))
    assert sg.sgdr_cycle == 300 and sg.sgdr_mult == 2 and sg.learning_rate_min == 0.00001
    # step/scale only matter to policy=step (Darknet reads them only then)
    assert LearningRateSchedule.from_cfg(_net("policy=poly\nmax_batches=10\nstep=5\nscale=.1")).step == 1


def test_bad_policies():
    with pytest.warns(UserWarning, match="unknown"):
        s = LearningRateSchedule.from_cfg(_net("learning_rate=0.5\npolicy=cosine\n"))
    assert s.policy == "constant" and close(s.rate(10), 0.5)
    with pytest.raises(DarkpruneError, match="steps"):
        LearningRateSchedule.from_cfg(_net("policy=steps\nsteps=100\n"))
    with pytest.raises(DarkpruneError, match="scales"):
        LearningRateSchedule.from_cfg(_net("policy=steps\nsteps=100,200\nscales=.1\n"))
    with pytest.raises(DarkpruneError, match="max_batches"):
        LearningRateSchedule(policy="poly")
