"""Model-level Deep Compression (darkprune.compress.pipeline): pruning, weight sharing, the .dcz round trip.

References are independent of the pipeline's code: pruned positions against a plain numpy argsort of |w|, quantised
values against a brute-force nearest-centroid search, the round trip against the original float32 bits and OpenCV's
Darknet importer on the decompressed pair, the report's sizes against the file on disk.
"""
import gzip
import os

import numpy as np
import pytest

import darkprune as dp
from darkprune.compress.pipeline import (compress, compressible_layers, decompress, format_report,
                                         read_compressed, resolve_layer_options)
from darkprune.engine.network import OPENCV_BN_EPS, Network
from darkprune.errors import DarkpruneError
from conftest import ASSETS, ROOT, asset_files

LENET = ASSETS / "models" / "mnist-lenet"
MNIST = ASSETS / "mnist"


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def lenet():
    return dp.load(*asset_files(LENET / "mnist_lenet.cfg", LENET / "mnist_lenet.weights"))


@pytest.fixture(scope="module")
def fastest():
    return dp.load(ROOT / "cfg" / "yolo-fastest-1.1.cfg", ROOT / "weights" / "yolo-fastest-1.1.weights")


def mnist_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` MNIST test digits (uint8 28x28) and labels, read straight from the IDX files."""
    images = MNIST / "t10k-images.idx3-ubyte.gz"
    labels = MNIST / "t10k-labels.idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        pytest.skip("MNIST assets not present")
    pixels = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
    digits = np.frombuffer(gzip.decompress(labels.read_bytes()), np.uint8, offset=8)
    return pixels[:count], digits[:count]


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory):
    """A small Darknet classification dataset of real MNIST test digits (labels c0..c9 in the file names)."""
    cv2 = pytest.importorskip("cv2")
    pixels, digits = mnist_images(300)
    folder = tmp_path_factory.mktemp("mnist-small")
    paths = []
    for number, (image, digit) in enumerate(zip(pixels, digits)):
        path = folder / f"{number:05d}_c{digit}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
    (folder / "test.list").write_text("\n".join(paths) + "\n")
    (folder / "labels.txt").write_text("\n".join(f"c{d}" for d in range(10)) + "\n")
    (folder / "mnist.data").write_text("classes=10\ntrain=test.list\nvalid=test.list\nlabels=labels.txt\ntop=2\n")
    return folder / "mnist.data"


LENET_SPARSITY = {"conv0": 0.33, "conv2": 0.5, "connected4": 0.9, "connected6": 0.8, "connected8": 0.5}


@pytest.fixture(scope="module")
def lenet_result(lenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("lenet-dcz") / "lenet.dcz"
    return compress(lenet, sparsity=LENET_SPARSITY, clusters={"conv": 64, "fc": 16, "connected8": 8}, out=out,
                    progress=False)


# ------------------------------------------------------------------------------------------------------ pruning

def test_pruned_positions_are_the_smallest_magnitudes(lenet, lenet_result):
    for layer in compressible_layers(lenet):
        original = lenet.params[layer.index]["weights"].ravel()
        quantised = lenet_result.model.params[layer.index]["weights"].ravel()
        count = int(np.floor(LENET_SPARSITY[layer.name] * original.size + 0.5))
        order = np.argsort(np.abs(original), kind="stable")
        assert np.all(quantised[order[:count]] == 0), layer.name
        assert np.all(quantised[~lenet_result.masks[layer.index].ravel()] == 0)
        assert int((~lenet_result.masks[layer.index]).sum()) == count


def test_input_model_is_left_unchanged(lenet, lenet_result):
    fresh = dp.load(LENET / "mnist_lenet.cfg", LENET / "mnist_lenet.weights")
    for index, arrays in fresh.params.items():
        for name, value in arrays.items():
            assert np.array_equal(lenet.params[index][name], value)


def test_survivors_take_their_nearest_centroid(lenet, lenet_result):
    for layer in compressible_layers(lenet):
        spec = lenet_result.codebooks[layer.index]
        mask = spec["mask"]
        original = lenet.params[layer.index]["weights"][mask].astype(np.float64)
        codebook = spec["codebook"].astype(np.float64)
        # Brute force: the distance from every survivor to every centroid.
        nearest = np.abs(original[:, None] - codebook[None, :]).min(axis=1)
        got = lenet_result.model.params[layer.index]["weights"][mask].astype(np.float64)
        assert np.allclose(np.abs(original - got), nearest, atol=1e-7), layer.name
        k = 8 if layer.name == "connected8" else 64 if layer.type == "convolutional" else 16
        assert np.unique(got).size <= k == spec["codebook"].size


def test_biases_are_stored_exactly(lenet, lenet_result):
    for index, arrays in lenet.params.items():
        assert np.array_equal(lenet_result.model.params[index]["biases"], arrays["biases"])


# ------------------------------------------------------------------------------------------------- round trip

def _bits(array):
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


def test_round_trip_is_bit_exact_through_the_engine(lenet_result):
    back, specs = read_compressed(lenet_result.path)
    for index, arrays in lenet_result.model.params.items():
        for name, value in arrays.items():
            assert np.array_equal(_bits(back.params[index][name]), _bits(value)), (index, name)
    assert sorted(specs) == sorted(lenet_result.codebooks)
    pixels, _ = mnist_images(32)
    x = np.repeat(pixels[:, None].astype(np.float32) / 255, 3, axis=1)
    a = Network(lenet_result.model).forward(x)
    b = Network(back).forward(x)
    for key in a:
        assert np.array_equal(_bits(a[key]), _bits(b[key]))


def test_decompressed_pair_loads_in_opencv(lenet_result, tmp_path):
    cv2 = pytest.importorskip("cv2")
    model = decompress(lenet_result.path)
    model.save(tmp_path / "d.cfg", tmp_path / "d.weights")
    reloaded = dp.load(tmp_path / "d.cfg", tmp_path / "d.weights")
    for index, arrays in lenet_result.model.params.items():
        for name, value in arrays.items():
            assert np.array_equal(_bits(reloaded.params[index][name]), _bits(value))
    pixels, _ = mnist_images(8)
    x = np.repeat(pixels[:, None].astype(np.float32) / 255, 3, axis=1)
    net = cv2.dnn.readNetFromDarknet(str(tmp_path / "d.cfg"), str(tmp_path / "d.weights"))
    net.setInput(x)
    theirs = net.forward().reshape(8, -1)
    ours = list(Network(model, OPENCV_BN_EPS).forward(x).values())[0].reshape(8, -1)
    assert np.abs(theirs - ours).max() < 1e-5


def test_detector_round_trip_with_batchnorm_and_groups(fastest, tmp_path):
    result = compress(fastest, sparsity={"conv": 0.5, "conv120": 0.0, "conv129": 0.0}, clusters={"conv": 256},
                      out=tmp_path / "f.dcz", progress=False)
    back = decompress(tmp_path / "f.dcz")
    for index, arrays in result.model.params.items():
        for name, value in arrays.items():
            assert np.array_equal(_bits(back.params[index][name]), _bits(value)), (index, name)
    # The yolo heads' input convs were named at 0: nothing pruned there, every other conv at half.
    for layer in compressible_layers(fastest):
        zeros = float((result.model.params[layer.index]["weights"] == 0).mean())
        if layer.name in ("conv120", "conv129"):
            assert zeros < 0.01
        else:
            assert 0.49 < zeros < 1.0, layer.name  # half, or more where a channel died (dead removal)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    a, b = Network(result.model).forward(x), Network(back).forward(x)
    for key in a:
        assert np.array_equal(_bits(a[key]), _bits(b[key]))
    # Batch-norm arrays and the depthwise (groups) filters keep their shapes and values.
    assert back.params[0]["rolling_variance"].shape == fastest.params[0]["rolling_variance"].shape
    assert np.array_equal(back.params[0]["scales"], fastest.params[0]["scales"])


# ------------------------------------------------------------------------------------------------------ report

def test_report_sums_match_the_file(lenet, lenet_result):
    report = lenet_result.report
    rows, total = report["layers"], report["total"]
    assert total["bytes_after"] == os.path.getsize(lenet_result.path)
    assert sum(row["bytes_after"] for row in rows) + total["overhead_bytes"] == total["bytes_after"]
    assert sum(row["bytes_dense"] for row in rows) == total["bytes_dense"] == 4 * lenet.graph.total_params
    assert sum(row["params"] for row in rows) == total["params"] == lenet.graph.total_params
    assert total["weights_file_bytes"] == os.path.getsize(LENET / "mnist_lenet.weights")
    assert total["ratio_weights_file"] == pytest.approx(total["weights_file_bytes"] / total["bytes_after"])
    kept = sum(int(m.sum()) for m in lenet_result.masks.values())
    assert total["quantized_kept"] == kept
    for row in rows:
        assert row["ratio"] == pytest.approx(row["bytes_dense"] / row["bytes_after"])
    text = format_report(report)
    assert "conv0" in text and "x smaller" in text


def test_accuracy_before_and_after(lenet, mnist_data, tmp_path):
    result = compress(lenet, sparsity={"connected4": 0.5}, clusters={"conv": 256, "fc": 32}, data=mnist_data,
                      out=tmp_path / "m.dcz", workspace=tmp_path / "ws", progress=False)
    accuracy = result.report["accuracy"]
    assert result.report["metric"] == "top1"
    # The published model scores 95.48% on the full test set; on these 300 digits it must be in the nineties.
    assert 0.9 < accuracy["before"] <= 1.0
    assert abs(accuracy["after"] - accuracy["before"]) < 0.03  # 50% of one fc layer, 32 clusters: barely a change
    assert accuracy["after"] == pytest.approx(dp.evaluate(decompress(tmp_path / "m.dcz"), mnist_data,
                                                          progress=False)["top1"])
    for name in ("config.txt", "masks.npz", "pruned.weights", "quantized.weights", "report.json"):
        assert (tmp_path / "ws" / name).exists(), name


# ------------------------------------------------------------------------------------------------- options

def test_layer_options_resolution(lenet):
    values = resolve_layer_options(lenet, {"connected6": 7, "fc": 3, "conv": 9}, {"convolutional": 1,
                                                                                  "connected": 2}, "x")
    assert values == {0: 9, 2: 9, 4: 3, 6: 7, 8: 3}
    assert resolve_layer_options(lenet, {"4": 5}, {"convolutional": 1, "connected": 2}, "x")[4] == 5


@pytest.mark.parametrize("sparsity, message", [
    ({"conv1": 0.5}, "no layer named 'conv1'"),
    ({"maxpool1": 0.5}, "[maxpool]"),
    ({"conv0": 1.5}, "outside [0, 1]"),
    ({"conv0": -0.1}, "outside [0, 1]"),
])
def test_bad_sparsity_is_refused(lenet, sparsity, message):
    with pytest.raises(DarkpruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compress(lenet, sparsity=sparsity, progress=False)


def test_explicit_schedule_may_not_lower_a_ratio(lenet):
    with pytest.raises(DarkpruneError, match="lowers"):
        compress(lenet, schedule="conv0=0.5;conv0=0.3", progress=False)


def test_explicit_schedule_sets_the_ratios(lenet):
    result = compress(lenet, schedule="conv0=0.2;conv0=0.4,connected4=0.6", progress=False)
    assert float((~result.masks[0]).mean()) == pytest.approx(0.4, abs=0.01)
    assert float((~result.masks[4]).mean()) == pytest.approx(0.6, abs=0.001)
    assert result.masks[2].all()


def test_finetuning_without_data_is_refused(lenet):
    with pytest.raises(DarkpruneError, match="training data"):
        compress(lenet, sparsity={"conv0": 0.5}, finetune_iters=10, progress=False)


# ------------------------------------------------------------------------------------------------ finetuning

def test_finetuning_never_revives_a_pruned_weight(lenet, mnist_data, tmp_path):
    pytest.importorskip("darkprune.train.finetune")
    sparsity = {"conv0": 0.3, "connected4": 0.9, "connected6": 0.5}
    common = dict(sparsity=sparsity, clusters={"conv": 32, "fc": 16}, data=mnist_data, finetune_iters=3,
                  batch=8, seed=3, progress=False)
    plain = compress(lenet, centroid_iters=0, **common)
    tuned = compress(lenet, centroid_iters=4, out=tmp_path / "t.dcz", **common)
    steps = [entry for entry in tuned.history if "step" in entry]
    assert [entry["revived"] for entry in steps] == [0, 0, 0]
    for index, mask in tuned.masks.items():
        weights = tuned.model.params[index]["weights"]
        assert np.all(weights[~mask] == 0)
        # Finetuning moved the survivors (so the check above is not vacuous) ...
        assert not np.array_equal(weights[mask], lenet.params[index]["weights"][mask])
        # ... and centroid finetuning moved the codebook, never the assignment: every weight is its cluster's
        # (new) centroid, with the clusters of the k-means step.
        spec, before = tuned.codebooks[index], plain.codebooks[index]
        assert np.array_equal(spec["labels"], before["labels"])
        assert np.array_equal(spec["mask"], before["mask"])
        assert not np.array_equal(spec["codebook"], before["codebook"])
        assert np.array_equal(weights[mask], spec["codebook"][spec["labels"]])
    back = decompress(tmp_path / "t.dcz")
    for index, arrays in tuned.model.params.items():
        for name, value in arrays.items():
            assert np.array_equal(_bits(back.params[index][name]), _bits(value)), (index, name)


# ------------------------------------------------------------------------------------------------ dead neurons

def _prune_all(model, ratio_of):
    from darkprune.compress.magnitude import apply_mask, magnitude_mask
    pruned, masks = model.copy(), {}
    for layer in compressible_layers(pruned):
        masks[layer.index] = magnitude_mask(pruned.params[layer.index]["weights"], ratio_of(layer))
        pruned.params[layer.index]["weights"] = apply_mask(pruned.params[layer.index]["weights"],
                                                           masks[layer.index])
    return pruned, masks


def test_dead_neuron_removal_changes_no_output(lenet):
    from darkprune.compress.pipeline import remove_dead_weights
    # connected8 (84 -> 10) at 97%: most of connected6's 84 neurons lose every outgoing weight.
    pruned, masks = _prune_all(lenet, lambda layer: 0.97 if layer.name == "connected8" else 0.0)
    dead_by_hand = ~masks[8].any(axis=0)                   # connected6's neurons nothing reads
    pixels, _ = mnist_images(16)
    x = np.repeat(pixels[:, None].astype(np.float32) / 255, 3, axis=1)
    before = Network(pruned).forward(x)
    removed = remove_dead_weights(pruned, masks)
    assert removed[6] == int(dead_by_hand.sum()) * 120
    assert not masks[6][dead_by_hand].any() and masks[6][~dead_by_hand].all()
    assert np.all(pruned.params[6]["weights"][dead_by_hand] == 0)
    after = Network(pruned).forward(x)
    for key in before:
        assert np.array_equal(_bits(before[key]), _bits(after[key]))


def test_dead_channel_removal_through_pools_and_groups(fastest):
    from darkprune.compress.pipeline import remove_dead_weights
    # Depthwise filters pruned hard: their input channels (pointwise outputs) die.
    pruned, masks = _prune_all(fastest, lambda layer: 0.9 if layer.attrs["groups"] > 1 else 0.3)
    x = np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)
    before = Network(pruned).forward(x)
    removed = remove_dead_weights(pruned, masks)
    assert sum(removed.values()) > 10000
    after = Network(pruned).forward(x)
    for key in before:
        assert np.array_equal(_bits(before[key]), _bits(after[key]))
