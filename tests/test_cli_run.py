"""`darkprune run` / `darkprune eval` on the command line: detections against OpenCV's own, drawn outputs, image
kinds (grey, RGBA), and every bad input giving one clear line and exit code 1.

The reference for detections is OpenCV's Darknet importer used as its users use it: `readNetFromDarknet`, its
`[yolo]` output rows, `cv2.dnn.NMSBoxesBatched` (plain per-class IoU NMS).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import darkprune as dp
from darkprune.detect import detect
from darkprune.engine.network import OPENCV_BN_EPS, Network
from conftest import ASSETS, ROOT, asset_files, run_cli

cv2 = pytest.importorskip("cv2")
FASTEST = ASSETS / "models" / "yolo-fastest-1.1"
DOG = ASSETS / "images" / "dog.jpg"


pytestmark = pytest.mark.usefixtures("quiet")


@pytest.fixture(scope="module")
def fastest():
    cfg, weights, _ = asset_files(FASTEST / "yolo-fastest-1.1.cfg", FASTEST / "yolo-fastest-1.1.weights", DOG)
    return cfg, weights


def iou(a, b):
    """IoU of two [left, top, width, height] boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def opencv_dog(fastest):
    """OpenCV's detections on dog.jpg: (class, confidence, [left, top, width, height] relative to the image)."""
    cfg, weights = fastest
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    image = cv2.imread(str(DOG))
    net.setInput(cv2.dnn.blobFromImage(image, 1 / 255.0, (320, 320), swapRB=True, crop=False))
    rows = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()))
    boxes, scores, classes = [], [], []
    for row in rows:
        for cls in np.nonzero(row[5:] > 0.25)[0]:  # every class above thresh, as Darknet reports them
            boxes.append([float(row[0] - row[2] / 2), float(row[1] - row[3] / 2), float(row[2]), float(row[3])])
            scores.append(float(row[5 + cls]))
            classes.append(int(cls))
    keep = np.array(cv2.dnn.NMSBoxesBatched(boxes, scores, classes, 0.25, 0.45)).reshape(-1)
    return [(classes[k], scores[k], boxes[k]) for k in keep], image.shape[1], image.shape[0]


def test_detect_matches_opencv_on_dog(fastest, opencv_dog):
    cfg, weights = fastest
    reference, _, _ = opencv_dog
    network = Network(dp.load(cfg, weights), OPENCV_BN_EPS)
    dets = detect(network, [DOG], mode="opencv")[0]
    ours = []
    for box, probs in zip(dets.boxes, dets.probs):
        for cls in np.nonzero(probs)[0]:
            cx, cy, w, h = (float(v) for v in box)
            ours.append((int(cls), float(probs[cls]), [cx - w / 2, cy - h / 2, w, h]))
    names = (FASTEST / "coco.names").read_text().split("\n")
    assert {"dog", "bicycle", "car"} <= {names[c] for c, _, _ in ours}
    for cls, conf, box in reference:  # every OpenCV detection is one of ours
        best = max((o for o in ours if o[0] == cls), key=lambda o: iou(o[2], box))
        assert iou(best[2], box) > 0.99, names[cls]
        assert best[1] == pytest.approx(conf, abs=1e-4)
    for cls, conf, box in ours:  # and ours beyond them are what plain NMS drops (ours is the cfg's greedynms)
        if any(c == cls and iou(b, box) > 0.99 for c, _, b in reference):
            continue
        assert any(c == cls and s > conf and iou(b, box) > 0.45 for c, s, b in reference), (names[cls], conf)


def test_run_json_boxes_match_opencv_in_pixels(capsys, fastest, opencv_dog):
    cfg, weights = fastest
    reference, width, height = opencv_dog
    code, out, err = run_cli(capsys, "run", cfg, weights, DOG, "--resize", "opencv", "--json", "-q")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    (record,) = result["images"]
    assert record["path"] == str(DOG)
    found = record["detections"]
    assert all(set(d) >= {"name", "class", "confidence", "box"} for d in found)
    for cls, conf, box in reference:
        pixels = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
        best = max((d for d in found if d["class"] == cls), key=lambda d: iou(d["box"], pixels))
        # Integer pixels (each edge rounded) and Darknet's bn eps: within 2% IoU on the big boxes. The float boxes
        # are compared at IoU > 0.99 with OpenCV's eps in test_detect_matches_opencv_on_dog.
        if min(box[2] * width, box[3] * height) > 100:
            assert iou(best["box"], pixels) > 0.98
        assert best["confidence"] == pytest.approx(conf, abs=2e-3)  # Darknet's bn eps here vs OpenCV's
    assert {"dog", "bicycle", "car"} <= {d["name"] for d in found}


