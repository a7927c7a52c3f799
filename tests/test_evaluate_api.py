"""evaluate()/detect()/classify() on tiny hand-made models and datasets, with hand-computed expectations.

The `forward=` hook stands in for the network: it returns head outputs written by hand (what Darknet's
forward_yolo_layer leaves in l.output), so every expected figure below is worked out on paper.
"""
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

import darkprune as dp
from darkprune.data import darknet_resize, image_to_chw
from darkprune.detect import classifier_input, classify, detect, read_image
from darkprune.errors import DarkpruneError
from darkprune.evaluate import evaluate

from conftest import quiet_cache

DETECTOR_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
filters=14
size=1
stride=8
pad=0
activation=linear

[yolo]
mask=0,1
anchors=8,8, 16,16
classes=2
num=2
"""

CLASSIFIER_CFG = """[net]
width=8
height=8
channels=3

[avgpool]

[connected]
output=4
activation=linear

[softmax]
"""


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    quiet_cache(monkeypatch, tmp_path / "cache")


def write_png(path: Path, width: int, height: int, value: int = 128, channels: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if channels == 1 else (height, width, channels)
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def detection_dataset(root: Path, images: dict[str, tuple[tuple[int, int], list]]) -> Path:
    """images: name -> ((width, height), label rows). Darknet's layout: images/x.png, labels/x.txt."""
    for name, ((w, h), rows) in images.items():
        write_png(root / "images" / f"{name}.png", w, h)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{name}.txt").write_text("".join(" ".join(str(v) for v in r) + "\n" for r in rows))
    (root / "valid.txt").write_text("".join(f"images/{n}.png\n" for n in images))
    (root / "names.txt").write_text("a\nb\n")
    data = root / "tiny.data"
    data.write_text("classes=2\nvalid=valid.txt\nnames=names.txt\n")
    return data


def yolo_output(cells: list[tuple]) -> np.ndarray:
    """One image's [yolo] output (2 anchors x (5 + 2 classes), 4 x 4 grid) with the given predictions.

    cells: (anchor, row, col, tx, ty, tw, th, objectness, class probabilities) in l.output's convention:
    x, y, objectness and classes after the logistic, w and h raw."""
    out = np.zeros((2, 7, 4, 4), np.float32)
    for anchor, row, col, tx, ty, tw, th, obj, probs in cells:
        out[anchor, :, row, col] = [tx, ty, tw, th, obj, *probs]
    return out.reshape(1, 14, 4, 4)


def hook(per_image: list[np.ndarray], layer: int = 1):
    """A forward= stand-in that returns the next images' hand-written outputs, in dataset order."""
    queue = list(per_image)

    def forward(x):
        outs = [queue.pop(0) for _ in range(len(x))]
        return {layer: np.concatenate(outs)}
    return forward


def box_cell(cx, cy, w, h, anchor_px):
    """The cell and raw values that make a [yolo] head (4x4 grid, 32x32 input) predict this box exactly."""
    col, row = int(cx * 4), int(cy * 4)
    return row, col, cx * 4 - col, cy * 4 - row, math.log(w * 32 / anchor_px), math.log(h * 32 / anchor_px)


@pytest.fixture
def detector(tmp_path):
    cfg = tmp_path / "tiny-yolo.cfg"
    cfg.write_text(DETECTOR_CFG)
    return dp.load(cfg)


@pytest.fixture
def two_images(tmp_path):
    """A dataset of two images with one object each (class 0 in "a", class 1 in "b"), and the output cell that
    predicts a's box exactly."""
    data = detection_dataset(tmp_path, {"a": ((64, 48), [(0, 0.3, 0.6, 0.25, 0.5)]),
                                        "b": ((40, 40), [(1, 0.7, 0.2, 0.5, 0.25)])})
    return data, box_cell(0.3, 0.6, 0.25, 0.5, 8)


def test_perfect_detections_give_map_one(two_images, detector):
    data, ra = two_images
    rb = box_cell(0.7, 0.2, 0.5, 0.25, 8)
    outputs = [yolo_output([(0, *ra, 0.9, (0.95, 0.05))]), yolo_output([(0, *rb, 0.9, (0.05, 0.95))])]
    result = evaluate(detector, data, forward=hook(outputs), batch=1, progress=False)
    # Each class: its true detection (0.855) ranks above the other image's 0.045 false one: AP 1.
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx(1.0)
    assert [row["ap"] for row in result["per_class"]] == pytest.approx([1.0, 1.0])
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 0)  # the 0.045 pairs are below thresh 0.25
    assert result["avg_iou"] == pytest.approx(1.0, abs=1e-5)
    assert result["detections"] == 4 and result["truths"] == 2 and result["images"] == 2


