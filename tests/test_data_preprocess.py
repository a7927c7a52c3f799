"""Image loading and preprocessing: Darknet's resize and letterbox on hand-computed cases, OpenCV's path."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from darkprune.data.preprocess import (
    darknet_resize,
    image_to_chw,
    letterbox,
    letterbox_geometry,
    load_image,
    preprocess_batch,
    preprocess_image,
)
from darkprune.errors import DarkpruneError

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
F = np.float32


def test_darknet_resize_hand_computed_down_and_up():
    # 1 channel, 2 rows x 3 columns -> 3 rows x 2 columns.
    src = np.array([[[0, 3, 6], [9, 12, 15]]], np.float32)
    # Horizontal: w_scale = 2 -> column 0 = src[:, 0], column 1 (the last) = src[:, 2] -> [[0, 6], [9, 15]].
    # Vertical: h_scale = 0.5 -> row 0 = part[0], row 1 = .5 part[0] + .5 part[1], row 2 = part[1].
    np.testing.assert_array_equal(darknet_resize(src, 2, 3), [[[0, 6], [4.5, 10.5], [9, 15]]])


def test_darknet_resize_upsampling_uses_corner_aligned_weights():
    src = np.array([[[0, 3]]], np.float32)
    out = darknet_resize(src, 4, 1)[0, 0]
    w_scale = F(1) / F(3)  # (in_w - 1) / (out_w - 1) in float
    dx1, dx2 = F(1) * w_scale, F(2) * w_scale
    expected = [0, (F(1) - dx1) * F(0) + dx1 * F(3), (F(1) - dx2) * F(0) + dx2 * F(3), 3]
    np.testing.assert_array_equal(out, np.array(expected, np.float32))
    # OpenCV's INTER_LINEAR puts pixel centres elsewhere: 0, 0.75, 2.25, 3.
    cv = cv2.resize(src[0], (4, 1), interpolation=cv2.INTER_LINEAR)[0]
    np.testing.assert_allclose(cv, [0, 0.75, 2.25, 3])


def test_darknet_resize_last_row_quirk():
    # Height 4 -> 320: 319 * (3/319 in float) rounds to 2.9999998, so Darknet's last row is (1 - 0.9999998) x row 2
    # and the lower row's share is never added (its loop stops at the last row). A constant image shows it.
    src = np.ones((1, 4, 5), np.float32)
    out = darknet_resize(src, 5, 320)
    sy = F(319) * (F(3) / F(319))
    assert int(sy) == 2
    np.testing.assert_allclose(out[0, :-1], 1, rtol=1e-6)
    np.testing.assert_array_equal(out[0, -1], np.full(5, F(1) - (sy - F(2)), np.float32))
    assert out[0, -1, 0] < 1e-6


def test_darknet_resize_same_size_is_identity():
    src = np.random.default_rng(0).random((3, 5, 7), dtype=np.float32)
    np.testing.assert_array_equal(darknet_resize(src, 7, 5), src)


def test_letterbox_hand_computed():
    src = np.arange(8, dtype=np.float32).reshape(1, 2, 4) / 8  # 4 wide, 2 high
    assert letterbox_geometry(4, 2, 8, 8) == (8, 4, 0, 2)
    out = letterbox(src, 8, 8)
    assert out.shape == (1, 8, 8)
    np.testing.assert_array_equal(out[:, :2], 0.5)
    np.testing.assert_array_equal(out[:, 6:], 0.5)
    np.testing.assert_array_equal(out[:, 2:6], darknet_resize(src, 8, 4))
    assert letterbox_geometry(640, 480, 416, 416) == (416, 312, 0, 52)
    assert letterbox_geometry(300, 600, 416, 416) == (208, 416, 104, 0)


def test_image_to_chw_is_rgb_over_255():
    bgr = np.array([[[10, 20, 30], [255, 0, 128]]], np.uint8)
    chw = image_to_chw(bgr)
    assert chw.shape == (3, 1, 2) and chw.dtype == np.float32
    np.testing.assert_array_equal(chw[:, 0, 0], np.array([30 / 255.0, 20 / 255.0, 10 / 255.0], np.float32))
    np.testing.assert_array_equal(chw[:, 0, 1], np.array([128 / 255.0, 0, 1], np.float32))


def test_load_grey_bgra_and_16_bit_images(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    img = load_image(tmp_path / "g.png")
    assert img.shape == (3, 4, 3) and all(np.array_equal(img[:, :, k], grey) for k in range(3))
    assert np.array_equal(load_image(tmp_path / "g.png", channels=1), grey)

    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 100, 200, 7
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    img = load_image(tmp_path / "a.png")
    assert img.shape == (2, 3, 3) and img[0, 0].tolist() == [10, 100, 200]
    # stb's luma: (77 R + 150 G + 29 B) >> 8 = (77*200 + 150*100 + 29*10) >> 8 = 120
    assert load_image(tmp_path / "a.png", channels=1)[0, 0] == (77 * 200 + 150 * 100 + 29 * 10) >> 8

    deep = np.full((2, 2, 3), 0xABCD, np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert load_image(tmp_path / "d.png")[0, 0].tolist() == [0xAB] * 3

    chw, size = preprocess_image(tmp_path / "a.png", 6, 4)
    assert chw.shape == (3, 4, 6) and size == (3, 2)


def test_unreadable_images_raise_one_line_errors(tmp_path):
    with pytest.raises(DarkpruneError, match=r"gone\.jpg: no such image file"):
        load_image(tmp_path / "gone.jpg")
    (tmp_path / "text.jpg").write_text("not a jpeg at all")
    with pytest.raises(DarkpruneError, match=r"text\.jpg: not an image"):
        load_image(tmp_path / "text.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DarkpruneError, match=r"empty\.png: not an image"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(DarkpruneError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(DarkpruneError, match=r"gone\.jpg"):
        preprocess_batch([tmp_path / "gone.jpg"], 8, 8)
    with pytest.raises(DarkpruneError, match="resize mode"):
        preprocess_image(np.zeros((2, 2, 3), np.uint8), 4, 4, mode="bicubic")


def test_opencv_mode_equals_blob_from_image(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "r.png"), image)
    blob = cv2.dnn.blobFromImage(image, 1 / 255.0, (32, 24), swapRB=True, crop=False)
    ours, _ = preprocess_batch([tmp_path / "r.png"], 32, 24, mode="opencv")
    np.testing.assert_array_equal(ours, blob)


def test_preprocess_batch_shapes_sizes_and_modes(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(20, 10), (7, 13), (16, 16)]):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.full((h, w, 3), 40 * i, np.uint8))
        paths.append(path)
    for mode in ("darknet", "letterbox", "opencv"):
        x, sizes = preprocess_batch(paths, 12, 8, mode=mode, threads=2)
        assert x.shape == (3, 3, 8, 12) and x.dtype == np.float32
        assert sizes.tolist() == [[20, 10], [7, 13], [16, 16]]
        single, _ = preprocess_image(paths[1], 12, 8, mode=mode)
        np.testing.assert_array_equal(x[1], single)
    x, _ = preprocess_batch(paths, 12, 8, mode="letterbox")
    assert x[1, 0, 0, 0] == np.float32(0.5)  # a tall image leaves grey bars left and right
    grey, _ = preprocess_batch(paths, 12, 8, channels=1)
    assert grey.shape == (3, 1, 8, 12)


def test_real_photo_darknet_and_opencv_resizes_differ_slightly():
    path = ASSETS / "images" / "dog.jpg"
    if not path.exists():
        pytest.skip("assets not present")
    ours, size = preprocess_image(path, 320, 320)
    cv, _ = preprocess_image(path, 320, 320, mode="opencv")
    assert size == (768, 576)
    assert ours.shape == cv.shape == (3, 320, 320)
    diff = np.abs(ours - cv)
    assert 0 < diff.mean() < 0.05  # the same picture, sampled at different positions
