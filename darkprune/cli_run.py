"""The `run` and `eval` sub-commands (registered into `darkprune.cli` through `_EXTRA_PARSERS` and `command`).

`darkprune run CFG WEIGHTS IMAGE...`: detectors print each image's detections as Darknet's `detector test
-ext_output` does (name, confidence %, left/top/width/height in original pixels) and, with `--out`, draw them into
`--out/<image name>`; classifiers print the top-5 classes. `darkprune eval CFG WEIGHTS --data F.data`: mAP as
`darknet detector map` prints it, or top-1/top-k as `darknet classifier valid`.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .cli import _EXTRA_PARSERS, _common, command, emit, log
from .errors import DarkpruneError

# Where `run` looks for class names beside the cfg when --names is not given (first with the right count wins).
NAME_FILES = ("{stem}.names", "coco.names", "labels.txt", "names.txt", "*.names", "*.names.list", "*.names.txt")


# --------------------------------------------------------------------------------------------------------------
# parsers


def _add_parsers(sub) -> None:
    p = sub.add_parser(
        "run", help="detect objects (boxes drawn with OpenCV) or classify images (top-5)",
        description="Run a Darknet model on images. Detectors print each detection as Darknet's `detector test "
                    "-ext_output` does (class, confidence, left/top/width/height in pixels of the original image) "
                    "and, with --out, draw the boxes into OUT/<image name>; classifiers print their top-5 classes.")
    p.add_argument("cfg", help="Darknet .cfg file")
    p.add_argument("weights", help="Darknet .weights file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, BMP, ...; grey and RGBA work)")
    p.add_argument("--names", metavar="FILE",
                   help="class names, one a line (default: a .names/labels.txt file beside the cfg with as many "
                        "names as the model has classes, else class numbers)")
    p.add_argument("--thresh", type=float, default=0.25, help="report detections above this confidence (0.25)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (0.45; 0 = no NMS)")
    p.add_argument("--out", metavar="DIR", help="draw the detections into DIR/<image name> (created if missing)")
    p.add_argument("--letterbox", action="store_true", help="letterbox the input (default: the cfg's letter_box)")
    p.add_argument("--resize", choices=("darknet", "opencv"), default="darknet",
                   help="Darknet's own bilinear resize (default) or OpenCV's cv2.resize")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass (8)")
    _common(p)

    p = sub.add_parser(
        "eval", help="accuracy on a Darknet dataset: mAP@0.5, mAP@0.5:0.95, per class; or top-1/top-k",
        description="Detectors: `darknet detector map` (detections at 0.005, NMS 0.45 of the cfg's nms_kind, "
                    "per-class AP with TP/FP, precision/recall/F1 and TP/FP/FN/average IoU at --thresh, mAP at "
                    "--iou-thresh, plus mAP@0.5:0.95). Classifiers: top-1 and top-k (k = `top` in the .data "
                    "file) as `darknet classifier valid`.")
    p.add_argument("cfg", help="Darknet .cfg file")
    p.add_argument("weights", help="Darknet .weights file")
    p.add_argument("--data", required=True, metavar="F.data", help="Darknet .data file (its `valid` list is used)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the list")
    p.add_argument("--thresh", type=float, default=0.25,
                   help="confidence for precision/recall/F1/TP/FP/average IoU (0.25; mAP does not depend on it)")
    p.add_argument("--iou-thresh", type=float, default=0.5, help="IoU a detection needs to match a truth (0.5)")
    p.add_argument("--points", type=int, choices=(0, 11, 101), default=0,
                   help="AP interpolation: 0 = area under the curve at every recall (default), 11 = VOC2007, "
                        "101 = COCO")
    p.add_argument("--letterbox", action="store_true", help="letterbox the inputs (default: the cfg's letter_box)")
    p.add_argument("--resize", choices=("darknet", "opencv"), default="darknet",
                   help="Darknet's own bilinear resize (default) or OpenCV's cv2.resize")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (16)")
    p.add_argument("--no-cache", action="store_true",
                   help="preprocess on the fly instead of through the preprocessed-input cache")
    _common(p)


_EXTRA_PARSERS.append(_add_parsers)


# --------------------------------------------------------------------------------------------------------------
# helpers


def _check_positive(value: int, flag: str) -> None:
    if value is not None and value <= 0:
        raise DarkpruneError(f"{flag} must be a positive number, not {value}")


def _count_names(path: Path) -> int:
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError:
        return -1
    while lines and not lines[-1].strip():
        lines.pop()
    return len(lines)


def find_names(cfg_path: str, classes: int, names_path: str | None = None) -> list[str] | None:
    """Class names from ``names_path``, else from a names file beside the cfg holding exactly ``classes`` names."""
    from .data import read_names
    if names_path is not None:
        names = read_names(names_path)
        if len(names) != classes:
            warnings.warn(f"{names_path}: {len(names)} names for a model with {classes} classes")
        return names
    folder = Path(cfg_path).resolve().parent
    stem = Path(cfg_path).stem
    seen: set[Path] = set()
    for pattern in NAME_FILES:
        pattern = pattern.format(stem=stem)
        for candidate in sorted(folder.glob(pattern)):
            if candidate in seen or not candidate.is_file():
                continue
            seen.add(candidate)
            if _count_names(candidate) == classes:
                return read_names(candidate)
    return None


def _name(names: list[str] | None, cls: int) -> str:
    return names[cls] if names is not None and cls < len(names) else str(cls)


def _check_images(paths: list[str]) -> None:
    """Missing files and folders are named before the model is even loaded."""
    for path in paths:
        if not os.path.exists(path):
            raise DarkpruneError(f"{path}: no such image file")
        if os.path.isdir(path):
            raise DarkpruneError(f"{path}: is a folder, not an image")


def _output_paths(images: list[str], out_dir: Path) -> list[Path]:
    """``out_dir/<image name>`` per image; repeated names get ``-2``, ``-3``...; never an input image's path."""
    inputs = {os.path.realpath(p) for p in images}
    taken: set[str] = set()
    result = []
    for image in images:
        name = Path(image).name
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate = out_dir / name
        n = 1
        while str(candidate) in taken:
            n += 1
            candidate = out_dir / f"{stem}-{n}{suffix}"
        if os.path.realpath(candidate) in inputs:
            raise DarkpruneError(f"{candidate}: --out would overwrite the input image; choose another folder")
        taken.add(str(candidate))
        result.append(candidate)
    return result


