"""The shipped weights/lenet.dcz (the README's Deep Compression row D, made by scripts/deep_compression_lenet.py
--rows D from weights/lenet.weights) holds what the README claims: 40x smaller than the .weights file, and 99.09%
top-1 on the 10,000 MNIST test digits once decompressed. The digits are read straight from the IDX files of
../shared/assets/mnist (that part is skipped without them) and run through the decompressed model as Darknet's
`classifier valid` does for 28x28 grey inputs: pixel / 255, no resize."""
import gzip
import struct

import numpy as np
import pytest

from darkprune.cli import main
from darkprune.darknet import load
from darkprune.engine.network import Network

from conftest import ROOT, asset

DCZ = ROOT / "weights" / "lenet.dcz"
WEIGHTS = ROOT / "weights" / "lenet.weights"
README_TOP1 = 0.9909


def idx(path, magic: int, dims: int) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    head = struct.unpack(f">{1 + dims}I", raw[:4 * (1 + dims)])
    assert head[0] == magic, f"{path}: not an IDX file of the expected kind"
    return np.frombuffer(raw, np.uint8, offset=4 * (1 + dims)).reshape(head[1:])


@pytest.fixture(scope="module")
def decompressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("lenet-dcz") / "lenet"
    assert main(["decompress", str(DCZ), "-o", str(out), "-q"]) == 0
    return out.with_suffix(".cfg"), out.with_suffix(".weights")


def test_forty_times_smaller_than_the_weights_file(decompressed):
    ratio = WEIGHTS.stat().st_size / DCZ.stat().st_size
    assert ratio >= 39.95, f"{WEIGHTS.stat().st_size} B / {DCZ.stat().st_size} B = {ratio:.2f}x"
    model = load(*decompressed)
    original = load(ROOT / "cfg" / "lenet.cfg", WEIGHTS)
    assert model.graph.total_params == original.graph.total_params
    weights = {name: model.params[i]["weights"] for i, name in ((0, "conv1"), (2, "conv2"), (4, "ip1"), (5, "ip2"))}
    kept = {name: np.count_nonzero(w) / w.size for name, w in weights.items()}
    # row D's kept shares: 66 / 12 / 7 / 19 %, and 8-bit conv / 5-bit fc weights (at most 256 / 32 distinct values)
    assert kept["ip1"] <= 0.075 and kept["conv2"] <= 0.125 and kept["ip2"] <= 0.195 and kept["conv1"] <= 0.665
    assert len(np.unique(weights["ip1"][weights["ip1"] != 0])) <= 32
    assert len(np.unique(weights["conv2"][weights["conv2"] != 0])) <= 256


def test_top1_on_the_mnist_test_digits(decompressed):
    images = idx(asset("mnist", "t10k-images.idx3-ubyte.gz"), 2051, 3)
    labels = idx(asset("mnist", "t10k-labels.idx1-ubyte.gz"), 2049, 1)
    assert images.shape == (10000, 28, 28) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    network = Network(load(*decompressed))
    output = network.graph.output_layers()[-1]
    correct = 0
    for start in range(0, len(images), 500):
        x = (images[start:start + 500, None].astype(np.float64) / 255.0).astype(np.float32)
        probs = network.forward(x, outputs=[output])[output].reshape(len(x), -1)
        correct += int((probs.argmax(axis=1) == labels[start:start + 500]).sum())
    assert correct / len(images) == pytest.approx(README_TOP1, abs=0.5e-4), f"top-1 {correct / len(images):.4f}"
