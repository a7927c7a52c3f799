"""The .dcz file: bit-exact round trips, refusal of damaged files, and the LeNet-5-sized size check."""

import os

import numpy as np
import pytest

from darkprune.compress.dcz import MAGIC, WeightsHeader, format_size_report, read_dcz, size_report, write_dcz
from darkprune.compress.kmeans import quantized_weights, share_weights
from darkprune.compress.magnitude import magnitude_mask
from darkprune.errors import DarkpruneError

LENET_CFG = """[net]
batch=64
height=28
width=28
channels=1

[convolutional]
filters=20
size=5
stride=1
activation=linear

[maxpool]
size=2
stride=2

[convolutional]
filters=50
size=5
stride=1
activation=linear

[maxpool]
size=2
stride=2

[connected]
output=500
activation=relu

[connected]
output=10
activation=linear

[softmax]
"""

# name, layer index, shape, share of weights kept (Deep Compression Table 1), clusters, index bits
LENET_LAYERS = [("conv1", 0, (20, 1, 5, 5), 0.66, 256, 8), ("conv2", 2, (50, 20, 5, 5), 0.12, 256, 8),
                ("ip1", 4, (500, 800), 0.08, 32, 5), ("ip2", 5, (10, 500), 0.19, 32, 5)]


def lenet_like_layers(seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for name, index, shape, kept, clusters, bits in LENET_LAYERS:
        fan_in = int(np.prod(shape[1:]))
        weights = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        mask = magnitude_mask(weights, 1.0 - kept)
        codebook, labels, dense = share_weights(weights, mask, clusters)
        biases = (rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
        spec = {"codebook": codebook, "labels": labels, "mask": mask, "index_bits": bits}
        layers.append({"index": index, "name": name, "arrays": [("biases", biases, None), ("weights", dense, spec)]})
    return layers


def assert_same_bits(a, b):
    assert a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_round_trip_is_bit_exact(tmp_path):
    layers = lenet_like_layers()
    path = tmp_path / "lenet.dcz"
    report = write_dcz(path, LENET_CFG, (0, 2, 5, 12345678901), layers)
    assert report["total"]["bytes_after"] == path.stat().st_size
    cfg_text, header, restored = read_dcz(path)
    assert cfg_text == LENET_CFG
    assert header == WeightsHeader(0, 2, 5, 12345678901)
    assert [layer["index"] for layer in restored] == [0, 2, 4, 5]
    assert [layer["name"] for layer in restored] == ["conv1", "conv2", "ip1", "ip2"]
    for original, back in zip(layers, restored):
        (bias_name, biases, _), (weight_name, dense, spec) = original["arrays"]
        (bias_name2, biases2, raw_spec), (weight_name2, dense2, spec2) = back["arrays"]
        assert (bias_name2, weight_name2, raw_spec) == (bias_name, weight_name, None)
        assert_same_bits(biases2, biases)
        # Independently rebuilt quantised array: codebook value at kept positions, +0.0 elsewhere.
        expected = np.zeros(spec["mask"].shape, dtype=np.float32)
        expected[spec["mask"]] = spec["codebook"][spec["labels"]]
        assert_same_bits(dense2, expected)
        assert_same_bits(dense2, dense)
        np.testing.assert_array_equal(spec2["mask"], spec["mask"])
        assert spec2["index_bits"] == spec["index_bits"]
        assert_same_bits(quantized_weights(spec2["codebook"], spec2["labels"], spec2["mask"]), expected)


def test_edge_layers_and_special_values(tmp_path):
    mask_none = np.zeros((4, 3), dtype=bool)
    mask_all = np.ones((2, 2, 3, 3), dtype=bool)
    mask_far = np.zeros(10_000, dtype=bool)
    mask_far[[0, 9_999]] = True  # gaps far beyond 3-bit indices
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, np.nan, 3.4e38], dtype=np.float32)
    layers = [
        {"index": 0, "name": "empty", "arrays": []},
        {"index": 1, "name": "pruned-out", "arrays": [("weights", None, {"codebook": np.zeros(0, np.float32),
                                                                        "labels": np.zeros(0, int),
                                                                        "mask": mask_none, "index_bits": 8})]},
        {"index": 2, "name": "dense", "arrays": [("weights", None, {"codebook": np.array([-0.5, 0.25], np.float32),
                                                                   "labels": np.arange(36) % 2,
                                                                   "mask": mask_all, "index_bits": 8}),
                                                ("scales", special, None), ("nothing", np.zeros(0, np.float32), None)]},
        {"index": 7, "name": "far", "arrays": [("weights", None, {"codebook": np.array([2.0, -0.0, 9.0], np.float32),
                                                                 "labels": np.array([1, 2]), "mask": mask_far,
                                                                 "index_bits": 3})]},
    ]
    path = tmp_path / "edge.dcz"
    write_dcz(path, "", {"major": 0, "minor": 1, "revision": 0, "seen": 0}, layers)
    cfg_text, header, restored = read_dcz(path)
    assert cfg_text == "" and header == (0, 1, 0, 0)
    assert restored[0]["arrays"] == []
    assert_same_bits(restored[1]["arrays"][0][1], np.zeros((4, 3), np.float32))
    dense = restored[2]["arrays"][0][1]
    assert_same_bits(dense, np.where(np.arange(36) % 2, 0.25, -0.5).astype(np.float32).reshape(2, 2, 3, 3))
    assert_same_bits(restored[2]["arrays"][1][1], special)
    assert restored[2]["arrays"][2][1].shape == (0,)
    far = restored[3]["arrays"][0][1]
    assert far.tobytes() == np.concatenate(([-0.0], np.zeros(9_998), [9.0])).astype(np.float32).tobytes()
    assert restored[3]["index"] == 7


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "model.dcz"
    path.write_bytes(b"old")
    write_dcz(path, "[net]\n", (0, 2, 5, 0), [])
    assert read_dcz(path)[0] == "[net]\n"
    assert sorted(os.listdir(tmp_path)) == ["model.dcz"]  # no temp file left behind
    with pytest.raises(ValueError):
        write_dcz(tmp_path / "bad.dcz", "", (0, 2, 5, 0),
                  [{"index": 0, "name": "x", "arrays": [("w", None, {"codebook": np.zeros(2, np.float32),
                                                                      "labels": np.array([5]),
                                                                      "mask": np.ones(1, bool), "index_bits": 8})]}])
    assert sorted(os.listdir(tmp_path)) == ["model.dcz"]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    rng = np.random.default_rng(4)
    weights = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    mask = magnitude_mask(weights, 0.7)
    codebook, labels, _ = share_weights(weights, mask, 16)
    layers = [{"index": 0, "name": "conv", "arrays": [
        ("biases", rng.standard_normal(8).astype(np.float32), None),
        ("weights", None, {"codebook": codebook, "labels": labels, "mask": mask, "index_bits": 4})]}]
    path = tmp_path_factory.mktemp("dcz") / "small.dcz"
    write_dcz(path, "[net]\nwidth=8\n", (0, 2, 5, 64), layers)
    return path, path.read_bytes()


