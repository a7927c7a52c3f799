"""The training runner (darkprune.train.backprop) against central finite differences of whole networks, in float64,
on small random cfgs: every parameter tensor's gradient (a random sample of its entries) is compared with
(L(w + eps) - L(w - eps)) / 2 eps of the same network run forward.

Losses: a fixed random projection of the outputs (sum(R * out), so every layer's backward is reached, heads
included), the softmax cross-entropy of a classifier, and for a detector Darknet's [yolo] loss written out here from
its definition (binary cross-entropy on the logistic outputs, half squared error on w/h; see yolo_loss.py's doc),
independently of yolo_loss's code, for the case where no switch point is near (ignore_thresh=1, truth_thresh=1).
"""
import math

import numpy as np
import pytest

from darkprune.darknet.cfg import parse_cfg_text
from darkprune.darknet.model import Model
from darkprune.engine.network import Network
from darkprune.train.backprop import TrainBatch, TrainingNetwork, classifier_loss, trainable_parameters

from conftest import central_difference

EPS = 1e-6


def make_model(text: str, seed: int = 0) -> Model:
    """A model from cfg text with random, non-trivial parameters (BN scales/shifts/statistics, biases)."""
    model = Model.from_cfg(parse_cfg_text(text.strip() + "\n", "<test>"), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for index, arrays in model.params.items():
        for name, arr in arrays.items():
            if name == "scales":
                arr[...] = rng.uniform(0.5, 1.5, arr.shape)
            elif name == "biases":
                arr[...] = rng.normal(0, 0.2, arr.shape)
            elif name == "rolling_mean":
                arr[...] = rng.normal(0, 0.1, arr.shape)
            elif name == "rolling_variance":
                arr[...] = rng.uniform(0.5, 2.0, arr.shape)
            elif name == "weights" and model.graph[index].type == "shortcut":
                arr[...] = rng.uniform(0.3, 1.2, arr.shape)
    return model


def numeric_check(model, loss_fn, analytic: dict, samples: int = 10, seed: int = 3, rtol=2e-5, atol=1e-7):
    """Compare analytic {layer: {name: grad}} with central differences of loss_fn() on `samples` random entries
    of every trainable tensor (all entries when the tensor is small)."""
    rng = np.random.default_rng(seed)
    checked = 0
    for index, name, _ in trainable_parameters(model):
        arr = model.params[index][name]
        grad = analytic[index][name]
        assert grad.shape == arr.shape, (index, name)
        flat, gflat = arr.reshape(-1), grad.reshape(-1)
        picks = range(flat.size) if flat.size <= samples else rng.choice(flat.size, samples, replace=False)
        for k in picks:
            numeric = central_difference(loss_fn, flat, k, EPS)
            assert gflat[k] == pytest.approx(numeric, rel=rtol, abs=atol), \
                f"layer {index} {name}[{k}]: analytic {gflat[k]:.8g}, finite differences {numeric:.8g}"
            checked += 1
    return checked


def projection_check(text: str, batch: int = 2, outputs=None, train=True, samples=10, seed=0):
    model = make_model(text, seed)
    net = TrainingNetwork(model, dtype=np.float64)
    c, h, w = model.input_shape
    x = np.random.default_rng(seed + 1).normal(size=(batch, c, h, w))

    def run():
        return net.forward(x, train=train, rng=np.random.default_rng(7), outputs=outputs)

    outs = run()
    proj = {i: np.random.default_rng(50 + i).normal(size=o.shape) for i, o in outs.items()}

    def loss():
        return float(sum((o * proj[i]).sum() for i, o in run().items()))

    loss()
    net.backward(proj)
    analytic = net.gradients()
    return numeric_check(model, loss, analytic, samples)


# ----------------------------------------------------------------------------------------------------------------
DETECTOR = """
[net]
width=16
height=16
channels=3
[convolutional]
filters=4
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
filters=6
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[convolutional]
filters=6
size=1
stride=1
pad=1
batch_normalize=1
activation=mish
[shortcut]
from=-2
activation=linear
[dropout]
probability=0.3
[convolutional]
filters=8
size=3
stride=2
pad=1
batch_normalize=1
activation=leaky
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=2,3
anchors=3,3, 5,4, 8,9, 14,12
classes=2
num=4
ignore_thresh=1.0
truth_thresh=1
iou_normalizer=0.5
[route]
layers=-3
[convolutional]
filters=4
size=1
stride=1
pad=1
batch_normalize=1
activation=leaky
[upsample]
stride=2
[route]
layers=-1,4
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1
anchors=3,3, 5,4, 8,9, 14,12
classes=2
num=4
ignore_thresh=1.0
truth_thresh=1
iou_normalizer=0.5
"""

CLASSIFIER = """
[net]
width=12
height=12
channels=3
[convolutional]
filters=5
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
filters=6
size=3
stride=1
pad=1
activation=relu
[connected]
output=7
batch_normalize=1
activation=leaky
[dropout]
probability=0.25
[connected]
output=4
activation=linear
[softmax]
groups=1
"""

DEPTHWISE = """
[net]
width=10
height=10
channels=4
[convolutional]
filters=4
groups=4
size=3
stride=1
pad=1
batch_normalize=1
activation=relu6
[convolutional]
filters=8
groups=4
size=3
stride=2
pad=1
batch_normalize=1
activation=swish
[convolutional]
filters=6
groups=2
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[convolutional]
filters=5
size=3
dilation=2
stride=1
pad=1
activation=logistic
"""

SE_BLOCK = """
[net]
width=8
height=8
channels=3
[convolutional]
filters=8
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[avgpool]
[convolutional]
filters=4
size=1
stride=1
activation=relu
[convolutional]
filters=8
size=1
stride=1
activation=logistic
[scale_channels]
from=-4
[convolutional]
filters=8
size=1
stride=1
batch_normalize=1
activation=tanh
[sam]
from=-2
[shortcut]
from=-3,-7
weights_type=per_channel
weights_normalization=softmax
activation=linear
[route]
layers=-1
groups=2
group_id=1
[batchnorm]
[activation]
activation=elu
[reorg3d]
stride=2
[local_avgpool]
size=2
stride=1
[upsample]
stride=2
[maxpool]
size=3
stride=2
"""


def test_detector_projection_gradients():
    # conv+BN+leaky, maxpool, mish, shortcut, dropout, stride-2 conv, route, upsample, two [yolo] heads
    assert projection_check(DETECTOR, samples=8) > 100


def test_classifier_projection_gradients():
    # conv+BN, maxpool, conv+relu, connected with batch norm, dropout, connected, softmax (its Jacobian)
    assert projection_check(CLASSIFIER, samples=10) > 60


def test_depthwise_grouped_dilated_gradients():
    assert projection_check(DEPTHWISE, samples=10) > 60


def test_se_block_and_misc_layers_gradients():
    # SE block (avgpool, logistic conv, scale_channels), sam, weighted 3-input shortcut, route groups,
    # standalone batchnorm, activation layer, reorg3d, local_avgpool, upsample, maxpool
    assert projection_check(SE_BLOCK, samples=8) > 60


def test_inference_mode_gradients():
    # train=False: batch norm with the rolling statistics (constants), dropout off
    assert projection_check(DETECTOR, train=False, samples=5) > 50
    assert projection_check(CLASSIFIER, train=False, samples=5) > 40


# ----------------------------------------------------------------------------------------------------------------
def _softplus(z):
    return np.logaddexp(0.0, z)


def reference_yolo_loss(raw: np.ndarray, truths, layer, net_w: int, net_h: int) -> float:
    """Darknet's [yolo] objective for mse boxes, scale_x_y=1, no ignore/truth threshold switching, one truth per
    cell: BCE on objectness (target 1 at assigned predictions, 0 elsewhere), BCE on classes and x, y at assigned
    ones, (2 - w*h) * iou_normalizer * half squared error on the raw w, h against log(w * net_w / anchor_w)."""
    a = layer.attrs
    classes, mask, anchors = a["classes"], a["mask"], a["anchors"]
    entries = 5 + classes
    n, _, lh, lw = raw.shape
    z = raw.reshape(n, len(mask), entries, lh, lw)
    assigned = np.zeros((n, len(mask), lh, lw), bool)
    total = 0.0
    for b, rows in enumerate(truths):
        for cls, cx, cy, w, h in rows:
            ious = []
            for k in range(a["num"]):
                aw, ah = anchors[2 * k] / net_w, anchors[2 * k + 1] / net_h
                inter = min(w, aw) * min(h, ah)
                ious.append(inter / (w * h + aw * ah - inter))
            best = int(np.argmax(ious))
            if best not in mask:
                continue
            m = mask.index(best)
            i, j = int(cx * lw), int(cy * lh)
            assert not assigned[b, m, j, i], "the reference handles one truth per cell and anchor"
            assigned[b, m, j, i] = True
            v = z[b, m, :, j, i]
            scale = (2 - w * h) * a["iou_normalizer"]
            tx, ty = cx * lw - i, cy * lh - j
            tw, th = math.log(w * net_w / anchors[2 * best]), math.log(h * net_h / anchors[2 * best + 1])
            total += scale * (_softplus(v[0]) - tx * v[0] + _softplus(v[1]) - ty * v[1]
                              + 0.5 * (v[2] - tw) ** 2 + 0.5 * (v[3] - th) ** 2)
            total += a["obj_normalizer"] * (_softplus(v[4]) - v[4])
            onehot = np.eye(classes)[int(cls)]
            total += float((_softplus(v[5:]) - onehot * v[5:]).sum())
    obj = z[:, :, 4]
    total += a["obj_normalizer"] * float(_softplus(obj[~assigned]).sum())
    return total


def test_detector_yolo_loss_gradients():
    model = make_model(DETECTOR, seed=4)
    net = TrainingNetwork(model, dtype=np.float64)
    c, h, w = model.input_shape
    x = np.random.default_rng(9).normal(size=(2, c, h, w))
    # boxes of several sizes, so that both heads get truths (anchors 3x3 .. 14x12 on a 16x16 input)
    truths = [np.array([[0, 0.30, 0.40, 0.20, 0.18], [1, 0.70, 0.65, 0.80, 0.70], [1, 0.10, 0.85, 0.55, 0.50]]),
              np.array([[1, 0.55, 0.20, 0.30, 0.25], [0, 0.40, 0.80, 0.90, 0.85]])]
    heads = [layer for layer in model.graph if layer.type == "yolo"]

    def loss():
        net.forward(x, rng=np.random.default_rng(7), outputs=[])
        return sum(reference_yolo_loss(net.output(hd.inputs[0]), truths, hd, w, h) for hd in heads)

    out = net.loss_and_gradients(TrainBatch(x, truths=truths), rng=np.random.default_rng(7))
    assert set(out.seeds) == {hd.inputs[0] for hd in heads}
    assert all(s["count"] > 0 for s in out.stats.values()), "each head must have assigned truths"
    analytic = net.gradients()
    assert numeric_check(model, loss, analytic, samples=6, rtol=5e-5) > 60


def test_classifier_cross_entropy_gradients():
    model = make_model(CLASSIFIER, seed=2)
    net = TrainingNetwork(model, dtype=np.float64)
    c, h, w = model.input_shape
    x = np.random.default_rng(4).normal(size=(3, c, h, w))
    labels = np.array([2, 0, 3])

    def loss():
        net.forward(x, rng=np.random.default_rng(7), outputs=[])
        logits = net.output(len(model.graph) - 2).reshape(3, -1)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        return float(-logp[np.arange(3), labels].sum())

    out = net.loss_and_gradients(TrainBatch(x, labels=labels), rng=np.random.default_rng(7))
    assert out.loss == pytest.approx(loss(), rel=1e-12)
    assert numeric_check(model, loss, net.gradients(), samples=10) > 60


def test_cost_layer_after_softmax_adds_to_logits_as_darknet():
    # pjreddie's classifiers end with [softmax] + [cost]: Darknet's logits then get (p - t) + scale * (p - t)
    model = make_model(CLASSIFIER + "[cost]\ntype=sse\n", seed=1)
    net = TrainingNetwork(model, dtype=np.float64)
    x = np.random.default_rng(2).normal(size=(2,) + model.input_shape)
    net.forward(x, train=True, rng=np.random.default_rng(0), outputs=[])
    out = classifier_loss(net, np.array([1, 3]))
    soft = len(model.graph) - 2
    p = net.output(soft).reshape(2, -1)
    t = np.eye(4)[[1, 3]]
    np.testing.assert_allclose(out.seeds[soft - 1].reshape(2, -1), 2 * (p - t), rtol=1e-12)
    assert set(out.layer_costs) == {soft, soft + 1}
    assert out.cost == pytest.approx(0.5 * (-np.log(p[t > 0]).sum() + ((t - p) ** 2).sum()))


def test_eval_mode_equals_inference_runner():
    # train=False follows the inference runner (itself checked against OpenCV): BN with rolling statistics
    model = make_model(DETECTOR, seed=5)
    x = np.random.default_rng(0).random((2,) + model.input_shape, dtype=np.float32)
    ref = Network(model).forward(x)
    got = TrainingNetwork(model.copy()).forward(x, train=False)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_batch_statistics_and_rolling_update():
    # one conv + BN: the output is normalised with the batch's mean and unbiased variance, and the rolling
    # statistics move 1% toward them (Darknet's GPU / pjreddie rule)
    model = make_model("""
[net]
width=5
height=4
channels=2
[convolutional]
filters=3
size=1
stride=1
batch_normalize=1
activation=linear
""", seed=3)
    p = model.params[0]
    mean0, var0 = p["rolling_mean"].astype(np.float64).copy(), p["rolling_variance"].astype(np.float64).copy()
    net = TrainingNetwork(model, dtype=np.float64)
    x = np.random.default_rng(1).normal(size=(3, 2, 4, 5))
    y = net.forward(x)[0]
    z = np.einsum("oc,nchw->nohw", p["weights"][:, :, 0, 0], x)
    mean = z.mean(axis=(0, 2, 3))
    var = z.var(axis=(0, 2, 3), ddof=1)
    expect = (z - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    expect = expect * p["scales"][None, :, None, None] + p["biases"][None, :, None, None]
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p["rolling_mean"], 0.99 * mean0 + 0.01 * mean, rtol=1e-12)
    np.testing.assert_allclose(p["rolling_variance"], 0.99 * var0 + 0.01 * var, rtol=1e-12)


def test_stopbackward_freezes_earlier_layers():
    text = CLASSIFIER.replace("[connected]\noutput=7", "[connected]\nstopbackward=1\noutput=7")
    model = make_model(text, seed=0)
    net = TrainingNetwork(model, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(2,) + model.input_shape)
    net.loss_and_gradients(TrainBatch(x, labels=np.array([0, 1])))
    grads = net.gradients()
    assert not grads[0]["weights"].any() and not grads[3]["weights"].any()
    assert grads[5]["weights"].any()
