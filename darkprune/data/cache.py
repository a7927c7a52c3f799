"""Preprocessed-input cache: decode and resize a dataset's images once per input geometry, then memory-map them.

Public API
----------
``cache_root(cache_dir=None) -> Path``
    The cache folder: ``cache_dir`` if given, else ``$DARKPRUNE_CACHE``, else ``~/.cache/darkprune``.
``cache_key(paths, width, height, channels=3, mode="darknet") -> str``
    Hash of the image paths, their sizes and modification times, and the preprocessing settings: any change to an
    image (or to the list) gives a new key, so stale entries are never read.
``cached_inputs(images, width, height, channels=3, mode="darknet", cache_dir=None, batch_size=32, progress=True,
                threads=None) -> CachedInputs``
    Build the cache entry if absent (streaming in batches into a temporary ``.npy`` memmap, then ``os.replace``:
    readers never see a half-written file), and return it memory-mapped. ``images``: a ``Dataset`` or a list of paths.
``CachedInputs``: ``inputs`` (N, C, H, W) float32 memmap, ``sizes`` (N, 2) int32 original (w, h), ``path``,
    ``batches(batch_size) -> iterator of (start, stop, inputs[start:stop], sizes[start:stop])``.
``iter_input_batches(images, width, height, batch_size=32, channels=3, mode="darknet", cache=True, cache_dir=None,
                     progress=True, threads=None)``
    The same batches, from the cache (``cache=True``) or preprocessed on the fly with bounded memory (``cache=False``).
``clear_cache(cache_dir=None) -> int``   remove every cache entry (returns the number of files removed).

An entry is two files in the cache folder: ``<key>.npy`` (inputs) and ``<key>.sizes.npy``; memory use while building
or reading is one batch plus what the OS pages in. Sizes: N x C x H x W x 4 bytes (5000 COCO images at 320x320 x 3
take 6.1 GB), so the cache suits validation sets; pass ``cache=False`` to stream instead.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from darkprune.data.preprocess import RESIZE_MODES, preprocess_batch
from darkprune.errors import DarkpruneError

__all__ = ["cache_root", "cache_key", "CachedInputs", "cached_inputs", "iter_input_batches", "clear_cache"]

# Bump when the preprocessing itself changes, so entries made by an older algorithm are not reused.
PREPROCESS_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else ``$DARKPRUNE_CACHE``, else ``~/.cache/darkprune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DARKPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "darkprune"


def _image_paths(images) -> list[str]:
    paths = getattr(images, "image_paths", images)
    return [str(p) for p in paths]


def cache_key(paths: Sequence[str], width: int, height: int, channels: int = 3, mode: str = "darknet") -> str:
    """A hex digest naming the cache entry for these images and settings (paths, sizes, mtimes included)."""
    digest = hashlib.sha256()
    digest.update(f"darkprune-inputs v{PREPROCESS_VERSION} {width}x{height}x{channels} {mode}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            raise DarkpruneError(f"{path}: no such image file") from None
        digest.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


@dataclass
class CachedInputs:
    """A memory-mapped cache entry: ``inputs`` (N, C, H, W) float32, ``sizes`` (N, 2) int32 original (w, h)."""

    inputs: np.ndarray
    sizes: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int = 32) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(start, stop, inputs[start:stop], sizes[start:stop])`` over the entry; inputs are read-only views."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        for start in range(0, len(self.inputs), batch_size):
            stop = min(start + batch_size, len(self.inputs))
            yield start, stop, self.inputs[start:stop], self.sizes[start:stop]


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, leave=False)


def _temp_in(folder: Path, suffix: str) -> str:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    return name


def _open_entry(inputs_path: Path, sizes_path: Path, count: int) -> CachedInputs | None:
    if not (inputs_path.exists() and sizes_path.exists()):
        return None
    try:
        inputs = np.load(inputs_path, mmap_mode="r")
        sizes = np.load(sizes_path)
    except (OSError, ValueError):
        return None  # damaged entry (e.g. a disk that filled up): rebuild it
    if len(inputs) != count or sizes.shape != (count, 2):
        return None
    return CachedInputs(inputs=inputs, sizes=sizes, path=inputs_path)


def cached_inputs(images, width: int, height: int, channels: int = 3, mode: str = "darknet",
                  cache_dir: str | os.PathLike | None = None, batch_size: int = 32, progress: bool = True,
                  threads: int | None = None) -> CachedInputs:
    """The preprocessed inputs of ``images`` (a Dataset or paths), from the cache, built first if needed."""
    if mode not in RESIZE_MODES:
        raise DarkpruneError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
    paths = _image_paths(images)
    if not paths:
        raise DarkpruneError("no images to cache")

    def fill(chunk: list[str], out: np.ndarray) -> np.ndarray:
        return preprocess_batch(chunk, width, height, mode, channels, threads=threads, out=out)[1]

    return cached_entry(paths, width, height, channels, mode, fill, cache_dir, batch_size, progress)


def cached_entry(paths: Sequence[str], width: int, height: int, channels: int, mode: str,
                 fill: Callable[[list[str], np.ndarray], np.ndarray], cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 32, progress: bool = True) -> CachedInputs:
    """The cache entry of ``paths`` under the name ``mode`` (any preprocessing: the key covers paths, sizes, mtimes
    and settings), built first if needed: ``fill(chunk_paths, out)`` writes a chunk's inputs into ``out``
    ((len(chunk), channels, height, width) float32) and returns their original (width, height) sizes."""
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DarkpruneError(f"{root}: cannot create the cache folder: {exc.strerror or exc}") from None
    key = cache_key(paths, width, height, channels, mode)
    stem = f"inputs-{width}x{height}x{channels}-{mode}-{key}"
    inputs_path = root / f"{stem}.npy"
    sizes_path = root / f"{stem}.sizes.npy"
    entry = _open_entry(inputs_path, sizes_path, len(paths))
    if entry is not None:
        return entry

    shape = (len(paths), channels, height, width)
    tmp_inputs = _temp_in(root, ".npy")
    tmp_sizes = _temp_in(root, ".npy")
    try:
        array = np.lib.format.open_memmap(tmp_inputs, mode="w+", dtype=np.float32, shape=shape)
        sizes = np.zeros((len(paths), 2), np.int32)
        with _progress(len(paths), progress, "preprocessing") as bar:
            for start in range(0, len(paths), batch_size):
                stop = min(start + batch_size, len(paths))
                sizes[start:stop] = fill(list(paths[start:stop]), array[start:stop])
                bar.update(stop - start)
        array.flush()
        del array
        np.save(tmp_sizes, sizes)
        # Sizes first: an inputs file in place means the entry is complete.
        os.replace(tmp_sizes, sizes_path)
        os.replace(tmp_inputs, inputs_path)
    except OSError as exc:
        raise DarkpruneError(f"{root}: cannot write the input cache: {exc.strerror or exc}") from None
    finally:
        for tmp in (tmp_inputs, tmp_sizes):
            if os.path.exists(tmp):
                os.remove(tmp)
    entry = _open_entry(inputs_path, sizes_path, len(paths))
    if entry is None:
        raise DarkpruneError(f"{inputs_path}: the cache entry just written cannot be read back")
    return entry


def iter_input_batches(images, width: int, height: int, batch_size: int = 32, channels: int = 3,
                       mode: str = "darknet", cache: bool = True, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True,
                       threads: int | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Batches ``(start, stop, inputs, sizes)`` of the preprocessed images, cached or streamed (bounded memory)."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if cache:
        yield from cached_inputs(images, width, height, channels, mode, cache_dir, batch_size, progress,
                                 threads).batches(batch_size)
        return
    paths = _image_paths(images)
    with _progress(len(paths), progress, "preprocessing") as bar:
        for start in range(0, len(paths), batch_size):
            stop = min(start + batch_size, len(paths))
            inputs, sizes = preprocess_batch(paths[start:stop], width, height, mode, channels, threads=threads)
            bar.update(stop - start)
            yield start, stop, inputs, sizes


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every cache entry (and leftover temporary file) in the cache folder; returns how many files went."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.iterdir():
        if path.name.startswith("inputs-") and path.name.endswith(".npy") or path.name.startswith(".tmp-"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
