"""Darknet's weight update (update_convolutional_layer / update_connected_layer, adam_update_gpu) against
hand-computed steps, and masks holding pruned weights and their momentum at exactly zero."""
import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.train.optimizer import DarknetSGD


def test_sgd_step_matches_darknet_arithmetic_by_hand():
    # updates += -decay*batch*w; w += lr/batch*updates; updates *= momentum   (updates accumulate -grad)
    opt = DarknetSGD(momentum=0.9, decay=0.01, batch=4)
    w = np.array([2.0], np.float64)
    b = np.array([2.0], np.float64)
    opt.add("w", w, decay=True)
    opt.add("b", b, decay=False)
    opt.step({"w": np.array([0.5]), "b": np.array([0.5])}, learning_rate=0.1)
    # u = -0.5 - 0.04*2 = -0.58 ; w = 2 + 0.025*(-0.58)
    assert w[0] == pytest.approx(1.9855, abs=1e-12)
    assert b[0] == pytest.approx(2 - 0.025 * 0.5, abs=1e-12)          # no decay on biases
    opt.step({"w": np.array([0.5]), "b": np.array([0.5])}, learning_rate=0.1)
    u2 = 0.9 * -0.58 - 0.5 - 0.04 * 1.9855
    assert w[0] == pytest.approx(1.9855 + 0.025 * u2, abs=1e-12)
    assert b[0] == pytest.approx(2 - 0.0125 + 0.025 * (0.9 * -0.5 - 0.5), abs=1e-12)
    assert opt.params["w"].updates[0] == pytest.approx(0.9 * u2)


def test_subdivisions_accumulate_like_one_gradient():
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    b = a.copy()
    g1 = np.full((2, 3), 0.25, np.float32)
    g2 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    o1, o2 = DarknetSGD(0.9, 0.0005, 64), DarknetSGD(0.9, 0.0005, 64)
    o1.add("w", a, decay=True)
    o2.add("w", b, decay=True)
    o1.accumulate("w", g1)
    o1.accumulate("w", g2)
    o1.update(0.01)
    o2.step({"w": g1 + g2}, 0.01)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_masks_keep_pruned_weights_and_momentum_at_zero():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    keep_filters = np.array([True, False, True, False]).reshape(4, 1, 1, 1)
    opt = DarknetSGD(momentum=0.9, decay=0.0005, batch=8)
    opt.add("conv.weights", w, decay=True, mask=keep_filters)
    assert not w[1].any() and not w[3].any()                           # cleared at registration
    kept_before = w[[0, 2]].copy()
    for _ in range(5):
        opt.step({"conv.weights": rng.normal(size=w.shape)}, learning_rate=0.1)
    assert (w[[1, 3]] == 0).all()                                     # exactly zero, not just small
    upd = opt.params["conv.weights"].updates.reshape(w.shape)
    assert (upd[[1, 3]] == 0).all() and upd[[0, 2]].any()
    assert not np.allclose(w[[0, 2]], kept_before)                    # kept weights do train
    # element masks (unstructured sparsity)
    v = rng.normal(size=(5, 7)).astype(np.float32)
    m = rng.random((5, 7)) > 0.5
    opt.add("fc.weights", v, decay=True, mask=m)
    opt.step({"fc.weights": np.ones_like(v)}, 0.1)
    assert (v[~m] == 0).all() and (v[m] != 0).all()
    with pytest.raises(ValueError, match="broadcast"):
        opt.set_mask("fc.weights", np.ones((3, 3), bool))


def test_adam_step_by_hand():
    opt = DarknetSGD(decay=0.0, batch=2, adam=True, b1=0.9, b2=0.999, eps=1e-6)
    w = np.array([1.0, -1.0])
    opt.add("w", w, decay=True)
    opt.step({"w": np.array([0.2, -0.4])}, learning_rate=0.01)       # t = 1: mhat = d, vhat = d^2
    np.testing.assert_allclose(w, [1 - 0.01 * 0.2 / (0.2 + 1e-6), -1 + 0.01 * 0.4 / (0.4 + 1e-6)], rtol=1e-12)
    assert not opt.params["w"].updates.any()                          # Darknet zeroes the updates after adam
    # t = 2
    d = -0.2
    m = 0.9 * (0.1 * -0.2) + 0.1 * d
    v = 0.999 * (0.001 * 0.04) + 0.001 * d * d
    expect = w[0] + 0.01 * (m / (1 - 0.81)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-6)
    opt.step({"w": np.array([0.2, -0.4])}, learning_rate=0.01)
    assert w[0] == pytest.approx(expect, rel=1e-12)


def test_state_dict_resume_is_exact():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(6)]
    w0 = rng.normal(size=(3, 4)).astype(np.float32)

    def make(w):
        opt = DarknetSGD(momentum=0.9, decay=0.001, batch=16)
        opt.add("w", w, decay=True, mask=np.array([[1], [0], [1]], bool))
        return opt

    full = w0.copy()
    o = make(full)
    for g in grads:
        o.step({"w": g}, 0.05)
    part = w0.copy()
    o1 = make(part)
    for g in grads[:3]:
        o1.step({"w": g}, 0.05)
    state = {k: v.copy() for k, v in o1.state_dict().items()}
    resumed = part.copy()
    o2 = make(resumed)
    o2.load_state_dict(state)
    for g in grads[3:]:
        o2.step({"w": g}, 0.05)
    np.testing.assert_array_equal(resumed, full)


def test_from_cfg():
    cfg = parse_cfg_text("[net]\nbatch=64\nsubdivisions=8\nmomentum=0.949\ndecay=0.0005\nadam=1\nB1=0.8\n"
                         "width=8\nheight=8\nchannels=3\n")
    opt = DarknetSGD.from_cfg(cfg)
    assert (opt.batch, opt.momentum, opt.decay, opt.adam, opt.b1, opt.b2) == (64, 0.949, 0.0005, True, 0.8, 0.999)
    odd = DarknetSGD.from_cfg(parse_cfg_text("[net]\nbatch=10\nsubdivisions=4\nwidth=8\nheight=8\nchannels=3\n"))
    assert odd.batch == 8                                      # mini_batch 10 // 4 = 2, times 4
    plain = DarknetSGD.from_cfg(parse_cfg_text("[net]\nwidth=8\nheight=8\nchannels=3\n"))
    assert (plain.batch, plain.momentum, plain.decay, plain.adam) == (1, 0.9, 0.0001, False)
