"""The network runner's memory reuse and batch shards against OpenCV: only the convolutions feeding the detection
heads are asked for (OpenCV's [yolo] outputs are laid out differently), so the other outputs live in the runner's arena (routes fused in place with one image, per-thread shards with
several), and arrays handed out or passed in must survive later forwards untouched."""
import numba
import numpy as np
import pytest

import darkprune as dp
from darkprune.engine import blas
from darkprune.engine.network import OPENCV_BN_EPS, Network

from conftest import ASSETS
from opencv_ref import opencv_forward

cv2 = pytest.importorskip("cv2")

YF = ASSETS / "models" / "yolo-fastest-1.1"
MODELS = [(ASSETS / "cfg" / "yolov4-tiny.cfg", None), (YF / "yolo-fastest-1.1.cfg", YF / "yolo-fastest-1.1.weights")]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = numba.get_num_threads()
    blas.set_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(before)


@pytest.mark.parametrize("cfg, weights", MODELS, ids=["yolov4-tiny", "yolo-fastest"])
def test_heads_match_opencv_with_arena_and_shards(cfg, weights, threads, tmp_path):
    if not cfg.exists() or (weights is not None and not weights.exists()):
        pytest.skip("asset missing")
    model = dp.load(cfg, weights)
    model.save(tmp_path / "m.cfg", tmp_path / "m.weights")
    heads = [model.graph[i].inputs[0] for i in model.graph.output_layers()]
    net = Network(model, bn_eps=OPENCV_BN_EPS)
    rng = np.random.default_rng(3)
    kept = []
    for batch in (1, 3, 4, 1):
        x = rng.random((batch,) + tuple(model.input_shape), dtype=np.float32)
        ours = net.forward(x, outputs=heads)
        ref = opencv_forward(tmp_path / "m.cfg", tmp_path / "m.weights", x, heads)
        for i in heads:
            r = ref[i].reshape(ours[i].shape)
            assert np.abs(ours[i] - r).max() <= 1e-4 * max(float(np.abs(r).max()), 1e-6), (batch, i)
        kept.append((ours, {i: ours[i].copy() for i in heads}))
    for ours, copy in kept:       # later forwards never wrote into an earlier forward's outputs
        for i in heads:
            assert np.array_equal(ours[i], copy[i])


def test_resumed_forward_leaves_cached_and_kept_arrays_alone(threads):
    model = dp.load(YF / "yolo-fastest-1.1.cfg", YF / "yolo-fastest-1.1.weights")
    net = Network(model)
    start = 40
    frontier = net.frontier(start)
    rng = np.random.default_rng(4)
    for batch in (1, 4):
        x = rng.random((batch,) + tuple(model.input_shape), dtype=np.float32)
        full = net.forward(x, keep=[i for i in frontier if i >= 0])
        cached = {i: (full[i] if i >= 0 else x) for i in frontier}
        before = {i: a.copy() for i, a in cached.items()}
        heads_before = {i: full[i].copy() for i in net.graph.output_layers()}
        resumed = net.forward(None, start=start, cached=cached)
        net.forward(rng.random(x.shape, dtype=np.float32))          # reuses the arena
        for i, a in cached.items():
            assert np.array_equal(a, before[i])
        for i, a in heads_before.items():
            assert np.array_equal(full[i], a)
            np.testing.assert_allclose(resumed[i], a, rtol=0, atol=1e-5)
