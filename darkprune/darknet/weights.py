"""Darknet `.weights` reading and writing, layer by layer exactly as Darknet's load_weights/save_weights do.

Header: int32 major, minor, revision; then `seen` as uint64 when major*10+minor >= 2, else uint32. Then, for each
layer in cfg order, the float32 arrays that layer type carries (see `layer_arrays`). A connected layer's weight
matrix is stored transposed when major or minor exceeds 1000 (very old files); we transpose on read and back on
write so round trips stay byte-exact.

Unlike Darknet (and OpenCV), we refuse a file whose size does not match its cfg: a truncated download would otherwise
load silently with zeros in the last layers. `lenient=True` gives Darknet's partial load (backbone weights).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import DarkpruneError
from ..util.textio import read_input_bytes
from .graph import Graph, Layer
from .layer_types import layer_type


@dataclass
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 5
    seen: int = 0

    @property
    def seen_is_64bit(self) -> bool:
        return self.major * 10 + self.minor >= 2

    @property
    def transposed(self) -> bool:
        return self.major > 1000 or self.minor > 1000

    @property
    def nbytes(self) -> int:
        return 12 + (8 if self.seen_is_64bit else 4)

    def to_bytes(self) -> bytes:
        head = np.array([self.major, self.minor, self.revision], dtype="<i4").tobytes()
        seen = np.array([self.seen], dtype="<u8" if self.seen_is_64bit else "<u4").tobytes()
        return head + seen

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}"


def layer_arrays(layer: Layer) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays a layer stores in .weights, in file order, with their shapes (empty for layers without any): its
    entry in the layer-type table says which."""
    return layer_type(layer).arrays(layer)


def expected_floats(graph: Graph) -> int:
    return sum(int(np.prod(shape)) for layer in graph for _, shape in layer_arrays(layer))


def read_header(path: str, data: bytes) -> WeightsHeader:
    if len(data) < 16:
        raise DarkpruneError(f"{path}: {len(data)} bytes is too short for a Darknet weights header (16-20 bytes)")
    major, minor, revision = (int(v) for v in np.frombuffer(data[:12], dtype="<i4"))
    plausible = all(0 <= v < 1000 or 1000 < v < 100000 for v in (major, minor)) and 0 <= revision < 100000
    if not plausible:
        raise DarkpruneError(f"{path}: not a Darknet weights file: header version {major}.{minor}.{revision} "
                             f"(Darknet writes 0.2.0 or 0.2.5)")
    header = WeightsHeader(major, minor, revision, 0)
    if len(data) < header.nbytes:
        raise DarkpruneError(f"{path}: file ends inside the header ({len(data)} bytes)")
    dtype = "<u8" if header.seen_is_64bit else "<u4"
    header.seen = int(np.frombuffer(data[12:header.nbytes], dtype=dtype)[0])
    return header


def read_weights(path: str | os.PathLike, graph: Graph, lenient: bool = False):
    """Returns (header, {layer index: {array name: float32 array}}). Layers a lenient partial file does not reach
    are absent from the dict."""
    path = str(path)
    data = read_input_bytes(path, "weights", "expected a Darknet .weights file")
    header = read_header(path, data)
    body = data[header.nbytes:]
    stray = len(body) % 4          # a file cut inside a float: report where it ends, as for any truncation
    floats = np.frombuffer(body[:len(body) - stray], dtype="<f4")
    expected = expected_floats(graph)
    if stray and len(floats) >= expected and not lenient:
        raise DarkpruneError(f"{path}: {len(body)} bytes after the header is not a whole number of float32 values")
    if len(floats) > expected and not lenient:
        raise DarkpruneError(f"{path}: {len(floats) - expected} floats left over after the last layer ({graph.cfg.path} "
                             f"needs {expected}, the file has {len(floats)}): weights for another cfg?")
    params: dict[int, dict[str, np.ndarray]] = {}
    pos = 0
    for layer in graph:
        arrays = layer_arrays(layer)
        if not arrays:
            continue
        need = sum(int(np.prod(shape)) for _, shape in arrays)
        if pos + need > len(floats):
            if lenient and pos == len(floats):
                break
            raise DarkpruneError(
                f"{path}: ends in layer {layer.index} ({layer.name}, [{layer.section.header}] at "
                f"{graph.cfg.path}:{layer.section.line}): the cfg needs {expected} floats in all, the file has "
                f"{len(floats)} (truncated, or weights for another cfg)")
        layer_params = {}
        for name, shape in arrays:
            count = int(np.prod(shape))
            arr = floats[pos:pos + count].copy()
            pos += count
            if layer.type == "connected" and name == "weights" and header.transposed:
                arr = arr.reshape(shape[1], shape[0]).T.copy()
            layer_params[name] = arr.reshape(shape)
        params[layer.index] = layer_params
    return header, params


def weights_bytes(graph: Graph, header: WeightsHeader, params: dict[int, dict[str, np.ndarray]]) -> bytes:
    chunks = [header.to_bytes()]
    for layer in graph:
        arrays = layer_arrays(layer)
        if not arrays:
            continue
        if layer.index not in params:
            break           # a partial (backbone) model writes only what it has, as Darknet's cutoff does
        for name, shape in arrays:
            arr = np.asarray(params[layer.index][name], dtype=np.float32)
            if arr.shape != shape:
                raise DarkpruneError(f"layer {layer.index} ({layer.name}): array '{name}' has shape {arr.shape}, "
                                     f"the cfg says {shape}")
            if layer.type == "connected" and name == "weights" and header.transposed:
                arr = arr.T
            chunks.append(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return b"".join(chunks)


def random_params(graph: Graph, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Seeded random weights that keep activations finite through deep networks: He-scaled filters, biases 0,
    batch-norm scale 1, mean 0, variance 1. (Darknet's own initialiser leaves rolling_variance at 0, so its random
    models overflow within a few layers.)"""
    rng = np.random.default_rng(seed)
    params = {}
    for layer in graph:
        arrays = layer_arrays(layer)
        if not arrays:
            continue
        out = {}
        for name, shape in arrays:
            if name == "weights" and layer.type in ("convolutional", "connected", "local"):
                fan_in = int(np.prod(shape[1:])) if layer.type != "local" else layer.in_shape[0] * layer.attrs["size"] ** 2
                out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / max(fan_in, 1)))
            elif name == "weights":      # shortcut fusion weights: start as a plain sum
                out[name] = np.ones(shape, dtype=np.float32)
            elif name in ("scales", "rolling_variance"):
                out[name] = np.ones(shape, dtype=np.float32)
            else:
                out[name] = np.zeros(shape, dtype=np.float32)
        params[layer.index] = out
    return params
