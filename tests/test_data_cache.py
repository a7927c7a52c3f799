"""The preprocessed-input cache: built once, memory-mapped, invalidated by file changes, written atomically."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import darkprune.data.cache as cache_module
from darkprune.data.cache import cache_key, cache_root, cached_inputs, clear_cache, iter_input_batches
from darkprune.data.preprocess import preprocess_batch


@pytest.fixture
def images(tmp_path):
    paths = []
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate([(30, 20), (17, 25), (40, 40), (9, 31), (22, 22)]):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKPRUNE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DARKPRUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "darkprune"


def test_cache_builds_once_and_matches_direct_preprocessing(images, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    entry = cached_inputs(images, 16, 12, cache_dir=folder, batch_size=2, progress=False)
    direct, sizes = preprocess_batch(images, 16, 12)
    assert isinstance(entry.inputs, np.memmap) and entry.inputs.shape == (5, 3, 12, 16)
    np.testing.assert_array_equal(entry.inputs, direct)
    np.testing.assert_array_equal(entry.sizes, sizes)
    assert sorted(p.name for p in folder.iterdir()) == sorted([entry.path.name, entry.path.name[:-4] + ".sizes.npy"])

    def refuse(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_module, "preprocess_batch", refuse)
    again = cached_inputs(images, 16, 12, cache_dir=folder, progress=False)
    assert again.path == entry.path
    batches = list(again.batches(2))
    assert [(a, b) for a, b, _, _ in batches] == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_array_equal(np.concatenate([x for _, _, x, _ in batches]), direct)


def test_cache_key_changes_with_files_and_settings(images, tmp_path):
    key = cache_key(images, 16, 12)
    assert cache_key(images, 16, 12) == key
    assert cache_key(images, 16, 16) != key
    assert cache_key(images, 16, 12, mode="letterbox") != key
    assert cache_key(images, 16, 12, channels=1) != key
    assert cache_key(images[::-1], 16, 12) != key
    st = os.stat(images[0])
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache_key(images, 16, 12) != key


def test_changed_image_gives_a_fresh_entry(images, tmp_path):
    folder = tmp_path / "cache"
    first = cached_inputs(images, 8, 8, cache_dir=folder, progress=False)
    old = np.array(first.inputs[2])
    cv2.imwrite(images[2], np.zeros((40, 40, 3), np.uint8))
    st = os.stat(images[2])
    os.utime(images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    second = cached_inputs(images, 8, 8, cache_dir=folder, progress=False)
    assert second.path != first.path
    assert np.all(np.asarray(second.inputs[2]) == 0) and not np.all(old == 0)
    np.testing.assert_array_equal(second.inputs[:2], first.inputs[:2])
    assert clear_cache(folder) == 4 and not any(folder.iterdir())


def test_failed_build_leaves_no_entry_and_no_temp_files(images, tmp_path):
    folder = tmp_path / "cache"
    broken = images + [str(tmp_path / "img" / "0.png")]
    (tmp_path / "img" / "bad.png").write_text("not an image")
    broken[1] = str(tmp_path / "img" / "bad.png")
    with pytest.raises(Exception, match="bad.png"):
        cached_inputs(broken, 8, 8, cache_dir=folder, progress=False)
    assert list(folder.iterdir()) == []


def test_streaming_without_cache_equals_cached(images, tmp_path):
    folder = tmp_path / "cache"
    streamed = list(iter_input_batches(images, 10, 6, batch_size=3, cache=False, progress=False))
    cached = list(iter_input_batches(images, 10, 6, batch_size=3, cache=True, cache_dir=folder, progress=False))
    assert [(a, b) for a, b, _, _ in streamed] == [(a, b) for a, b, _, _ in cached] == [(0, 3), (3, 5)]
    for (_, _, xs, ss), (_, _, xc, sc) in zip(streamed, cached):
        np.testing.assert_array_equal(xs, xc)
        np.testing.assert_array_equal(ss, sc)


def test_env_variable_selects_the_folder(images, tmp_path, monkeypatch):
    monkeypatch.setenv("DARKPRUNE_CACHE", str(tmp_path / "from_env"))
    entry = cached_inputs(images[:2], 4, 4, progress=False)
    assert entry.path.parent == tmp_path / "from_env"
