"""Rebuild the small real datasets bundled under data/ from ../shared/assets (see data/README.md).

coco128-val: the 128 COCO val2017 images of lightly-ai/coco128_yolo with their Darknet labels. The JPEGs are
downscaled so their longer side is 320 px (the bundled detector's input size) to keep the project small; the labels
are normalised, so they stay valid unchanged.
"""
import shutil
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def make_coco128_val(max_side: int = 320) -> None:
    src = ASSETS / "coco128"
    dst = ROOT / "data" / "coco128-val"
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "labels").mkdir(parents=True, exist_ok=True)
    names = []
    for line in (src / "val2017.txt").read_text().split():
        image = src / line
        img = cv2.imread(str(image), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        scale = max_side / max(h, w)
        if scale < 1:
            img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(dst / "images" / image.name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        label = src / "labels" / "val2017" / (image.stem + ".txt")
        if label.exists():
            shutil.copyfile(label, dst / "labels" / label.name)
        names.append(f"images/{image.name}")
    (dst / "valid.txt").write_text("\n".join(names) + "\n")
    (dst / "coco128-val.data").write_text(
        "classes=80\ntrain=valid.txt\nvalid=valid.txt\nnames=../../cfg/coco.names\nbackup=backup\n")
    print(f"wrote {len(names)} images to {dst}")


if __name__ == "__main__":
    if not ASSETS.exists():
        sys.exit(f"{ASSETS} not found: this script rebuilds data/ from the shared assets")
    make_coco128_val()
