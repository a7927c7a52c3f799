"""scripts/recover_lenet.py --quick end to end on real MNIST: the pruned pair it writes keeps at most 30% of LeNet's
parameters (counted from the weights file's size and, independently, by OpenCV's importer loading it), and OpenCV's
Darknet importer predicts the same classes as darkprune's engine on the test digits it measured."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import ASSETS, ROOT

cv2 = pytest.importorskip("cv2")

LENET_PARAMS = 431080          # cfg/lenet.cfg: 520 + 25,050 + 400,500 + 5,010
WEIGHTS_HEADER = 20            # major 0, minor 2, revision, int64 seen


def _script():
    spec = importlib.util.spec_from_file_location("recover_lenet", ROOT / "scripts" / "recover_lenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    """A small MNIST in Darknet's layout, written from the real IDX files by scripts/mnist_to_darknet.py's readers:
    the first 2,000 training and 500 test digits (the quick run trains and measures on no more)."""
    src = ASSETS / "mnist"
    if not (src / "t10k-images.idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not present ({src}; see ../shared/assets/MANIFEST.md)")
    spec = importlib.util.spec_from_file_location("mnist_to_darknet", ROOT / "scripts" / "mnist_to_darknet.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    out = tmp_path_factory.mktemp("mnist") / "digits"
    for split, count in (("train", 2000), ("test", 500)):
        images_file, labels_file, _ = convert.SPLITS[split]
        images = convert.read_idx_images(src / images_file)[:count]
        labels = convert.read_idx_labels(src / labels_file)[:count]
        (out / split).mkdir(parents=True)
        paths = [out / split / f"{i:05d}_c{label}.png" for i, label in enumerate(labels)]
        for path, image in zip(paths, images):
            cv2.imwrite(str(path), image)
        (out / f"{split}.list").write_text("".join(f"{p}\n" for p in paths))
    (out / "labels.txt").write_text("".join(f"c{d}\n" for d in range(10)))
    (out / "mnist.data").write_text("classes=10\ntrain=train.list\nvalid=test.list\nlabels=labels.txt\n")
    return out / "mnist.data"


@pytest.fixture(scope="module")
def quick_run(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("recover")
    assert _script().main(["--quick", "--data", str(mnist), "--out-dir", str(out)]) == 0
    return out, json.loads((out / "recover_lenet_quick.json").read_text())


def test_quick_run_writes_a_pair_opencv_loads_with_at_most_30_percent_of_the_parameters(quick_run):
    out, report = quick_run
    cfg, weights = Path(report["final"]["cfg"]), Path(report["final"]["weights"])
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    floats = (weights.stat().st_size - WEIGHTS_HEADER) // 4
    assert floats == report["final"]["params"] <= 0.3 * LENET_PARAMS
    # the cfg's own channel counts (read as text, not by our parser) give the same count by LeNet's closed form
    text = cfg.read_text()
    c1, c2 = (int(v) for v in re.findall(r"^filters=(\d+)", text, re.M))
    n, classes = (int(v) for v in re.findall(r"^output=(\d+)", text, re.M))
    assert classes == 10 and floats == c1 * 26 + c2 * (25 * c1 + 1) + n * (16 * c2 + 1) + 10 * n + 10
    assert net.getLayerNames()
    table = (out / "recover_lenet_quick.md").read_text()
    assert "transformed pair" in table and "OpenCV" in table
    assert report["test_images"] == 500 and report["rounds"][-1]["iterations"] == 40


def test_opencv_predicts_what_our_engine_predicts_on_test_digits(quick_run, mnist):
    out, report = quick_run
    final = report["final"]
    assert final["same_prediction"] >= 0.998
    assert final["top1_opencv"] == pytest.approx(final["top1_ours"], abs=0.002)
    # independently of the script: OpenCV on 200 test PNGs against the labels in their names and our own engine
    import darkprune as dp
    lines = [line for line in (Path(mnist).parent / "test.list").read_text().splitlines() if line][:200]
    images = np.stack([cv2.imread(p, cv2.IMREAD_GRAYSCALE)[None] / np.float32(255) for p in lines])
    labels = np.array([int(re.search(r"_c(\d)\.png$", p).group(1)) for p in lines])
    net = cv2.dnn.readNetFromDarknet(final["cfg"], final["weights"])
    net.setInput(images.astype(np.float32))
    theirs = np.asarray(net.forward()).reshape(len(lines), -1).argmax(1)
    model = dp.load(final["cfg"], final["weights"])
    ours = dp.engine.network.Network(model).forward(images.astype(np.float32))[len(model.graph) - 1]
    assert np.array_equal(ours.reshape(len(lines), -1).argmax(1), theirs)
    assert (theirs == labels).mean() > 0.9