def test_a_box_that_misses_costs_its_class(two_images, detector):
    data, ra = two_images
    # b's prediction is half as tall as its truth (same centre): IoU exactly 0.5, which does not count (> 0.5).
    rb = box_cell(0.7, 0.2, 0.5, 0.125, 8)
    outputs = [yolo_output([(0, *ra, 0.9, (0.95, 0.0))]), yolo_output([(0, *rb, 0.9, (0.0, 0.95))])]
    result = evaluate(detector, data, forward=hook(outputs), batch=2, progress=False)
    assert [row["ap"] for row in result["per_class"]] == pytest.approx([1.0, 0.0])
    assert result["map50"] == pytest.approx(0.5)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 1)
    assert result["precision"] == pytest.approx(0.5) and result["recall"] == pytest.approx(0.5)


def test_letterbox_reaches_the_decoder(tmp_path, detector):
    # A 64x32 image letterboxed into 32x32 sits in rows 8..23: its centred half-size box (0.5, 0.5, 0.5, 0.5)
    # is (0.5, 0.5, 0.5, 0.25) in network coordinates, i.e. a 16 x 8 px box: anchor 1 (16x16), tw 0, th ln 0.5.
    data = detection_dataset(tmp_path, {"wide": ((64, 32), [(0, 0.5, 0.5, 0.5, 0.5)])})
    cell = (1, 2, 2, 0.0, 0.0, 0.0, math.log(0.5), 0.9, (0.95, 0.0))
    boxed = evaluate(detector, data, forward=hook([yolo_output([cell])]), letterbox=True, progress=False)
    assert boxed["per_class"][0]["ap"] == pytest.approx(1.0)
    assert boxed["letterbox"] is True
    # Without letterbox correction the same output is a box half as tall as the truth: IoU 0.5, no match.
    plain = evaluate(detector, data, forward=hook([yolo_output([cell])]), letterbox=False, progress=False)
    assert plain["per_class"][0]["ap"] == 0.0


def test_points_and_iou_thresh_are_passed_on(tmp_path, detector):
    data = detection_dataset(tmp_path, {"a": ((64, 48), [(0, 0.3, 0.6, 0.25, 0.5), (0, 0.7, 0.3, 0.25, 0.25)])})
    ra = box_cell(0.3, 0.6, 0.25, 0.5, 8)
    # One of the two truths found: recall 0.5 at precision 1. All-point AP = 0.5; 11-point = 6/11 (recall
    # points 0, 0.1, ..., 0.5 reached); 101-point = 51/101.
    outputs = lambda: hook([yolo_output([(0, *ra, 0.9, (0.95, 0.0))])])  # noqa: E731
    assert evaluate(detector, data, forward=outputs(), progress=False)["per_class"][0]["ap"] == pytest.approx(0.5)
    eleven = evaluate(detector, data, forward=outputs(), points=11, progress=False)
    assert eleven["points"] == 11 and eleven["per_class"][0]["ap"] == pytest.approx(6 / 11)
    coco = evaluate(detector, data, forward=outputs(), points=101, progress=False)
    assert coco["per_class"][0]["ap"] == pytest.approx(51 / 101)
    # A stricter IoU threshold than the exact box's 1.0 is still met; the result reports it.
    assert evaluate(detector, data, forward=outputs(), iou_thresh=0.9, progress=False)["iou_thresh"] == 0.9


def test_network_argument_and_limit(tmp_path, detector):
    from darkprune.engine.network import Network
    data = detection_dataset(tmp_path, {f"im{i}": ((32, 32), [(0, 0.5, 0.5, 0.5, 0.5)]) for i in range(3)})
    network = Network(detector)
    result = evaluate(None, data, network=network, limit=2, progress=False)
    assert result["images"] == 2 and result["truths"] == 2
    with pytest.raises(DarkpruneError, match="limit"):
        evaluate(detector, data, limit=0, progress=False)
    with pytest.raises(DarkpruneError, match="points"):
        evaluate(detector, data, points=1, progress=False)


def test_mismatched_model_and_dataset_are_refused(tmp_path, detector):
    data = detection_dataset(tmp_path, {"a": ((32, 32), [(0, 0.5, 0.5, 0.5, 0.5)])})
    (tmp_path / "three.data").write_text("classes=3\nvalid=valid.txt\n")
    with pytest.raises(DarkpruneError, match="classes=3"):
        evaluate(detector, tmp_path / "three.data", progress=False)
    cfg = tmp_path / "cls.cfg"
    cfg.write_text(CLASSIFIER_CFG)
    with pytest.raises(DarkpruneError, match="detection dataset"):
        evaluate(dp.load(cfg), data, progress=False)


# ------------------------------------------------------------------------------------------------------------
# classifiers


def classification_dataset(root: Path, names: list[str], top: int | None = None) -> Path:
    labels = ["alpha", "beta", "gamma", "delta"]
    for i, name in enumerate(names):
        write_png(root / "imgs" / f"{i}_{name}.png", 12, 10, value=20 * i)
    (root / "labels.txt").write_text("\n".join(labels) + "\n")
    (root / "valid.txt").write_text("".join(f"imgs/{i}_{n}.png\n" for i, n in enumerate(names)))
    data = root / "cls.data"
    data.write_text("classes=4\nvalid=valid.txt\nlabels=labels.txt\n" + (f"top={top}\n" if top else ""))
    return data


