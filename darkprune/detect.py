"""Run a model on images: detections (``[yolo]`` / ``[region]`` heads) or top-k classes, the way Darknet does.

Public API
----------
``detect(model_or_network, images, thresh=0.25, nms=0.45, letterbox=None, mode="darknet", batch=8,
         return_sizes=False) -> list[Detections]``
    Per image the NMSed detections (boxes relative to the original image; see :mod:`darkprune.engine.decode`), as
    ``darknet detector test`` finds them. With ``return_sizes=True``: ``(detections, sizes)`` where ``sizes[i]`` is
    the original (width, height), needed for pixel boxes (``decode.pixel_boxes`` / ``decode.detections_to_json``).
``classify(model_or_network, images, top=5, mode="darknet", batch=8) -> list[list[tuple[int, float]]]``
    Per image the ``top`` (class index, score) pairs, best first (Darknet's ``top_k``: ties go to the lower index).
``iter_detections(...)`` / ``iter_classifications(...)``
    The same, streamed: ``(image index, result, (width, height))`` one image at a time, a batch in memory at most.
``detection_heads(graph) -> [(layer index, head params dict)]``   the graph's ``[yolo]`` / ``[region]`` layers.
``is_detector(graph) -> bool``
``classifier_input(image, width, height, channels=3, mode="darknet") -> (chw, (orig_w, orig_h))``
    Darknet's classifier preprocessing (``classifier predict`` / ``classifier valid``): ``resize_min`` to the
    network width, then a centred ``crop_image``; ``mode="opencv"``: a plain ``cv2.resize`` as OpenCV's blob.
``as_network(model_or_network, bn_eps=DARKNET_BN_EPS) -> Network``

``images``: file paths, or uint8 arrays in OpenCV's layout (BGR (H, W, 3), BGRA (H, W, 4) or grey (H, W)); alpha
is dropped and grey replicated, as Darknet's stb_image loader does. ``letterbox=None`` follows the cfg's
``letter_box``. ``mode``: "darknet" (Darknet's own bilinear ``resize_image``) or "opencv" (``cv2.resize``, as
``cv2.dnn.blobFromImage``); to compare with OpenCV tightly, also pass a ``Network(model, OPENCV_BN_EPS)``.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from darkprune.darknet.heads import DECODED_HEAD_TYPES, is_detector
from darkprune.data.preprocess import darknet_resize, image_to_chw, load_image, preprocess_image
from darkprune.engine.decode import Detections, HeadParams, decode_image, head_params
from darkprune.engine.network import DARKNET_BN_EPS, Network
from darkprune.errors import DarkpruneError

__all__ = [
    "DETECT_MODES",
    "as_network",
    "classifier_input",
    "classifier_output",
    "classify",
    "detect",
    "detection_heads",
    "is_detector",
    "iter_classifications",
    "iter_detections",
    "read_image",
    "top_k",
]

DETECT_MODES = ("darknet", "opencv")


# ----------------------------------------------------------------------------------------------------------------
# the model


def as_network(model_or_network: Any, bn_eps: float = DARKNET_BN_EPS) -> Network:
    """A ready Network: the argument itself if it is one, else ``Network(model, bn_eps)``."""
    if isinstance(model_or_network, Network):
        return model_or_network
    if not hasattr(model_or_network, "graph") or not hasattr(model_or_network, "params"):
        raise DarkpruneError(f"expected a darkprune Model or Network, not {type(model_or_network).__name__}")
    return Network(model_or_network, bn_eps)


def detection_heads(graph) -> list[tuple[int, HeadParams]]:
    """``[(layer index, decode parameters)]`` of the ``[yolo]`` / ``[region]`` layers, in layer order."""
    return [(layer.index, head_params(dict(layer.attrs, type=layer.type))) for layer in graph
            if layer.type in DECODED_HEAD_TYPES]


def _check_mode(mode: str) -> None:
    if mode not in DETECT_MODES:
        raise DarkpruneError(f"resize mode must be one of {', '.join(DETECT_MODES)}, not {mode!r}")


def _check_batch(batch: int) -> None:
    if int(batch) <= 0:
        raise DarkpruneError(f"batch must be a positive number of images, not {batch}")


# ----------------------------------------------------------------------------------------------------------------
# images


def read_image(image: Any, channels: int = 3) -> np.ndarray:
    """A uint8 image as the loaders give it: (H, W, 3) BGR, or (H, W) grey for ``channels=1``.

    ``image``: a path (decoded by ``data.load_image``, which names the file in its errors) or an array in OpenCV's
    layout: grey (H, W) or (H, W, 1), BGR (H, W, 3), BGRA (H, W, 4); alpha is dropped, grey replicated.
    """
    if not isinstance(image, np.ndarray):
        return load_image(image, channels)
    array = image
    if array.dtype != np.uint8:
        raise DarkpruneError(f"image arrays must be uint8 (as cv2.imread gives them), not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 2:  # grey + alpha
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] >= 3:
        array = array[:, :, :3]
    if array.ndim != 2 and not (array.ndim == 3 and array.shape[2] == 3):
        raise DarkpruneError(f"image array has shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DarkpruneError(f"image array has shape {image.shape}: empty")
    if channels == 1 and array.ndim == 3:
        # stb_image's luma, as data.load_image computes it for files
        b, g, r = (array[..., k].astype(np.uint32) for k in range(3))
        return ((r * 77 + g * 150 + b * 29) >> 8).astype(np.uint8)
    if channels == 3 and array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def _darknet_crop(chw: np.ndarray, dx: int, dy: int, width: int, height: int) -> np.ndarray:
    """Darknet's ``crop_image``: a width x height window at (dx, dy), pixels outside clamped to the border."""
    _, h, w = chw.shape
    rows = np.clip(np.arange(height) + dy, 0, h - 1)
    cols = np.clip(np.arange(width) + dx, 0, w - 1)
    return np.ascontiguousarray(chw[:, rows][:, :, cols])


