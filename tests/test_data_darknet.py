"""Darknet dataset files: .data parsing, path resolution, label rules, malformed input."""

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from darkprune.data.darknet_data import (
    DataWarning,
    classification_label,
    label_path_candidates,
    load_data,
    read_data_config,
    read_detection_labels,
    read_names,
)
from darkprune.errors import DarkpruneError

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def write_image(path: Path, w: int = 8, h: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))


def make_detection_set(root: Path, labels: dict[str, str], extra_list: str = "") -> Path:
    """A tiny dataset: root/images/a.jpg ... + root/labels/*.txt + root/valid.txt + root/set.data."""
    root.mkdir(parents=True, exist_ok=True)
    names = root / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    entries = []
    for stem, text in labels.items():
        write_image(root / "images" / f"{stem}.jpg")
        entries.append(f"images/{stem}.jpg")
        if text is not None:
            (root / "labels").mkdir(exist_ok=True)
            (root / "labels" / f"{stem}.txt").write_text(text)
    (root / "valid.txt").write_text("\n".join(entries) + "\n" + extra_list)
    data = root / "set.data"
    data.write_text("# a comment\n classes = 3 \n\ntrain  = valid.txt\nvalid=valid.txt   # trailing note\n"
                    "names = names.txt\n; another comment\nbackup = backup/\n")
    return data


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


# ----------------------------------------------------------------------------------------------------------------
# .data, .names


def test_read_data_config_comments_spaces_duplicates(tmp_path):
    data = tmp_path / "x.data"
    data.write_bytes(b"\xef\xbb\xbf# header\r\nclasses= 20\r\n  train =  a b/train.txt \r\n;x\r\n"
                     b"valid=v.txt # comment\r\nvalid=other.txt\r\nnonsense line\r\neval=coco\r\n")
    with pytest.warns(DataWarning) as record:
        options = read_data_config(data)
    assert options == {"classes": "20", "train": "a b/train.txt", "valid": "v.txt", "eval": "coco"}
    text = messages(record)
    assert any(f"{data}:6: duplicate key 'valid'" in m for m in text)
    assert any(f"{data}:7: not a key=value line" in m for m in text)


def test_read_names_keeps_order_and_drops_trailing_blank_lines(tmp_path):
    path = tmp_path / "n.names"
    path.write_text("person\r\nbicycle\ncar\n\n\n")
    assert read_names(path) == ["person", "bicycle", "car"]
    empty = tmp_path / "e.names"
    empty.write_text("\n")
    with pytest.raises(DarkpruneError, match="e.names: no names"):
        read_names(empty)


# ----------------------------------------------------------------------------------------------------------------
# detection datasets


