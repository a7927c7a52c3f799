"""The runner's choice between all threads and one for unsplit forwards (parallel.ThreadChoice): it follows the
measured times, notices a change of load, and changes the outputs by float32 rounding at most."""
import numba
import numpy as np
import pytest

import darkprune as dp
from darkprune.engine import blas
from darkprune.engine.network import Network
from darkprune.engine.parallel import ThreadChoice

from conftest import BUNDLED_CFG, BUNDLED_WEIGHTS

needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")


class FakeWork:
    """A forward whose duration (on a fake clock) depends on the numba thread count it runs with."""

    def __init__(self, all_ms, one_ms):
        self.now = 0.0
        self.cost = {True: all_ms, False: one_ms}
        self.modes = []

    def clock(self):
        return self.now

    def __call__(self):
        all_threads = numba.get_num_threads() > 1
        self.modes.append(all_threads)
        self.now += self.cost[all_threads] / 1000
        return all_threads


@pytest.fixture
def two_threads():
    before = numba.get_num_threads()
    blas.set_threads(2)
    yield
    numba.set_num_threads(before)


@needs_two
@pytest.mark.parametrize("all_ms, one_ms, expected", [(6.0, 9.0, "all"), (20.0, 9.0, "one")])
def test_keeps_the_faster_mode_and_rarely_tries_the_other(two_threads, all_ms, one_ms, expected):
    work = FakeWork(all_ms, one_ms)
    choice = ThreadChoice(clock=work.clock)
    for _ in range(300):
        choice.run("k", work)
    assert choice.mode("k") == expected
    assert numba.get_num_threads() == 2          # the one-thread runs restored the pool size
    steady = work.modes[2 + 6:]                   # after warm-up and the first three of each mode
    slow = sum(m != (expected == "all") for m in steady)
    assert 1 <= slow <= 6                         # tries at 16, 32, 64, 128 forwards apart, no more


@needs_two
def test_follows_a_change_of_load(two_threads):
    work = FakeWork(6.0, 9.0)
    choice = ThreadChoice(clock=work.clock)
    for _ in range(50):
        choice.run("k", work)
    assert choice.mode("k") == "all"
    work.cost[True] = 30.0                        # another process takes a core: two threads now lose
    for _ in range(5):
        choice.run("k", work)
    assert choice.mode("k") == "one"
    work.cost[True] = 6.0                         # the load goes away again
    for _ in range(40):
        choice.run("k", work)
    assert choice.mode("k") == "all"


@needs_two
def test_each_kind_of_forward_and_thread_count_is_measured_apart(two_threads):
    work = FakeWork(20.0, 9.0)
    choice = ThreadChoice(clock=work.clock)
    for _ in range(20):
        choice.run("small", work)
    assert choice.mode("small") == "one" and choice.mode("big") is None
    numba.set_num_threads(1)
    assert choice.mode("small") is None
    assert choice.run("small", work) is False     # one thread in the pool: nothing to choose


@needs_two
def test_outputs_do_not_depend_on_the_mode(two_threads):
    """The kernels split work by output element (never a reduction), so the mode the choice lands on changes a
    result by float32 rounding at most (GEMM blocks are sized by the thread count)."""
    model = dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    x = np.random.default_rng(5).random((1,) + tuple(model.input_shape), dtype=np.float32)
    net = Network(model)
    two = net.forward(x)
    with blas.limit_threads(1):
        one = Network(model).forward(x)
    for i in two:
        scale = float(np.abs(one[i]).max())
        assert np.abs(two[i] - one[i]).max() <= 1e-5 * scale, i
