"""Image loading and network-input preprocessing, the Darknet way (or OpenCV's, for comparisons).

Public API
----------
``load_image(path, channels=3) -> np.ndarray``
    uint8 image, (H, W, 3) in BGR order (OpenCV's), or (H, W) for ``channels=1``. Grey, grey+alpha, BGRA and 16-bit
    files work: like Darknet's stb_image loader, alpha is dropped, grey is replicated, 16-bit is cut to 8 bits, EXIF
    orientation is ignored, and ``channels=1`` uses stb's luma ``(77 R + 150 G + 29 B) >> 8``.
    A missing, unreadable or non-image file raises DarkpruneError("PATH: what").
``image_to_chw(image) -> np.ndarray``            uint8 BGR (H, W, 3) or grey (H, W) -> float32 (C, H, W), RGB, /255.
``darknet_resize(chw, width, height)``          Darknet's ``resize_image`` (two bilinear passes, its own weights).
``letterbox(chw, width, height)``               Darknet's ``letterbox_image``: keep aspect, centre, fill 0.5.
``preprocess_image(image_or_path, width, height, mode="darknet", channels=3) -> (chw, (orig_w, orig_h))``
``preprocess_batch(paths, width, height, mode="darknet", channels=3, threads=None, out=None)
    -> (array (N, C, height, width) float32, sizes (N, 2) int32 of original (w, h))``

``mode``: "darknet" (default: Darknet's ``resize_image`` of the float image), "letterbox" (Darknet's
``letterbox_image``; decode with ``letterbox=True``), "opencv" (``cv2.resize`` INTER_LINEAR of the uint8 image, then
scaling, as ``cv2.dnn.blobFromImage(img, 1/255, (w, h), swapRB=True)`` does).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np
from numba import njit

from darkprune.errors import DarkpruneError
from darkprune.util.textio import read_input_bytes

__all__ = [
    "RESIZE_MODES",
    "load_image",
    "image_to_chw",
    "darknet_resize",
    "letterbox",
    "letterbox_geometry",
    "preprocess_image",
    "preprocess_batch",
]

RESIZE_MODES = ("darknet", "letterbox", "opencv")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _stb_luma(bgr: np.ndarray) -> np.ndarray:
    """stb_image's RGB -> grey conversion (what Darknet gets when it loads an image with channels=1)."""
    b = bgr[..., 0].astype(np.uint32)
    g = bgr[..., 1].astype(np.uint32)
    r = bgr[..., 2].astype(np.uint32)
    return ((r * 77 + g * 150 + b * 29) >> 8).astype(np.uint8)


def load_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Decode an image file to uint8: (H, W, 3) BGR for ``channels=3``, (H, W) for ``channels=1``."""
    if channels not in (1, 3):
        raise DarkpruneError(f"{path}: channels must be 1 or 3, not {channels}")
    # read in Python, not by cv2.imread: works for non-ASCII paths on every system
    raw = np.frombuffer(read_input_bytes(path, "image", "not an image"), dtype=np.uint8)
    image = None
    if raw.size:
        try:
            image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)  # UNCHANGED: no EXIF rotation, like stb_image
        except cv2.error:
            image = None
    if image is None or image.size == 0:
        raise DarkpruneError(f"{path}: not an image, or a format OpenCV cannot decode")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)  # stb's 16 -> 8 bit conversion
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        grey = image
        return grey if channels == 1 else np.repeat(grey[:, :, None], 3, axis=2)
    if image.shape[2] == 2:  # grey + alpha
        grey = np.ascontiguousarray(image[:, :, 0])
        return grey if channels == 1 else np.repeat(grey[:, :, None], 3, axis=2)
    bgr = np.ascontiguousarray(image[:, :, :3])  # drops alpha, as stb does when asked for 3 channels
    return _stb_luma(bgr) if channels == 1 else bgr


# Darknet computes each pixel as (float)(v / 255.) in double: a table of those 256 floats gives the same values.
_BYTE_TO_UNIT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


@njit(cache=True, nogil=True)
def _hwc_to_chw_kernel(image, table):
    """uint8 (H, W, C) with channels in BGR order -> float32 (C, H, W) in RGB order, through ``table``."""
    height, width, channels = image.shape
    out = np.empty((channels, height, width), np.float32)
    for r in range(height):
        for c in range(width):
            for k in range(channels):
                out[channels - 1 - k, r, c] = table[image[r, c, k]]
    return out


def image_to_chw(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) BGR or (H, W) grey -> float32 (C, H, W) in RGB order, values ``v / 255.`` (as Darknet)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    return _hwc_to_chw_kernel(image, _BYTE_TO_UNIT)


# ----------------------------------------------------------------------------------------------------------------
# Darknet's resize


@njit(cache=True, nogil=True)
def _darknet_resize_kernel(src, out_h, out_w):
    """Darknet's resize_image on a (C, H, W) float32 image, in float32 arithmetic as the C code does it."""
    channels, in_h, in_w = src.shape
    part = np.empty((channels, in_h, out_w), np.float32)
    out = np.empty((channels, out_h, out_w), np.float32)
    one = np.float32(1.0)
    w_scale = np.float32(0.0)
    h_scale = np.float32(0.0)
    if out_w > 1:
        w_scale = np.float32(in_w - 1) / np.float32(out_w - 1)
    if out_h > 1:
        h_scale = np.float32(in_h - 1) / np.float32(out_h - 1)
    # Pass 1: horizontal. The last output column copies the last input column.
    for k in range(channels):
        for r in range(in_h):
            for c in range(out_w):
                if c == out_w - 1 or in_w == 1:
                    part[k, r, c] = src[k, r, in_w - 1]
                else:
                    sx = np.float32(c) * w_scale
                    ix = int(sx)
                    dx = sx - np.float32(ix)
                    part[k, r, c] = (one - dx) * src[k, r, ix] + dx * src[k, r, ix + 1]
    # Pass 2: vertical. Darknet adds the lower row's share only below the last row (its own quirk, kept).
    for k in range(channels):
        for r in range(out_h):
            sy = np.float32(r) * h_scale
            iy = int(sy)
            dy = sy - np.float32(iy)
            for c in range(out_w):
                out[k, r, c] = (one - dy) * part[k, iy, c]
            if r == out_h - 1 or in_h == 1:
                continue
            for c in range(out_w):
                out[k, r, c] += dy * part[k, iy + 1, c]
    return out