def _class_colour(cls: int, classes: int) -> tuple[int, int, int]:
    """Darknet's get_color palette (draw_detections), as a BGR tuple for OpenCV."""
    palette = ((1, 0, 1), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0))
    offset = (cls * 123457) % max(classes, 1)
    rgb = []
    for channel in (2, 1, 0):
        ratio = offset / max(classes, 1) * 5
        i, j = int(np.floor(ratio)), int(np.ceil(ratio))
        ratio -= i
        value = (1 - ratio) * palette[i][channel] + ratio * palette[j][channel]
        rgb.append(int(round(value * 255)))
    r, g, b = rgb
    return b, g, r


def draw_detections(image: np.ndarray, detections: list[dict], classes: int) -> np.ndarray:
    """The image (BGR uint8) with each detection's box and a ``name conf%`` label drawn on it."""
    import cv2
    canvas = np.ascontiguousarray(image.copy())
    height, width = canvas.shape[:2]
    thickness = max(1, int(round(min(height, width) * 0.004)))
    scale = max(0.4, min(height, width) / 800)
    for det in detections:
        left, top, w, h = det["box"]
        colour = _class_colour(det["class"], classes)
        cv2.rectangle(canvas, (int(left), int(top)), (int(left + w), int(top + h)), colour, thickness)
        label = f"{det['name']} {det['confidence'] * 100:.0f}%"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x = int(min(max(left, 0), max(width - tw, 0)))
        y = int(top - th - base - thickness) if top - th - base - thickness >= 0 else int(max(top, 0))
        cv2.rectangle(canvas, (x, y), (x + tw, y + th + base), colour, cv2.FILLED)
        cv2.putText(canvas, label, (x, y + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def write_image(path: Path, image: np.ndarray) -> Path:
    """Encode ``image`` by the extension of ``path`` (PNG when OpenCV cannot write that one) and write it
    atomically: a temporary file in the same folder, then ``os.replace``."""
    import cv2
    ok, buffer = False, None
    if path.suffix:
        try:
            ok, buffer = cv2.imencode(path.suffix, image)
        except cv2.error:
            ok = False
    if not ok:
        path = path.with_name(path.name + ".png")
        ok, buffer = cv2.imencode(".png", image)
        if not ok:
            raise DarkpruneError(f"{path}: OpenCV cannot encode the image")
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.tobytes())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; a written image gets the usual permissions
        os.replace(temp, path)
    except OSError as exc:
        raise DarkpruneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _detection_lines(dets: list[dict]) -> list[str]:
    lines = []
    for det in dets:
        left, top, w, h = det["box"]
        lines.append(f"{det['name']}: {det['confidence'] * 100:.0f}%\t(left_x: {left:4d}   top_y: {top:4d}   "
                     f"width: {w:4d}   height: {h:4d})")
    return lines


# --------------------------------------------------------------------------------------------------------------
# run


@command("run")
def cmd_run(args) -> int:
    from .darknet import load
    from .detect import detection_heads, iter_classifications, iter_detections
    from .engine.decode import detections_to_json
    from .engine.network import Network

    _check_positive(args.batch, "--batch")
    if not 0 <= args.thresh <= 1:
        raise DarkpruneError(f"--thresh must be between 0 and 1, not {args.thresh}")
    images = [str(p) for p in args.images]
    _check_images(images)
    out_paths = None
    if args.out:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise DarkpruneError(f"{out_dir}: --out must be a folder")
        out_paths = _output_paths(images, out_dir)

    model = load(args.cfg, args.weights)
    network = Network(model)
    heads = detection_heads(model.graph)
    letterbox = True if args.letterbox else None
    records: list[dict] = []
    started = time.perf_counter()

    def show(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    if heads:
        classes = heads[-1][1].classes
        names = find_names(args.cfg, classes, args.names)
        if out_paths is not None:
            try:
                out_paths[0].parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DarkpruneError(f"{args.out}: cannot create the folder: {exc.strerror or exc}") from None
        results = iter_detections(network, images, thresh=args.thresh, nms=args.nms, letterbox=letterbox,
                                  mode=args.resize, batch=args.batch)
        for index, dets, (width, height) in results:
            found = detections_to_json(dets, width, height, args.thresh, names)
            record = {"path": images[index], "width": int(width), "height": int(height), "detections": found}
            if out_paths is not None:
                from .data import load_image
                drawn = draw_detections(load_image(images[index]), found, classes)
                record["output"] = str(write_image(out_paths[index], drawn))
            records.append(record)
            show(f"{images[index]}: {len(found)} detection{'s' if len(found) != 1 else ''}")
            for line in _detection_lines(found):
                show(line)
    else:
        output = model.graph.output_layers()[-1]
        classes = model.graph[output].outputs
        names = find_names(args.cfg, classes, args.names)
        if out_paths is not None:
            log(args, "note: --out is ignored for classifiers (nothing to draw)")
        for index, top, _ in iter_classifications(network, images, top=5, mode=args.resize, batch=args.batch):
            ranked = [{"class": cls, "name": _name(names, cls), "score": score} for cls, score in top]
            records.append({"path": images[index], "top5": ranked})
            show(f"{images[index]}:")
            for item in ranked:
                show(f"{item['name']}: {item['score']:.6f}")
    log(args, f"{len(images)} image{'s' if len(images) != 1 else ''} in {time.perf_counter() - started:.2f} s")
    if args.json:
        emit(args, {"images": records}, "")
    return 0


# --------------------------------------------------------------------------------------------------------------
# eval


@command("eval")
def cmd_eval(args) -> int:
    from .darknet import load
    from .evaluate import evaluate, load_dataset
    from .metrics import format_report

    _check_positive(args.batch, "--batch")
    _check_positive(args.limit, "--limit")
    if not 0 <= args.thresh <= 1:
        raise DarkpruneError(f"--thresh must be between 0 and 1, not {args.thresh}")
    if not 0 < args.iou_thresh <= 1:
        raise DarkpruneError(f"--iou-thresh must be in (0, 1], not {args.iou_thresh}")
    dataset = load_dataset(args.data, args.limit)  # a bad .data fails before the model is read
    model = load(args.cfg, args.weights)
    started = time.perf_counter()
    metrics = evaluate(model, dataset, batch=args.batch, thresh=args.thresh, iou_thresh=args.iou_thresh,
                       points=args.points, letterbox=True if args.letterbox else None, mode=args.resize,
                       cache=not args.no_cache, progress=not args.quiet)
    seconds = time.perf_counter() - started
    metrics["seconds"] = round(seconds, 3)
    text = format_report(metrics) + f" Total evaluation time: {seconds:.1f} seconds ({len(dataset)} images)\n"
    emit(args, metrics, text)
    return 0
