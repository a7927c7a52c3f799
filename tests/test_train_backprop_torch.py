"""The training runner on the real Yolo-Fastest 1.1 against PyTorch's autograd (an independent implementation of the
same network: conv with groups/stride, batch norm in training mode with Darknet's unbiased batch variance, leaky,
Darknet's maxpool padding, route, shortcut, upsample), in float64: the same projection loss on both heads, every
parameter gradient compared. Skipped where PyTorch is not installed (it is not a darkprune dependency)."""
import numpy as np
import pytest

from darkprune.darknet import load
from darkprune.train.backprop import TrainingNetwork, trainable_parameters

from conftest import BUNDLED_CFG, BUNDLED_WEIGHTS

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_forward(model, params, x):
    """Yolo-Fastest's layer types in torch ops, reading our parameter arrays (as torch tensors in `params`)."""
    acts = {-1: x}
    heads = {}
    for layer in model.graph:
        a = layer.attrs
        v = acts[layer.inputs[0]]
        t = layer.type
        if t == "convolutional":
            p = params[layer.index]
            y = F.conv2d(v, p["weights"], None if a["batch_normalize"] else p["biases"],
                         (a["stride_y"], a["stride_x"]), a["pad"], a["dilation"], a["groups"])
            if a["batch_normalize"]:
                mean = y.mean(dim=(0, 2, 3), keepdim=True)
                var = y.var(dim=(0, 2, 3), keepdim=True, unbiased=True)      # Darknet's batch variance
                y = (y - mean) / torch.sqrt(var + 1e-5)
                y = y * p["scales"][None, :, None, None] + p["biases"][None, :, None, None]
            assert a["activation"] in ("leaky", "linear")
            if a["activation"] == "leaky":
                y = F.leaky_relu(y, 0.1)
        elif t == "maxpool":
            pad = a["padding"]
            v = F.pad(v, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-3.4028234663852886e38)
            y = F.max_pool2d(v, a["size"], (a["stride_y"], a["stride_x"]))
        elif t == "route":
            y = torch.cat([acts[i] for i in layer.inputs], 1)
        elif t == "shortcut":
            y = v + sum(acts[i] for i in layer.inputs[1:])
        elif t == "upsample":
            y = F.interpolate(v, scale_factor=a["stride"], mode="nearest")
        elif t == "dropout":
            y = v
        elif t == "yolo":
            heads[layer.index] = v
            y = v
        else:
            raise AssertionError(t)
        acts[layer.index] = y
    return heads


def test_yolo_fastest_gradients_match_pytorch_autograd():
    model = load(BUNDLED_CFG, BUNDLED_WEIGHTS)
    for layer in model.graph:
        if layer.type == "dropout":
            layer.attrs["probability"] = 0.0          # deterministic on both sides
    net = TrainingNetwork(model, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.random((2,) + model.input_shape)
    heads = [layer for layer in model.graph if layer.type == "yolo"]
    net.forward(x, outputs=[])
    proj = {h.inputs[0]: rng.normal(size=net.output(h.inputs[0]).shape) for h in heads}
    net.backward(proj)
    ours = net.gradients()

    params = {i: {k: torch.tensor(v, requires_grad=k in ("weights", "biases", "scales"))
                  for k, v in p.items()} for i, p in model.params.items()}
    got = torch_forward(model, params, torch.tensor(x))
    loss = sum((got[h.index] * torch.tensor(proj[h.inputs[0]])).sum() for h in heads)
    loss.backward()
    checked = 0
    for index, name, _ in trainable_parameters(model):
        ref = params[index][name].grad.numpy()
        mine = ours[index][name]
        scale = np.abs(ref).max()
        assert np.abs(mine - ref).max() <= 1e-7 * max(scale, 1.0), f"layer {index} {name}"
        checked += 1
    assert checked == 3 * 84 - 2        # 84 convs: weights + biases (+ scales with BN; the 2 head convs have none)