def darknet_resize(chw: np.ndarray, width: int, height: int) -> np.ndarray:
    """Darknet's ``resize_image`` of a float32 (C, H, W) image to (C, height, width)."""
    if width <= 0 or height <= 0:
        raise DarkpruneError(f"resize target must be positive, not {width}x{height}")
    src = np.ascontiguousarray(chw, dtype=np.float32)
    if src.shape[1] == height and src.shape[2] == width:
        return src.copy()  # Darknet's weights are then exactly 1 and 0: the identity
    return _darknet_resize_kernel(src, int(height), int(width))


def letterbox_geometry(image_w: int, image_h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Darknet's letterbox placement: ``(new_w, new_h, dx, dy)`` of the resized image inside the network input."""
    if np.float32(width) / np.float32(image_w) < np.float32(height) / np.float32(image_h):
        new_w = width
        new_h = (image_h * width) // image_w
    else:
        new_h = height
        new_w = (image_w * height) // image_h
    return new_w, new_h, (width - new_w) // 2, (height - new_h) // 2


def letterbox(chw: np.ndarray, width: int, height: int) -> np.ndarray:
    """Darknet's ``letterbox_image``: resize keeping the aspect ratio, centred on a 0.5 grey canvas."""
    channels, image_h, image_w = chw.shape
    new_w, new_h, dx, dy = letterbox_geometry(image_w, image_h, width, height)
    resized = darknet_resize(chw, new_w, new_h)
    boxed = np.full((channels, height, width), 0.5, np.float32)
    boxed[:, dy:dy + new_h, dx:dx + new_w] = resized
    return boxed


# ----------------------------------------------------------------------------------------------------------------
# network input


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise DarkpruneError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")


def preprocess_image(image: str | os.PathLike | np.ndarray, width: int, height: int, mode: str = "darknet",
                     channels: int = 3) -> tuple[np.ndarray, tuple[int, int]]:
    """One network input (C, height, width) float32 from a path or a uint8 BGR/grey image, and the original (w, h)."""
    _check_mode(mode)
    if not isinstance(image, np.ndarray):
        image = load_image(image, channels)
    elif channels == 1 and image.ndim == 3:
        image = _stb_luma(image[:, :, :3])
    elif channels == 3 and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    orig_h, orig_w = image.shape[:2]
    if mode == "opencv":
        if (orig_w, orig_h) != (width, height):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        chw = image[None, :, :] if image.ndim == 2 else image[:, :, ::-1].transpose(2, 0, 1)
        # blobFromImage multiplies in float32 by float32(1/255) (not the same floats as Darknet's v / 255.).
        return np.ascontiguousarray(chw.astype(np.float32) * np.float32(1.0 / 255.0)), (orig_w, orig_h)
    chw = image_to_chw(image)
    if mode == "letterbox":
        return letterbox(chw, width, height), (orig_w, orig_h)
    return darknet_resize(chw, width, height), (orig_w, orig_h)


def preprocess_batch(paths: Sequence[str | os.PathLike], width: int, height: int, mode: str = "darknet",
                     channels: int = 3, threads: int | None = None,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load and preprocess images into one (N, channels, height, width) float32 array.

    Returns ``(inputs, sizes)`` with ``sizes[i] = (original width, original height)``. ``out``: an existing array
    (e.g. a slice of a memmap) of that shape to fill instead of allocating. ``threads``: decoding threads
    (default: the CPU count; OpenCV and the resize kernel release the GIL).
    """
    _check_mode(mode)
    count = len(paths)
    shape = (count, channels, height, width)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    sizes = np.zeros((count, 2), np.int32)

    def work(i: int) -> None:
        chw, size = preprocess_image(paths[i], width, height, mode, channels)
        out[i] = chw
        sizes[i] = size

    workers = max(1, min(threads or os.cpu_count() or 1, count))
    if workers == 1:
        for i in range(count):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(work, range(count)):
                pass
    return out, sizes