def test_topk_counts_from_hand_written_scores(tmp_path):
    cfg = tmp_path / "cls.cfg"
    cfg.write_text(CLASSIFIER_CFG)
    model = dp.load(cfg)
    data = classification_dataset(tmp_path, ["alpha", "beta", "gamma", "delta"], top=2)
    scores = [np.array([[0.7, 0.1, 0.1, 0.1]]),   # alpha: top-1 right
              np.array([[0.5, 0.3, 0.1, 0.1]]),   # beta: second
              np.array([[0.1, 0.2, 0.3, 0.4]]),   # gamma: second
              np.array([[0.4, 0.3, 0.2, 0.1]])]   # delta: last
    forward = hook([s.reshape(1, 4, 1, 1).astype(np.float32) for s in scores], layer=2)
    result = evaluate(model, data, forward=forward, batch=3, progress=False)
    assert result["top1"] == pytest.approx(0.25)
    assert result["top2"] == pytest.approx(0.75) and result["top"] == 2
    assert result["top5"] == pytest.approx(1.0)  # only 4 classes: every label is within the top 5
    assert result["images"] == 4


def test_classifier_cache_matches_streaming(tmp_path):
    cfg = tmp_path / "cls.cfg"
    cfg.write_text(CLASSIFIER_CFG)
    model = dp.load(cfg, seed=3)
    data = classification_dataset(tmp_path, ["alpha", "beta", "gamma", "delta", "alpha"])
    cache = tmp_path / "own-cache"
    first = evaluate(model, data, cache=True, cache_dir=cache, progress=False)
    entries = sorted(p.name for p in cache.glob("inputs-*darknet-crop-*.npy"))
    assert len(entries) == 2  # inputs + sizes
    second = evaluate(model, data, cache=True, cache_dir=cache, progress=False)
    streamed = evaluate(model, data, cache=False, progress=False)
    assert first == second == streamed
    scores = classify(model, [str(p) for p in sorted((tmp_path / "imgs").glob("*.png"))], top=4)
    assert all(len(s) == 4 and s[0][1] >= s[-1][1] for s in scores)


def test_classifier_input_is_resize_min_then_centre_crop():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # 40 x 20: resize_min -> 20 x 10, crop x 5..14
    chw, size = classifier_input(wide, 10, 10)
    assert size == (40, 20)
    np.testing.assert_array_equal(chw, darknet_resize(image_to_chw(wide), 20, 10)[:, :, 5:15])
    tall = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)  # 20 x 40: -> 10 x 20, crop y 5..14
    np.testing.assert_array_equal(classifier_input(tall, 10, 10)[0],
                                  darknet_resize(image_to_chw(tall), 10, 20)[:, 5:15, :])
    # A network taller than the resized image: Darknet's crop_image clamps rows outside the image to the border
    # ((10 - 14) / 2 = -2 in C: rows -2..11 read rows 0,0,0,1..9,9,9).
    square = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    small = darknet_resize(image_to_chw(square), 10, 10)
    rows = [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]
    np.testing.assert_array_equal(classifier_input(square, 10, 14)[0], small[:, rows, :])
    # Same size: untouched pixels (value / 255, RGB order).
    exact = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    np.testing.assert_allclose(classifier_input(exact, 10, 10)[0], exact[:, :, ::-1].transpose(2, 0, 1) / 255.0,
                               rtol=1e-6)


def test_image_arrays_grey_and_alpha():
    bgr = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    bgra = np.dstack([bgr, np.full((6, 5), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(bgra), bgr)
    grey = bgr[:, :, 0]
    np.testing.assert_array_equal(read_image(grey), np.dstack([grey] * 3))
    with pytest.raises(DarkpruneError, match="uint8"):
        read_image(bgr.astype(np.float32))


def test_detect_on_arrays_and_paths_agree(tmp_path, detector):
    image = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), image)
    from_array, sizes = detect(detector, [image, np.dstack([image, image[:, :, :1]])], thresh=0.01,
                               return_sizes=True)
    from_path = detect(detector, [path], thresh=0.01)
    assert sizes == [(50, 40), (50, 40)]
    for dets in (from_array[1], from_path[0]):
        np.testing.assert_array_equal(dets.boxes, from_array[0].boxes)
        np.testing.assert_array_equal(dets.probs, from_array[0].probs)
    with pytest.raises(DarkpruneError, match="no such image"):
        detect(detector, [tmp_path / "missing.jpg"])


def test_package_exports_are_the_functions():
    assert dp.evaluate is evaluate
    assert dp.detect is detect
    from darkprune.data import load_data
    assert dp.load_data is load_data
