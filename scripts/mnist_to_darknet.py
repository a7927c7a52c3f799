"""Convert the MNIST IDX files into Darknet's classification layout.

    .venv/bin/python scripts/mnist_to_darknet.py [--src ../shared/assets/mnist] [--out ~/.cache/darkprune/mnist]

Reads train-images/labels (60,000) and t10k-images/labels (10,000), gzip-compressed IDX as LeCun publishes them, and
writes into OUT:
    train/00000_c5.png ...    28x28 8-bit grey PNGs; the label name (c0..c9) occurs in the file name, which is how
    test/00000_c7.png ...     Darknet's `classifier train/valid` finds an image's class (first label found in the path)
    train.list, test.list     absolute image paths, one a line, in IDX order
    labels.txt                c0 .. c9   (the same labels as the DarkneTZ mnist_lenet model's mnist.labels.list)
    names.txt                 0 .. 9
    mnist.data                classes=10, train=, valid=, labels=, names=, top=2 (paths relative to OUT)
The IDX headers are checked (magic, counts, 28x28), the first labels are checked against the published ones
(train 5 0 4 1 9 2 1 3 1 4, test 7 2 1 0 4 1 4 9 5 9), and the PNGs are verified by decoding a sample back.
Darknet matches a label anywhere in the path, so OUT itself must not contain c0..c9 (refused otherwise).
Rerunning skips images already written (pass --force to rewrite).
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "assets" / "mnist"
DEFAULT_OUT = Path.home() / ".cache" / "darkprune" / "mnist"
LABELS = [f"c{digit}" for digit in range(10)]
FIRST_LABELS = {"train": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], "test": [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]}
SPLITS = {"train": ("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz", 60000),
          "test": ("t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz", 10000)}


def _open(path: Path) -> bytes:
    if path.exists():
        return gzip.decompress(path.read_bytes())
    plain = path.with_suffix("")  # an uncompressed copy works too
    if plain.exists():
        return plain.read_bytes()
    raise SystemExit(f"error: {path}: no such file")


def read_idx_images(path: Path) -> np.ndarray:
    data = _open(path)
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 0x00000803 or (rows, cols) != (28, 28):
        raise SystemExit(f"error: {path}: not an IDX image file of 28x28 (magic {magic:#x}, {rows}x{cols})")
    if len(data) != 16 + count * rows * cols:
        raise SystemExit(f"error: {path}: {len(data)} bytes for {count} images (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    data = _open(path)
    magic, count = struct.unpack(">II", data[:8])
    if magic != 0x00000801 or len(data) != 8 + count:
        raise SystemExit(f"error: {path}: not an IDX label file (magic {magic:#x}, {len(data)} bytes)")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.max() > 9:
        raise SystemExit(f"error: {path}: a label is {labels.max()}, MNIST has 0..9")
    return labels


def convert(src: Path, out: Path, force: bool = False) -> dict:
    out = out.expanduser().resolve()
    clash = [name for name in LABELS if name in str(out)]
    if clash:
        raise SystemExit(f"error: {out}: the folder path contains the label name(s) {', '.join(clash)}; Darknet "
                         "takes the first label found anywhere in an image path, so pick another folder")
    counts = {}
    for split, (images_file, labels_file, expected) in SPLITS.items():
        images = read_idx_images(src / images_file)
        labels = read_idx_labels(src / labels_file)
        if len(images) != expected or len(labels) != expected:
            raise SystemExit(f"error: {src}: {split} has {len(images)} images and {len(labels)} labels, "
                             f"expected {expected}")
        if labels[:10].tolist() != FIRST_LABELS[split]:
            raise SystemExit(f"error: {src}: the first {split} labels are {labels[:10].tolist()}, "
                             f"expected {FIRST_LABELS[split]}")
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for number, (image, label) in enumerate(zip(images, labels)):
            path = folder / f"{number:05d}_{LABELS[label]}.png"
            if force or not path.exists():
                if not cv2.imwrite(str(path), image):
                    raise SystemExit(f"error: {path}: cannot write")
            paths.append(str(path))
        # Spot-check: decoded PNGs give back the IDX pixels exactly.
        for number in (0, len(images) // 2, len(images) - 1):
            back = cv2.imread(paths[number], cv2.IMREAD_UNCHANGED)
            if back is None or not np.array_equal(back, images[number]):
                raise SystemExit(f"error: {paths[number]}: does not decode to the IDX pixels (rerun with --force)")
        (out / f"{split}.list").write_text("\n".join(paths) + "\n")
        counts[split] = len(paths)
        print(f"{split}: {len(paths)} images, first labels {labels[:10].tolist()} (as published)")
    (out / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (out / "names.txt").write_text("\n".join(str(digit) for digit in range(10)) + "\n")
    (out / "mnist.data").write_text("classes=10\ntrain=train.list\nvalid=test.list\nlabels=labels.txt\n"
                                    "names=names.txt\ntop=2\nbackup=backup\n")
    print(f"wrote {out / 'mnist.data'}")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"folder of the IDX .gz files ({DEFAULT_SRC})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite PNGs that exist already")
    args = parser.parse_args(argv)
    convert(args.src, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
