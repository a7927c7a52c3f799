"""A network at another input size (darknet/resize.py, `transform/eval --input-size`).

Reference: OpenCV's Darknet importer on the written pair (its cfg at the new size), on real photos, with the
bundled Yolo-Fastest's real weights; the sizes a network refuses are refused as Darknet's shape rules refuse them."""
import json

import cv2
import numpy as np
import pytest

import darkprune as dp
from darkprune.darknet.resize import parse_input_size, with_input_size
from darkprune.data.preprocess import preprocess_image
from darkprune.engine.network import OPENCV_BN_EPS, Network

from conftest import BUNDLED_CFG, BUNDLED_DATA, BUNDLED_WEIGHTS, asset, run_cli

pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def fastest():
    return dp.load(BUNDLED_CFG, BUNDLED_WEIGHTS)


def _photos(width, height, count=3):
    paths = sorted((BUNDLED_DATA.parent / "images").glob("*.jpg"))[:count]
    return np.stack([preprocess_image(p, width, height)[0] for p in paths]).astype(np.float32)


@pytest.mark.parametrize("width,height", [(256, 256), (416, 224)])
def test_resized_pair_runs_as_opencv_runs_it(fastest, tmp_path, width, height):
    small = with_input_size(fastest, width, height)
    assert small.input_shape == (3, height, width)
    assert small.params is fastest.params                     # the weights are shared, not copied
    small.save(tmp_path / "s.cfg", tmp_path / "s.weights")
    text = (tmp_path / "s.cfg").read_text()
    assert f"width={width}\n" in text and f"height={height}\n" in text
    net = cv2.dnn.readNetFromDarknet(str(tmp_path / "s.cfg"), str(tmp_path / "s.weights"))
    net.enableFusion(False)
    heads = [layer.index - 1 for layer in small.graph if layer.type == "yolo"]   # the convs feeding the heads
    x = _photos(width, height)
    ours = Network(small, bn_eps=OPENCV_BN_EPS).forward(x, outputs=heads)
    net.setInput(x)
    theirs = net.forward([f"conv_{i}" for i in heads])
    for i, t in zip(heads, theirs):
        assert ours[i].shape == t.shape == (3, 255, height // (32 if i == heads[0] else 16),
                                            width // (32 if i == heads[0] else 16))
        assert np.abs(ours[i] - t).max() <= 1e-4 * np.abs(t).max(), i
    # Darknet's count: BFLOPs scale with the input area for this fully convolutional network
    assert small.graph.total_bflops == pytest.approx(fastest.graph.total_bflops * width * height / 320 ** 2,
                                                     rel=1e-6)


def test_sizes_a_network_cannot_take_are_refused(fastest):
    with pytest.raises(dp.DarkpruneError, match=r"at input 300x300: .*layer 124 \[route\]: route inputs differ"):
        with_input_size(fastest, 300, 300)
    lenet = dp.load(asset("models", "mnist-lenet", "mnist_lenet.cfg"))
    with pytest.raises(dp.DarkpruneError, match=r"layer 4 \[connected\]: its parameters depend on the input size"):
        with_input_size(lenet, 32, 32)
    assert parse_input_size("256") == (256, 256) and parse_input_size("320x256") == (320, 256)
    for bad in ("", "0", "3a", "1x2x3", "-5"):
        with pytest.raises(dp.DarkpruneError, match="expected WIDTH or WIDTHxHEIGHT"):
            parse_input_size(bad)


def test_cli_transform_and_eval_at_an_input_size(tmp_path, capsys):
    """`transform --input-size` writes the pruned pair at the new size (OpenCV loads it; its BFLOPs are Darknet's
    count at that size), and `eval --input-size` measures a pair at a size its cfg does not say."""
    common = [BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", BUNDLED_DATA, "-w", tmp_path / "ws", "-q"]
    assert run_cli(capsys, "ana", *common, "--limit", 8, "--rates", "0.3")[0] == 0
    assert run_cli(capsys, "prune", *common, "--rate", 0.1)[0] == 0
    ws = ["-w", tmp_path / "ws", "-q", "--json"]
    code, out, _ = run_cli(capsys, "transform", BUNDLED_CFG, *ws, "-o", tmp_path / "t320")
    assert code == 0
    code, out, _ = run_cli(capsys, "transform", BUNDLED_CFG, *ws, "-o", tmp_path / "t256", "--input-size", "256")
    assert code == 0
    summary = json.loads(out)
    assert summary["input_size"] == [256, 256]
    small = dp.load(tmp_path / "t256.cfg", tmp_path / "t256.weights")
    assert small.input_shape == (3, 256, 256)
    assert summary["bflops_after"] == pytest.approx(small.graph.total_bflops, abs=1e-6)
    cv2.dnn.readNetFromDarknet(str(tmp_path / "t256.cfg"), str(tmp_path / "t256.weights"))
    evaluated = [json.loads(run_cli(capsys, "eval", *pair, "--data", BUNDLED_DATA, "--limit", 8, "--json", "-q")[1])
                 for pair in ([tmp_path / "t256.cfg", tmp_path / "t256.weights"],
                              [tmp_path / "t320.cfg", tmp_path / "t320.weights", "--input-size", "256"])]
    assert evaluated[0]["map50"] == evaluated[1]["map50"]
    code, _, err = run_cli(capsys, "transform", BUNDLED_CFG, *ws, "-o", tmp_path / "bad", "--input-size", "300")
    assert code == 1 and "route inputs differ in size" in err and not (tmp_path / "bad.cfg").exists()


def test_sweep_measures_the_unpruned_model_at_smaller_inputs(tmp_path, capsys):
    """`sweep --input-sizes` adds rows of the unpruned model at those sizes: each pair written at its size, loaded
    by OpenCV, its BFLOPs Darknet's count there and its mAP what `eval --input-size` measures; a size the network
    cannot take is refused before the workspace is made."""
    common = [BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", BUNDLED_DATA, "--limit", 8, "--rates", "0.3",
              "--thresholds", "0.01", "--timing-repeats", 1, "-q"]
    code, _, err = run_cli(capsys, "sweep", *common, "--input-sizes", "256,300", "-w", tmp_path / "bad")
    assert code == 1 and "at input 300x300" in err and not (tmp_path / "bad").exists()
    code, out, _ = run_cli(capsys, "sweep", *common, "--input-sizes", "288x256,256", "-w", tmp_path / "ws",
                           "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["label"] for r in rows] == ["original", "t=0.01", "288x256", "256x256"]
    original = dp.load(BUNDLED_CFG)
    for row, (w, h) in zip(rows[2:], [(288, 256), (256, 256)]):
        assert row["input_size"] == [w, h] and row["opencv_loads"] and row["ours_ms"] > 0
        pair = dp.load(row["cfg"], row["weights"])
        assert pair.input_shape == (3, h, w) and pair.graph.total_params == original.graph.total_params
        assert row["bflops"] == pytest.approx(original.graph.total_bflops * w * h / 320 ** 2, abs=1e-6)
        measured = json.loads(run_cli(capsys, "eval", BUNDLED_CFG, BUNDLED_WEIGHTS, "--data", BUNDLED_DATA,
                                      "--limit", 8, "--input-size", f"{w}x{h}", "--json", "-q")[1])
        assert row["map50"] == pytest.approx(measured["map50"], abs=1e-12)