def test_run_text_is_darknets_ext_output(capsys, fastest):
    cfg, weights = fastest
    code, out, _ = run_cli(capsys, "run", cfg, weights, DOG, "--thresh", "0.5", "-q")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{DOG}: ")
    for line in lines[1:]:
        name, rest = line.split(": ", 1)
        assert name in {"dog", "bicycle", "car", "cat"}
        assert rest.split("%")[0].isdigit() and "left_x:" in rest and "height:" in rest


def test_run_draws_into_out_without_touching_inputs(capsys, fastest, tmp_path):
    cfg, weights = fastest
    source = tmp_path / "in" / "dog.jpg"
    other = tmp_path / "elsewhere" / "dog.jpg"
    for path in (source, other):
        path.parent.mkdir(parents=True)
        shutil.copy(DOG, path)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out_dir = tmp_path / "new" / "nested"
    code, out, err = run_cli(capsys, "run", cfg, weights, source, other, "--out", out_dir, "--json", "-q")
    assert code == 0, err
    records = json.loads(out)["images"]
    assert [Path(r["output"]).name for r in records] == ["dog.jpg", "dog-2.jpg"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["dog-2.jpg", "dog.jpg"]  # no temp files left
    drawn = cv2.imread(str(out_dir / "dog.jpg"))
    original = cv2.imread(str(DOG))
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).max() > 100  # boxes are drawn
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    # --out pointing at the input's own folder would overwrite it: refused, nothing written.
    code, out, err = run_cli(capsys, "run", cfg, weights, source, "--out", source.parent, "-q")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "overwrite" in err and str(source.parent) in err
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before


def test_grey_and_four_channel_images(capsys, fastest, tmp_path):
    cfg, weights = fastest
    image = cv2.imread(str(DOG))
    rgba = tmp_path / "dog-rgba.png"
    grey = tmp_path / "dog-grey.png"
    cv2.imwrite(str(rgba), np.dstack([image, np.full(image.shape[:2], 200, np.uint8)]))
    cv2.imwrite(str(grey), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    code, out, err = run_cli(capsys, "run", cfg, weights, DOG, rgba, grey, "--json", "-q")
    assert code == 0, err
    jpg, with_alpha, grey_result = json.loads(out)["images"]
    assert with_alpha["detections"] == jpg["detections"]  # alpha dropped: the same pixels as the JPEG
    assert grey_result["detections"] and all(len(d["box"]) == 4 for d in grey_result["detections"])


# ------------------------------------------------------------------------------------------------------------
# bad inputs: one line on stderr naming the file, exit code 1, nothing on stdout


def assert_one_line_error(code, out, err, *needles):
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0]


def test_missing_and_non_images(capsys, fastest, tmp_path):
    cfg, weights = fastest
    missing = tmp_path / "nope.jpg"
    assert_one_line_error(*run_cli(capsys, "run", cfg, weights, missing, "--json"), missing)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG\n")
    assert_one_line_error(*run_cli(capsys, "run", cfg, weights, DOG, text, "--json"), text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_one_line_error(*run_cli(capsys, "run", cfg, weights, empty), empty)
    assert_one_line_error(*run_cli(capsys, "run", cfg, weights, tmp_path), tmp_path)


def test_bad_datasets(capsys, fastest, tmp_path):
    cfg, weights = fastest
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("")
    data = tmp_path / "empty.data"
    data.write_text(f"classes=80\nvalid={empty_list}\n")
    assert_one_line_error(*run_cli(capsys, "eval", cfg, weights, "--data", data, "--json"), empty_list)
    nowhere = tmp_path / "nowhere.data"
    nowhere.write_text("classes=80\nvalid=does/not/exist.txt\n")
    assert_one_line_error(*run_cli(capsys, "eval", cfg, weights, "--data", nowhere), nowhere, "exist.txt")
    absent = tmp_path / "absent.data"
    assert_one_line_error(*run_cli(capsys, "eval", cfg, weights, "--data", absent), absent)
    assert_one_line_error(*run_cli(capsys, "eval", cfg, weights, "--data", nowhere, "--limit", "0"), "--limit")


def test_real_entry_point_exit_codes(fastest, tmp_path):
    cfg, weights = fastest
    env = dict(os.environ, DARKPRUNE_QUIET="1")
    missing = tmp_path / "missing.jpg"
    done = subprocess.run([sys.executable, "-m", "darkprune", "run", str(cfg), str(weights), str(missing)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"darkprune run: error: {missing}: no such image file"]
    usage = subprocess.run([sys.executable, "-m", "darkprune", "eval", str(cfg), str(weights)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert usage.returncode == 2 and "--data" in usage.stderr