def test_load_detection_set_from_another_directory(tmp_path, monkeypatch):
    root = tmp_path / "set"
    data = make_detection_set(root, {"a": "0 0.5 0.5 0.2 0.3\n2 0.1 0.2 0.1 0.1\n", "b": "1 0.5 0.5 1 1\n"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths resolve via the .data folder, then the list's folder
    ds = load_data(data)
    assert ds.kind == "detection" and ds.classes == 3 and ds.names == ["cat", "dog", "bird"]
    assert len(ds) == 2 and ds.num_boxes == 3
    assert ds.image_paths[0] == os.path.abspath(root / "images" / "a.jpg")
    assert ds.label_paths[1] == os.path.abspath(root / "labels" / "b.txt")
    np.testing.assert_allclose(ds.boxes[0], [[0, 0.5, 0.5, 0.2, 0.3], [2, 0.1, 0.2, 0.1, 0.1]], rtol=1e-6)
    assert ds.boxes[0].dtype == np.float32
    assert load_data(data, limit=1).image_paths == ds.image_paths[:1]


def test_paths_relative_to_current_directory_win(tmp_path, monkeypatch):
    root = tmp_path / "set"
    data = make_detection_set(root, {"a": "0 0.5 0.5 0.2 0.3\n"})
    monkeypatch.chdir(root)
    ds = load_data("set.data")
    assert ds.image_paths == [os.path.abspath(root / "images" / "a.jpg")]


def test_symlinked_image_folder_keeps_labels_beside_the_link(tmp_path):
    root = tmp_path / "set"
    data = make_detection_set(root, {"a": "1 0.5 0.5 0.2 0.2\n"})
    (root / "images").rename(tmp_path / "elsewhere")
    (root / "images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    ds = load_data(data)
    assert ds.image_paths == [os.path.abspath(root / "images" / "a.jpg")]
    assert ds.missing_labels == 0 and ds.boxes[0][0, 0] == 1


def test_malformed_label_rows_are_warned_with_file_and_line_and_skipped(tmp_path):
    rows = ("0 0.5 0.5 0.2 0.2\n"      # 1 good
            "3 0.5 0.5 0.2 0.2\n"      # 2 class out of range (classes=3)
            "1 nan 0.5 0.2 0.2\n"      # 3 NaN
            "1 1.5 0.5 0.2 0.2\n"      # 4 centre outside the image
            "1 0.5 0.5 0.2\n"          # 5 four columns
            "\n"                       # 6 blank: ignored
            "-1 0.5 0.5 0.2 0.2\n"     # 7 negative class
            "1.5 0.5 0.5 0.2 0.2\n"    # 8 fractional class
            "2 0.5 0.5 0 0.2\n"        # 9 zero width
            "x 0.5 0.5 0.2 0.2\n"      # 10 not a number
            "2 0.25 0.75 1 0.5\n")     # 11 good
    root = tmp_path / "set"
    data = make_detection_set(root, {"a": rows})
    label = os.path.abspath(root / "labels" / "a.txt")
    with pytest.warns(DataWarning) as record:
        ds = load_data(data)
    text = messages(record)
    for line, what in [(2, "class 3 out of range"), (3, "non-finite"), (4, "outside the image"), (5, "5 columns"),
                       (7, "class -1 out of range"), (8, "class 1.5 out of range"), (9, "not in (0, 1]"),
                       (10, "not a number")]:
        assert any(m.startswith(f"{label}:{line}: ") and what in m for m in text), (line, text)
    assert not any(f"{label}:1:" in m or f"{label}:6:" in m or f"{label}:11:" in m for m in text)
    assert ds.bad_rows == 8
    np.testing.assert_allclose(ds.boxes[0], [[0, 0.5, 0.5, 0.2, 0.2], [2, 0.25, 0.75, 1, 0.5]])


def test_missing_label_files_are_images_without_objects(tmp_path):
    root = tmp_path / "set"
    data = make_detection_set(root, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None, "c": None})
    with pytest.warns(DataWarning, match=r"2 of 3 images have no label file"):
        ds = load_data(data)
    assert ds.missing_labels == 2
    assert [len(b) for b in ds.boxes] == [1, 0, 0]
    assert ds.label_paths[1] is None


def test_missing_images_are_warned_and_skipped(tmp_path):
    root = tmp_path / "set"
    data = make_detection_set(root, {"a": "0 0.5 0.5 0.2 0.2\n"}, extra_list="images/gone.jpg\n")
    with pytest.warns(DataWarning) as record:
        ds = load_data(data)
    assert len(ds) == 1
    assert any(m.startswith(f"{(root / 'valid.txt')}:2: image not found: images/gone.jpg") for m in messages(record))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DarkpruneError, match="nowhere.data: no such file"):
        load_data(tmp_path / "nowhere.data")
    data = tmp_path / "x.data"
    data.write_text("classes=1\nvalid=missing_list.txt\n")
    with pytest.raises(DarkpruneError, match=r"x.data: valid=missing_list.txt: no such file"):
        load_data(data)
    (tmp_path / "empty.txt").write_text("\n\n")
    data.write_text("classes=1\nvalid=empty.txt\n")
    with pytest.raises(DarkpruneError, match=r"empty.txt: the image list is empty"):
        load_data(data)
    (tmp_path / "ghosts.txt").write_text("a.jpg\nb.jpg\n")
    data.write_text("classes=1\nvalid=ghosts.txt\n")
    with pytest.raises(DarkpruneError, match=r"ghosts.txt: none of the 2 listed images exists"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_data(data)
    data.write_text("classes=1\nvalid=ghosts.txt\nnames=nonames.txt\n")
    with pytest.raises(DarkpruneError, match=r"names=nonames.txt: no such file"):
        load_data(data)


def test_label_path_rule():
    assert label_path_candidates("/d/coco/images/val2017/x.jpg")[0] == "/d/coco/labels/val2017/x.txt"
    assert label_path_candidates("/d/VOC2007/JPEGImages/000001.JPEG")[0] == "/d/VOC2007/labels/000001.txt"
    assert label_path_candidates("/d/images/x/images/y.png")[:2] == ["/d/labels/x/images/y.txt",
                                                                    "/d/images/x/labels/y.txt"]
    assert label_path_candidates("/d/obj/img.bmp") == ["/d/obj/img.txt"]  # AlexeyAB's layout: beside the image
    assert label_path_candidates(r"C:\d\images\a.jpg")[0] == "C:/d/labels/a.txt"


def test_read_detection_labels_without_class_count(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("75 0.5 0.5 0.1 0.1\r\n")
    rows, bad = read_detection_labels(path, None)
    assert bad == 0 and rows.shape == (1, 5) and rows[0, 0] == 75


# ----------------------------------------------------------------------------------------------------------------
# classification


def test_classification_label_rule():
    mnist = [f"c{i}" for i in range(10)]
    assert classification_label("data/mnist/images/v_00012_c3.png", mnist)[0] == 3
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert classification_label("/work/cifar10/test/0_cat.png", cifar)[0] == 3
    index, matches = classification_label("/home/dog/pics/12_cat.png", cifar)
    assert index == 3 and matches == [3, 5]  # the file name decides between the two
    assert classification_label("/x/unknown.png", cifar) == (-1, [])


def test_load_classification_set(tmp_path):
    tmp_path = tmp_path / "c9_set"  # a label name in the folder: Darknet matches the list entry, not our full path
    tmp_path.mkdir()
    labels = [f"c{i}" for i in range(10)]
    (tmp_path / "labels.list").write_text("\n".join(labels) + "\n")
    entries = []
    for i, digit in enumerate([7, 2, 1, 0]):
        name = f"img/t_{i:05d}_c{digit}.png"
        write_image(tmp_path / name)
        entries.append(name)
    write_image(tmp_path / "img" / "nolabel.png")
    entries.append("img/nolabel.png")
    (tmp_path / "test.list").write_text("\n".join(entries))
    data = tmp_path / "mnist.data"
    data.write_text("classes=10\ntrain=test.list\nvalid=test.list\nlabels=labels.list\ntop=2\n")
    with pytest.warns(DataWarning, match="no label"):
        ds = load_data(data)
    assert ds.kind == "classification" and ds.top == 2
    assert ds.names == labels  # names fall back to the labels file
    assert ds.labels.tolist() == [7, 2, 1, 0, -1]


def test_cifar10_asset_labels():
    folder = ASSETS / "cifar10"
    if not folder.exists():
        pytest.skip("assets not present")
    labels = read_names(folder / "labels.txt")
    for path in sorted((folder / "test").glob("*.png"))[:20]:
        expected = path.stem.split("_", 1)[1]
        assert labels[classification_label(str(path), labels)[0]] == expected


# ----------------------------------------------------------------------------------------------------------------
# the real coco128 set


def test_coco128_loads_from_any_directory(tmp_path, monkeypatch):
    data = ASSETS / "coco128" / "coco128.data"
    if not data.exists():
        pytest.skip("assets not present")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = load_data(data)
    assert len(ds) == 128 and ds.num_boxes == 898
    assert ds.classes == 80 and len(ds.names) == 80 and ds.names[0] == "person"
    assert ds.missing_labels == 0 and ds.bad_rows == 0
    assert all(os.path.isfile(p) for p in ds.image_paths)
    assert all("/labels/val2017/" in p for p in ds.label_paths)
    first = ds.boxes[0]
    assert first.shape[1] == 5 and first[0, 0] == 58  # 000000000139.txt starts with a potted plant
    train = load_data(data, split="train", limit=5)
    assert len(train) == 5 and "train2017" in train.image_paths[0]
