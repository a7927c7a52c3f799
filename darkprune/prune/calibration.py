"""Calibration images for reconstruction (reconstruct.py) and for `ana --reconstruct`: network inputs that need no
labels, taken from a .data file's `train=` list (never its `valid=` list: the model is measured on those), or given
as paths, a Dataset or an (N, C, H, W) array. When the list holds fewer images than asked for, horizontally mirrored
copies fill up (then the cycle repeats), as Darknet's own augmentation would show the network.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..darknet.model import Model
from ..errors import DarkpruneError, SettingError

DEFAULT_CALIB_IMAGES = 256


def check_count(count, key: str = "calib_images") -> int:
    """A number of calibration images: a whole number >= 1 (a bool, a fraction or text is refused)."""
    try:
        if isinstance(count, bool):
            raise ValueError
        value = int(str(count).strip())
    except (TypeError, ValueError):
        raise SettingError(key, f"{key} {count}: expected a whole number of calibration images") from None
    if value < 1:
        raise SettingError(key, f"{key} {count}: the number of calibration images must be at least 1")
    return value


def train_list(data) -> list[str]:
    """The image paths of a .data file's train= list (reconstruction never calibrates on the valid= list)."""
    from ..data import read_data_config
    from ..data.darknet_data import read_image_list, resolve_path
    path = Path(data)
    if not path.is_file():
        raise DarkpruneError(f"{path}: no such .data file (calibration images come from its train= list)")
    options = read_data_config(path)
    if "train" not in options:
        raise DarkpruneError(f"{path}: no train= list to take calibration images from (the valid= list is never "
                             f"used for them: the model is measured on it)")
    listed = resolve_path(options["train"], [Path(os.path.abspath(path)).parent])
    if listed is None:
        raise DarkpruneError(f"{path}: train={options['train']}: no such file")
    return read_image_list(listed, [Path(os.path.abspath(path)).parent])[0]


def calibration_inputs(model: Model, images, count: int | None = None) -> np.ndarray:
    """(N, C, H, W) float32 network inputs for `model`: `images` is an array of inputs, a list of image paths, a
    Dataset (its images), or a .data path (its train= list). `count` (default: all given, a .data file 256) images
    are returned, mirrored copies filling up a shorter list."""
    c, h, w = model.input_shape
    if isinstance(images, np.ndarray):
        x = np.asarray(images, np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise DarkpruneError(f"calibration inputs have shape {tuple(x.shape)}, the network takes (N, {c}, {h}, "
                                 f"{w})")
        return _fill(np.ascontiguousarray(x), count)
    if isinstance(images, (str, os.PathLike)):
        paths = train_list(images)
        count = DEFAULT_CALIB_IMAGES if count is None else count
    elif hasattr(images, "image_paths"):
        paths = list(images.image_paths)
    else:
        paths = [str(p) for p in images]
    if not paths:
        raise DarkpruneError("no calibration images given")
    count = check_count(count if count is not None else len(paths))
    from ..data import preprocess_batch
    letter = bool(model.graph.net.get("letter_box", 0))
    x, _ = preprocess_batch(paths[:count], w, h, "letterbox" if letter else "darknet", c)
    return _fill(x, count)


def _fill(x: np.ndarray, count: int | None) -> np.ndarray:
    """The first `count` of x, then its mirrored copies, then the cycle again."""
    if count is None or count == len(x):
        return x
    count = check_count(count)
    if count < len(x):
        return x[:count]
    cycle = np.concatenate([x, x[..., ::-1]])
    reps = -(-count // len(cycle))
    return np.ascontiguousarray(np.concatenate([cycle] * reps)[:count])


__all__ = ["DEFAULT_CALIB_IMAGES", "calibration_inputs", "train_list", "check_count"]
