"""`run`: a model on images. Detectors give each image's detections as Darknet's `detector test -ext_output` does
(name, confidence, left/top/width/height in original pixels) and can draw them into an output folder; classifiers give
their top-5 classes. Class names come from a names file, else one beside the cfg with the right count.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import DarkpruneError

# Where `run` looks for class names beside the cfg when --names is not given (first with the right count wins).
NAME_FILES = ("{stem}.names", "coco.names", "labels.txt", "names.txt", "*.names", "*.names.list", "*.names.txt")


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
    from ..data import read_names
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
            raise DarkpruneError(f"{candidate}: drawing there would overwrite the input image; choose another "
                                 f"output folder")
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


def _output_folder(images: list[str], out) -> list[Path] | None:
    if not out:
        return None
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DarkpruneError(f"{out_dir}: the output for drawn images must be a folder")
    return _output_paths(images, out_dir)


def run_images(cfg, weights, images: list[str], names_path=None, thresh: float = 0.25, nms: float = 0.45,
               out=None, letterbox: bool | None = None, resize: str = "darknet", batch: int = 8, log=None):
    """Yields (record, lines) per image in order: the JSON record and the text lines `run` prints for it."""
    from ..darknet import load
    from ..detect import detection_heads
    from ..engine.network import Network
    images = [str(p) for p in images]
    _check_images(images)
    out_paths = _output_folder(images, out)
    model = load(cfg, weights)
    network = Network(model)
    heads = detection_heads(model.graph)
    if heads:
        yield from _detect_images(network, cfg, heads[-1][1].classes, images, names_path, thresh, nms, out,
                                  out_paths, letterbox, resize, batch)
        return
    if out_paths is not None and log is not None:
        log("note: drawing is ignored for classifiers (nothing to draw)")
    yield from _classify_images(network, model, cfg, images, names_path, resize, batch)


def _detect_images(network, cfg, classes, images, names_path, thresh, nms, out, out_paths, letterbox, resize,
                   batch):
    from ..data import load_image
    from ..detect import iter_detections
    from ..engine.decode import detections_to_json
    names = find_names(cfg, classes, names_path)
    if out_paths is not None:
        try:
            out_paths[0].parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DarkpruneError(f"{out}: cannot create the folder: {exc.strerror or exc}") from None
    results = iter_detections(network, images, thresh=thresh, nms=nms, letterbox=letterbox, mode=resize,
                              batch=batch)
    for index, dets, (width, height) in results:
        found = detections_to_json(dets, width, height, thresh, names)
        record = {"path": images[index], "width": int(width), "height": int(height), "detections": found}
        if out_paths is not None:
            drawn = draw_detections(load_image(images[index]), found, classes)
            record["output"] = str(write_image(out_paths[index], drawn))
        lines = [f"{images[index]}: {len(found)} detection{'s' if len(found) != 1 else ''}"]
        yield record, lines + _detection_lines(found)


def _classify_images(network, model, cfg, images, names_path, resize, batch):
    from ..detect import iter_classifications
    output = model.graph.output_layers()[-1]
    names = find_names(cfg, model.graph[output].outputs, names_path)
    for index, top, _ in iter_classifications(network, images, top=5, mode=resize, batch=batch):
        ranked = [{"class": cls, "name": _name(names, cls), "score": score} for cls, score in top]
        yield {"path": images[index], "top5": ranked}, \
            [f"{images[index]}:"] + [f"{item['name']}: {item['score']:.6f}" for item in ranked]