def test_every_flipped_byte_is_refused(small_file, tmp_path):
    _, data = small_file
    damaged = tmp_path / "damaged.dcz"
    for position in range(len(data)):
        for flip in (0x01, 0x80):
            corrupt = bytearray(data)
            corrupt[position] ^= flip
            damaged.write_bytes(bytes(corrupt))
            with pytest.raises(DarkpruneError) as info:
                read_dcz(damaged)
            message = str(info.value)
            assert message.startswith(str(damaged) + ": ") and "\n" not in message
            assert "corrupt" in message or "truncated" in message


def test_every_truncation_is_refused(small_file, tmp_path):
    _, data = small_file
    cut = tmp_path / "cut.dcz"
    for length in list(range(len(data))):
        cut.write_bytes(data[:length])
        with pytest.raises(DarkpruneError, match=r"cut\.dcz: .*(truncated|corrupt)"):
            read_dcz(cut)
    cut.write_bytes(data + b"\x00")
    with pytest.raises(DarkpruneError, match="corrupt"):
        read_dcz(cut)


def test_not_a_dcz_file(tmp_path):
    path = tmp_path / "yolo.weights"
    path.write_bytes(b"\x00\x00\x00\x00\x02\x00\x00\x00" + bytes(100))
    with pytest.raises(DarkpruneError, match="not a .dcz file"):
        read_dcz(path)
    with pytest.raises(DarkpruneError, match="cannot read"):
        read_dcz(tmp_path / "missing.dcz")
    assert MAGIC == b"DCZ1"


def test_lenet_sized_layers_compress_35x(tmp_path):
    layers = lenet_like_layers()
    path = tmp_path / "lenet.dcz"
    report = write_dcz(path, LENET_CFG, (0, 2, 5, 0), layers)
    dense_bytes = 4 * sum(array.size if array is not None else spec["mask"].size
                          for layer in layers for _, array, spec in layer["arrays"])
    assert report["total"]["bytes_dense"] == dense_bytes == 1_724_320
    ratio = dense_bytes / path.stat().st_size
    print("\n" + format_size_report(report))
    # The paper reaches 39x on trained LeNet-5 weights, whose masks and clusters Huffman-code better than random ones.
    assert ratio >= 35.0
    assert report["total"]["ratio"] == pytest.approx(ratio)
    kept = {row["name"]: row["weights_kept_share"] for row in report["layers"]}
    assert kept == pytest.approx({"conv1": 0.66, "conv2": 0.12, "ip1": 0.08, "ip2": 0.19}, abs=1e-3)
    # The paper rounds this to "12x": 430500 weights, 330 + 3000 + 32000 + 950 kept.
    assert report["total"]["ratio_weight_count"] == pytest.approx(430_500 / 36_280)
    assert report["total"]["ratio_pruned"] < report["total"]["ratio_quantized"] < ratio
    # size_report measures the same thing without writing.
    assert size_report(layers, LENET_CFG, (0, 2, 5, 0)) == {k: v for k, v in report.items() if k != "path"}