def _c_half(value: int) -> int:
    """C's ``value / 2`` for ints (truncates toward zero, also for negative values)."""
    return -((-value) // 2) if value < 0 else value // 2


def classifier_input(image: Any, width: int, height: int, channels: int = 3,
                     mode: str = "darknet") -> tuple[np.ndarray, tuple[int, int]]:
    """One classifier input (C, height, width) float32 and the original (w, h).

    "darknet": ``resize_min(im, width)`` (the shorter side to the network width, keeping the aspect ratio, with
    Darknet's ``resize_image``) and a centred ``crop_image`` to width x height, as ``classifier predict`` and
    ``classifier valid`` do. "opencv": ``cv2.resize`` to width x height (``cv2.dnn.blobFromImage``).
    """
    _check_mode(mode)
    pixels = read_image(image, channels)
    orig_h, orig_w = pixels.shape[:2]
    if mode == "opencv":
        chw, _ = preprocess_image(pixels, width, height, "opencv", channels)
        return chw, (orig_w, orig_h)
    w, h = orig_w, orig_h
    if w < h:
        h, w = (h * width) // w, width
    else:
        w, h = (w * width) // h, width
    chw = image_to_chw(pixels)
    if (w, h) != (orig_w, orig_h):
        chw = darknet_resize(chw, w, h)
    if (w, h) != (width, height):
        chw = _darknet_crop(chw, _c_half(w - width), _c_half(h - height), width, height)
    return chw, (orig_w, orig_h)


def _batches(images: Sequence[Any], batch: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(images), batch):
        yield start, list(images[start:start + batch])


def network_geometry(network: Network) -> tuple[int, int, int]:
    """(width, height, channels) of the network's input, from its [net] section."""
    net = network.graph.net
    return int(net["width"]), int(net["height"]), int(net["channels"])


def detector_resize(network: Network, letterbox: bool | None, mode: str) -> tuple[str, bool]:
    """(the data module's resize mode, whether letterboxed) for a detector; letterbox None follows the cfg's
    letter_box."""
    if letterbox is None:
        letterbox = bool(network.graph.net.get("letter_box", 0))
    if letterbox and mode == "opencv":
        raise DarkpruneError("letterbox resizing is Darknet's: use mode='darknet' with letterbox")
    return ("letterbox" if letterbox else mode), letterbox


# ----------------------------------------------------------------------------------------------------------------
# detection


def iter_detections(model_or_network: Any, images: Sequence[Any], thresh: float = 0.25, nms: float = 0.45,
                    letterbox: bool | None = None, mode: str = "darknet",
                    batch: int = 8) -> Iterator[tuple[int, Detections, tuple[int, int]]]:
    """``(index, detections, (orig_w, orig_h))`` per image, in order (see :func:`detect`)."""
    _check_mode(mode)
    _check_batch(batch)
    network = as_network(model_or_network)
    heads = detection_heads(network.graph)
    if not heads:
        raise DarkpruneError(f"{network.graph.cfg.path}: the network has no [yolo] or [region] layer to detect "
                             f"with (a classifier? use classify)")
    width, height, channels = network_geometry(network)
    resize, letterbox = detector_resize(network, letterbox, mode)
    indices = [index for index, _ in heads]
    images = list(images)
    for start, chunk in _batches(images, batch):
        x = np.empty((len(chunk), channels, height, width), np.float32)
        sizes = []
        for i, image in enumerate(chunk):
            x[i], size = preprocess_image(read_image(image, channels), width, height, resize, channels)
            sizes.append(size)
        outputs = network.forward(x, outputs=indices)
        for i, size in enumerate(sizes):
            dets = decode_image([(outputs[index][i], params) for index, params in heads], width, height,
                                size[0], size[1], thresh=thresh, nms_thresh=nms, letterbox=letterbox)
            yield start + i, dets, size


def detect(model_or_network: Any, images: Sequence[Any], thresh: float = 0.25, nms: float = 0.45,
           letterbox: bool | None = None, mode: str = "darknet", batch: int = 8, return_sizes: bool = False):
    """Per image the detections with some class probability > ``thresh`` after Darknet's NMS (``nms``: IoU
    threshold, 0 = none; the kind is the last head's ``nms_kind``), boxes relative to the original image.

    ``model_or_network``: a Model (run with Darknet's batch-norm eps) or a ready Network. ``images``: paths or
    uint8 arrays (BGR, BGRA or grey). ``letterbox``: None = the cfg's ``letter_box``. ``mode``: "darknet" or
    "opencv" resizing. ``return_sizes``: also return the original (width, height) of each image.
    """
    results, sizes = [], []
    for _, dets, size in iter_detections(model_or_network, images, thresh, nms, letterbox, mode, batch):
        results.append(dets)
        sizes.append(size)
    return (results, sizes) if return_sizes else results


# ----------------------------------------------------------------------------------------------------------------
# classification


def classifier_output(network: Network) -> int:
    """The layer whose output holds a classifier's scores (the last layer that is not a ``[cost]``)."""
    return network.graph.output_layers()[-1]


def top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Darknet's ``top_k``: the k highest scores, best first, the lower index first among equal scores."""
    scores = np.asarray(scores, np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:max(0, k)]
    return [(int(i), float(scores[i])) for i in order]


def iter_classifications(model_or_network: Any, images: Sequence[Any], top: int = 5, mode: str = "darknet",
                         batch: int = 8) -> Iterator[tuple[int, list[tuple[int, float]], tuple[int, int]]]:
    """``(index, [(class, score), ...], (orig_w, orig_h))`` per image, in order (see :func:`classify`)."""
    _check_mode(mode)
    _check_batch(batch)
    if top < 1:
        raise DarkpruneError(f"top must be at least 1, not {top}")
    network = as_network(model_or_network)
    if is_detector(network.graph):
        raise DarkpruneError(f"{network.graph.cfg.path}: the network is a detector ([yolo]/[region] heads): use "
                             f"detect")
    width, height, channels = network_geometry(network)
    output = classifier_output(network)
    images = list(images)
    for start, chunk in _batches(images, batch):
        x = np.empty((len(chunk), channels, height, width), np.float32)
        sizes = []
        for i, image in enumerate(chunk):
            x[i], size = classifier_input(image, width, height, channels, mode)
            sizes.append(size)
        scores = network.forward(x, outputs=[output])[output].reshape(len(chunk), -1)
        for i, size in enumerate(sizes):
            yield start + i, top_k(scores[i], top), size


def classify(model_or_network: Any, images: Sequence[Any], top: int = 5, mode: str = "darknet",
             batch: int = 8) -> list[list[tuple[int, float]]]:
    """Per image the ``top`` (class index, score) pairs, best first, from the classifier's last layer (softmax,
    avgpool or connected scores), with Darknet's classifier preprocessing (see :func:`classifier_input`)."""
    return [result for _, result, _ in iter_classifications(model_or_network, images, top, mode, batch)]
