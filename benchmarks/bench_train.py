"""Training throughput of the numba engine: images/s of one full training iteration (forward with batch-norm on batch
statistics, the network's loss, backward, Darknet's SGD update), for a classifier and for Yolo-Fastest 1.1 at
batch 16 on 2 threads; and, when PyTorch is installed, the same network built layer for layer in PyTorch (conv with
groups/stride/dilation, batch norm in training mode, leaky/relu/logistic/mish/swish/linear, Darknet's maxpool
padding, route, shortcut, upsample, dropout, avgpool, connected, softmax) trained the same way in the same process,
and the ratio ours / PyTorch. PyTorch's loss at detection heads is the sum of squares of the head inputs (the
[yolo] loss itself is a small part of an iteration; ours runs the real one), a classifier's is cross-entropy.
Inputs are random (the data pipeline is not measured here; see `finetune`'s images/s for that).

    .venv/bin/python benchmarks/bench_train.py [--models classifier,yolo-fastest] [--batch 16] [--threads 2]
                                               [--iters 5] [--json]

PyTorch is not a darkprune dependency: without it the comparison is skipped. The classifier is the CIFAR-10
cifar_small model of ../shared/assets (or cfg/lenet.cfg when the assets are absent).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"

import numpy as np  # noqa: E402

import darkprune as dp  # noqa: E402
from darkprune.engine.blas import limit_threads, set_threads  # noqa: E402
from darkprune.train.backprop import TrainBatch, TrainingNetwork, trainable_parameters  # noqa: E402
from darkprune.train.optimizer import DarknetSGD  # noqa: E402


def models() -> dict:
    cifar = ASSETS / "models" / "cifar-small" / "cifar_small.cfg"
    classifier = (cifar, cifar.with_suffix(".weights")) if cifar.exists() else (ROOT / "cfg" / "lenet.cfg", None)
    return {"classifier": classifier,
            "yolo-fastest": (ROOT / "cfg" / "yolo-fastest-1.1.cfg", ROOT / "weights" / "yolo-fastest-1.1.weights")}


def synthetic_batch(model, batch: int, rng) -> TrainBatch:
    c, h, w = model.input_shape
    x = rng.random((batch, c, h, w), dtype=np.float32)
    if any(layer.type in ("yolo", "region") for layer in model.graph):
        truths = []
        for _ in range(batch):
            k = int(rng.integers(1, 8))
            wh = rng.uniform(0.05, 0.6, (k, 2))
            cxy = rng.uniform(0.1, 0.9, (k, 2))
            cls = rng.integers(0, 80, (k, 1))
            truths.append(np.hstack([cls, cxy, wh]).astype(np.float32))
        return TrainBatch(x, truths=truths)
    classes = model.graph[len(model.graph) - 1].out_shape[0]
    return TrainBatch(x, labels=rng.integers(0, classes, batch))


def bench_ours(model, batch: int, iters: int, warmup: int = 2) -> list[float]:
    net = TrainingNetwork(model)
    opt = DarknetSGD.from_cfg(model.graph)
    opt.batch = batch
    for index, name, decayed in trainable_parameters(model):
        opt.add(f"{index}/{name}", model.params[index][name], decay=decayed)
    rng = np.random.default_rng(0)
    data = synthetic_batch(model, batch, rng)
    times = []
    for k in range(warmup + iters):
        t = time.perf_counter()
        net.loss_and_gradients(data, iteration=k + 1)
        with limit_threads(1):
            for index, arrays in net.gradients().items():
                for name, g in arrays.items():
                    opt.accumulate(f"{index}/{name}", g)
            opt.update(1e-6)
        if k >= warmup:
            times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------------------------------------------
# the same network in PyTorch

def torch_network(model):
    import torch
    import torch.nn.functional as F
    from torch import nn

    acts = {
        "linear": lambda v: v, "leaky": lambda v: F.leaky_relu(v, 0.1), "relu": F.relu, "logistic": torch.sigmoid,
        "mish": F.mish, "swish": F.silu, "tanh": torch.tanh, "relu6": F.relu6,
    }

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = model.graph
            self.mods = nn.ModuleDict()
            for layer in model.graph:
                a = layer.attrs
                key = str(layer.index)
                if layer.type == "convolutional":
                    if a["activation"] not in acts:
                        raise NotImplementedError(a["activation"])
                    conv = nn.Conv2d(layer.in_shape[0], a["filters"], a["size"], (a["stride_y"], a["stride_x"]),
                                     a["pad"] * a["dilation"], a["dilation"], a["groups"],
                                     bias=not a["batch_normalize"])
                    mods = [conv]
                    if a["batch_normalize"]:
                        mods.append(nn.BatchNorm2d(a["filters"], eps=1e-5, momentum=0.01))
                    self.mods[key] = nn.Sequential(*mods)
                elif layer.type == "connected":
                    self.mods[key] = nn.Linear(a["inputs"], a["output"])
                elif layer.type not in ("maxpool", "avgpool", "route", "shortcut", "upsample", "dropout", "yolo",
                                        "softmax", "cost"):
                    raise NotImplementedError(layer.type)

        def forward(self, x):
            out = {-1: x}
            heads = []
            for layer in self.graph:
                a = layer.attrs
                v = out[layer.inputs[0]]
                t = layer.type
                if t == "convolutional":
                    y = acts[a["activation"]](self.mods[str(layer.index)](v))
                elif t == "connected":
                    y = acts[a["activation"]](self.mods[str(layer.index)](v.flatten(1)))[:, :, None, None]
                elif t == "maxpool":
                    p = a["padding"]
                    v = F.pad(v, (p // 2, p - p // 2, p // 2, p - p // 2), value=float("-inf")) if p else v
                    y = F.max_pool2d(v, a["size"], (a["stride_y"], a["stride_x"]))
                elif t == "avgpool":
                    y = v.mean(dim=(2, 3), keepdim=True)
                elif t == "route":
                    parts = []
                    for i in layer.inputs:
                        u = out[i]
                        c = u.shape[1] // a["groups"]
                        parts.append(u[:, c * a["group_id"]:c * (a["group_id"] + 1)])
                    y = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
                elif t == "shortcut":
                    y = v
                    for i in layer.inputs[1:]:
                        y = y + out[i]
                    y = acts[a["activation"]](y)
                elif t == "upsample":
                    y = F.interpolate(v, scale_factor=a["stride"], mode="nearest")
                elif t == "dropout":
                    y = F.dropout(v, a["probability"], self.training)
                elif t == "yolo":
                    heads.append(v)
                    y = v
                elif t == "softmax":
                    heads.append(v)
                    y = v
                else:          # cost
                    y = v
                out[layer.index] = y
            return heads

    return Net()


def bench_torch(model, batch: int, iters: int, threads: int, warmup: int = 2) -> list[float]:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    net = torch_network(model)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.9, weight_decay=0.0005)
    rng = np.random.default_rng(0)
    data = synthetic_batch(model, batch, rng)
    x = torch.from_numpy(data.images)
    labels = torch.from_numpy(np.asarray(data.labels)) if data.labels is not None else None
    times = []
    for k in range(warmup + iters):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        heads = net(x)
        if labels is not None:
            loss = F.cross_entropy(heads[-1].flatten(1), labels, reduction="sum")
        else:
            loss = sum((h * h).sum() for h in heads)
        loss.backward()
        opt.step()
        if k >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="classifier,yolo-fastest")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (after 2 warm-up ones); the median")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    table = {}
    available = models()
    for name in args.models.split(","):
        cfg, weights = available[name]
        model = dp.load(cfg, weights)
        ours = statistics.median(bench_ours(model, args.batch, args.iters))
        row = {"cfg": str(cfg), "batch": args.batch, "threads": args.threads,
               "ours_images_per_s": args.batch / ours, "ours_ms_per_iteration": 1000 * ours}
        if have_torch:
            theirs = statistics.median(bench_torch(dp.load(cfg, weights), args.batch, args.iters, args.threads))
            row.update({"torch_images_per_s": args.batch / theirs, "torch_ms_per_iteration": 1000 * theirs,
                        "ratio": (args.batch / ours) / (args.batch / theirs), "torch_version": torch.__version__})
        table[name] = row
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"training throughput, batch {args.batch}, {args.threads} threads (median of {args.iters} iterations)")
    for name, row in table.items():
        line = f"{name:>14}: ours {row['ours_images_per_s']:7.1f} img/s ({row['ours_ms_per_iteration']:7.1f} ms/it)"
        if "torch_images_per_s" in row:
            line += (f" | PyTorch {row['torch_version']} {row['torch_images_per_s']:7.1f} img/s "
                     f"({row['torch_ms_per_iteration']:7.1f} ms/it) | ours/PyTorch {row['ratio']:.2f}x")
        else:
            line += " | PyTorch not installed: comparison skipped"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
