"""The non-conv layer kernels on small cases whose results are worked out by hand from Darknet's rules (the
comments give the reasoning), including the options OpenCV's importer ignores."""
import numpy as np
import pytest

from darkprune.engine import crop, dropout, pool, reorg, route, sam, scale_channels, shortcut, softmax, upsample, yolo


def _img(a, dtype=np.float32):
    """A 2-D list -> a (1, 1, H, W) array."""
    return np.asarray(a, dtype)[None, None]


INC = _img([[1, 2, 3], [4, 5, 6], [7, 8, 9]])


# --------------------------------------------------------------------------------------------------------- maxpool

def test_maxpool_padding_one_sits_right_and_bottom():
    # size 2, stride 1, padding 1: out is 3x3, window (i..i+1, j..j+1); the padding is the 4th row/column.
    # Increasing values: each window's max is its bottom-right in-image cell.
    out = pool.maxpool_forward(INC, 2, 1, 1, 1)
    np.testing.assert_array_equal(out[0, 0], [[5, 6, 6], [8, 9, 9], [8, 9, 9]])
    # Decreasing (negative) values: the max is the window's top-left cell, so the output is the input itself; a
    # left/top padding would shift it, a zero padding would put zeros in the last row/column.
    np.testing.assert_array_equal(pool.maxpool_forward(-INC, 2, 1, 1, 1), -INC)


def test_maxpool_stride_two_default_padding():
    # 3x3, size 2, stride 2, padding 1: out = (3 + 1 - 2) / 2 + 1 = 2; windows rows {0,1},{2,pad}, same for cols
    np.testing.assert_array_equal(pool.maxpool_forward(INC, 2, 2, 2, 1)[0, 0], [[5, 6], [8, 9]])
    np.testing.assert_array_equal(pool.maxpool_forward(-INC, 2, 2, 2, 1)[0, 0], [[-1, -3], [-7, -9]])


def test_maxpool_no_padding_truncates():
    # 3x3, size 2, stride 2, padding 0: out = (3 - 2) / 2 + 1 = 1 (C division), the last row/column never read
    np.testing.assert_array_equal(pool.maxpool_forward(INC, 2, 2, 2, 0)[0, 0], [[5]])


def test_maxpool_even_padding_splits_both_sides():
    # size 3, stride 1, padding 2: window starts at -1; out (3 + 2 - 3) + 1 = 3: a centred 3x3 max
    np.testing.assert_array_equal(pool.maxpool_forward(-INC, 3, 1, 1, 2)[0, 0],
                                  [[-1, -1, -2], [-1, -1, -2], [-4, -4, -5]])


def test_maxpool_separate_strides():
    x = _img(np.arange(12).reshape(3, 4))
    # size 2, stride_x 2, stride_y 1, padding 1: out h = (3+1-2)/1+1 = 3, w = (4+1-2)/2+1 = 2;
    # max of rows {i, i+1}, cols {2j, 2j+1} (clipped) = x[min(i+1, 2), 2j+1]
    out = pool.maxpool_forward(x, 2, 2, 1, 1)
    np.testing.assert_array_equal(out[0, 0], [[5, 7], [9, 11], [9, 11]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maxpool_skips_nan_and_reads_the_padding_as_minus_flt_max(dtype):
    # Darknet keeps `val > max` from max = -FLT_MAX: a NaN never wins (the comparison is false), -inf loses to the
    # start value, and a window with nothing else gives -FLT_MAX. Size 2, stride 1, padding 1 (the extra cell
    # right/bottom), as in yolov3-tiny; the stride-1 kernel and the kernel that records indices both follow it.
    nan, inf = np.nan, np.inf
    x = _img([[nan, 1, -inf], [nan, nan, -inf], [-inf, -inf, -inf]], dtype)
    low = -pool.FLT_MAX
    expected = [[1, 1, low], [low, low, low], [low, low, low]]
    np.testing.assert_array_equal(pool.maxpool_forward(x, 2, 1, 1, 1)[0, 0], np.array(expected, dtype))
    np.testing.assert_array_equal(pool.maxpool_forward(x, 2, 1, 1, 1, return_indices=True)[0][0, 0],
                                  np.array(expected, dtype))


def test_maxpool_ties_keep_the_first_cell():
    x = np.zeros((1, 1, 2, 2), np.float32)
    out, idx = pool.maxpool_forward(x, 2, 2, 2, 0, return_indices=True)
    assert idx[0, 0, 0, 0] == 0  # strict '>' in row-major window order: the top-left cell
    grad = pool.maxpool_backward(np.ones_like(out), idx, x.shape)
    np.testing.assert_array_equal(grad[0, 0], [[1, 0], [0, 0]])


def test_maxpool_overlapping_windows_accumulate_gradient():
    # size 2, stride 1, padding 1 on increasing values: the 9 is the max of four windows
    out, idx = pool.maxpool_forward(INC, 2, 1, 1, 1, return_indices=True)
    grad = pool.maxpool_backward(np.ones_like(out), idx, INC.shape)
    np.testing.assert_array_equal(grad[0, 0], [[0, 0, 0], [0, 1, 2], [0, 2, 4]])


def test_maxpool_depth():
    # 4 channels, out_channels=2: output g = max(channel g, channel g+2)
    # channels (1, -5), (3, 2), (0, 7), (-1, 4)
    x = np.array([1, -5, 3, 2, 0, 7, -1, 4], np.float32).reshape(1, 4, 1, 2)
    out, idx = pool.maxpool_depth_forward(x, 2, return_indices=True)
    # [max(1, 0), max(-5, 7)], [max(3, -1), max(2, 4)]
    np.testing.assert_array_equal(out[0, :, 0, :], [[1, 7], [3, 4]])
    grad = pool.maxpool_backward(np.ones_like(out), idx, x.shape)
    np.testing.assert_array_equal(grad.reshape(-1), [1, 0, 1, 0, 0, 1, 0, 1])


def test_maxpool_output_size_helper():
    assert pool.pool_output_hw(13, 13, 2, 1, 1, 1) == (13, 13)  # yolov3-tiny's stride-1 pool
    assert pool.pool_output_hw(416, 416, 2, 2, 2, 1) == (208, 208)
    assert pool.pool_output_hw(7, 9, 3, 2, 1, 0) == (5, 4)


# ------------------------------------------------------------------------------------------------------- avgpools

def test_avgpool_global():
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    np.testing.assert_allclose(pool.avgpool_forward(x)[:, :, 0, 0], [[5.5, 17.5]])


def test_local_avgpool_divides_by_in_image_cells():
    x = _img(np.arange(9).reshape(3, 3))
    # size 2, stride 1, padding 1 (right/bottom): out[0,0] = (0+1+3+4)/4, out[0,2] = (2+5)/2, out[2,2] = 8/1
    out = pool.local_avgpool_forward(x, 2, 1, 1, 1)[0, 0]
    np.testing.assert_allclose(out, [[2, 3, 3.5], [5, 6, 6.5], [6.5, 7.5, 8]])
    x4 = _img(np.arange(16).reshape(4, 4))
    # size 3, stride 2, padding 2: windows start at -1; out[0,0] = mean(0,1,4,5), out[0,1] = mean(x[0:2, 1:4]),
    # out[1,0] = mean(x[1:4, 0:2]), out[1,1] = mean(x[1:4, 1:4])
    out4 = pool.local_avgpool_forward(x4, 3, 2, 2, 2)[0, 0]
    np.testing.assert_allclose(out4, [[2.5, 4], [8.5, 10]])


# -------------------------------------------------------------------------------------------------------- shortcut

def _chw(values, c, h=1, w=2):
    return np.asarray(values, np.float32).reshape(1, c, h, w)


def test_shortcut_channel_counts_differ():
    prev = _chw([1, 2, 3, 4, 5, 6], 3)
    small = _chw([10, 20, 30, 40], 2)
    # from has fewer channels: added to prev's first two channels, the third passes through
    np.testing.assert_array_equal(shortcut.shortcut_forward(prev, [small]).reshape(-1), [11, 22, 33, 44, 5, 6])
    # from has more channels: only prev's channel count is added
    np.testing.assert_array_equal(shortcut.shortcut_forward(small, [prev]).reshape(-1), [11, 22, 33, 44])


def test_shortcut_several_froms():
    a, b, c = _chw([1, 2], 1), _chw([10, 20], 1), _chw([100, 200], 1)
    np.testing.assert_array_equal(shortcut.shortcut_forward(a, [b, c]).reshape(-1), [111, 222])


def test_shortcut_per_feature_weights():
    a, b = _chw([1, 2, 3, 4], 2), _chw([10, 20, 30, 40], 2)
    out = shortcut.shortcut_forward(a, [b], np.array([0.5, 2.0], np.float32), "per_feature")
    np.testing.assert_allclose(out.reshape(-1), [20.5, 41, 61.5, 82])


def test_shortcut_per_channel_weights():
    a, b = _chw([1, 2, 3, 4], 2), _chw([10, 20, 30, 40], 2)
    w = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)  # row k = input k (0 = prev), column = channel
    out = shortcut.shortcut_forward(a, [b], w, "per_channel")
    np.testing.assert_allclose(out.reshape(-1), [1 + 5, 2 + 10, -3 + 60, -4 + 80])


def test_shortcut_relu_normalization():
    a, b, c = _chw([1, 1], 1), _chw([10, 10], 1), _chw([100, 100], 1)
    w = np.array([0.5, -2.0, 1.5], np.float32)
    # relu -> (0.5, 0, 1.5), divided by 1e-4 + 2.0
    expected = (0.5 * 1 + 0 * 10 + 1.5 * 100) / 2.0001
    out = shortcut.shortcut_forward(a, [b, c], w, "per_feature", "relu")
    np.testing.assert_allclose(out.reshape(-1), [expected, expected], rtol=1e-6)


def test_shortcut_softmax_normalization():
    a, b = _chw([1, 1, 1, 1], 2), _chw([3, 3, 3, 3], 2)
    w = np.array([[0.0, 1.0], [np.log(3.0), 1.0]], np.float32)
    # channel 0: exp(w - max) = (1/3, 1), sum 4/3 + 1e-4; channel 1: equal weights (1, 1), sum 2 + 1e-4
    ch0 = (1 / 3 * 1 + 1 * 3) / (4 / 3 + 1e-4)
    ch1 = (1 * 1 + 1 * 3) / (2 + 1e-4)
    out = shortcut.shortcut_forward(a, [b], w, "per_channel", "softmax")
    np.testing.assert_allclose(out.reshape(-1), [ch0, ch0, ch1, ch1], rtol=1e-6)


def test_shortcut_strided_pjreddie():
    rng = np.random.default_rng(0)
    prev, big = rng.normal(size=(2, 2, 2, 3)).astype(np.float32), rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    # a larger `from` is read every 2nd cell, over the common 2 channels
    np.testing.assert_array_equal(shortcut.shortcut_strided_forward(prev, big), prev + big[:, :2, ::2, ::2])
    big_prev, small = rng.normal(size=(1, 1, 4, 6)).astype(np.float32), rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    # a smaller `from` is added to every 2nd cell
    expected = big_prev.copy()
    expected[:, :, ::2, ::2] += small[:, :1]
    np.testing.assert_array_equal(shortcut.shortcut_strided_forward(big_prev, small), expected)


def test_shortcut_rejects_wrong_weight_shapes():
    a = _chw([1, 2, 3, 4], 2)
    with pytest.raises(ValueError):
        shortcut.shortcut_forward(a, [a], np.ones(3, np.float32), "per_feature")
    with pytest.raises(ValueError):
        shortcut.shortcut_forward(a, [a], np.ones((2, 3), np.float32), "per_channel")


# ----------------------------------------------------------------------------------------------------------- route

def test_route_groups_take_a_channel_slice():
    x = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)  # channel k holds k
    y = np.arange(10, 16, dtype=np.float32).reshape(1, 6, 1, 1)
    np.testing.assert_array_equal(route.route_forward([x], 2, 1).reshape(-1), [2, 3])
    np.testing.assert_array_equal(route.route_forward([x, y], 2, 0).reshape(-1), [0, 1, 10, 11, 12])
    np.testing.assert_array_equal(route.route_forward([y, x]).reshape(-1), [10, 11, 12, 13, 14, 15, 0, 1, 2, 3])
    grads = route.route_backward(np.array([7, 8, 9, 9, 9], np.float32).reshape(1, 5, 1, 1), [x.shape, y.shape], 2, 0)
    np.testing.assert_array_equal(grads[0].reshape(-1), [7, 8, 0, 0])
    np.testing.assert_array_equal(grads[1].reshape(-1), [9, 9, 9, 0, 0, 0])


# -------------------------------------------------------------------------------------------------------- upsample

def test_upsample_nearest_and_scale():
    x = _img([[1, 2], [3, 4]])
    np.testing.assert_array_equal(upsample.upsample_forward(x, 2)[0, 0],
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    np.testing.assert_array_equal(upsample.upsample_forward(x, 2, 0.5)[0, 0, ::2, ::2], [[0.5, 1], [1.5, 2]])


def test_upsample_negative_stride_sums_blocks():
    x = _img(np.arange(16).reshape(4, 4))
    # 2x2 block sums: 0+1+4+5, 2+3+6+7, 8+9+12+13, 10+11+14+15
    np.testing.assert_array_equal(upsample.upsample_forward(x, -2)[0, 0], [[10, 18], [42, 50]])
    np.testing.assert_array_equal(upsample.upsample_forward(x, -2, 0.5)[0, 0], [[5, 9], [21, 25]])
    x5 = _img(np.arange(25).reshape(5, 5))  # not a multiple of 2: the top-left 4x4 is used
    np.testing.assert_array_equal(upsample.upsample_forward(x5, -2)[0, 0], [[12, 20], [52, 60]])


# ----------------------------------------------------------------------------------------------------------- reorg

X16 = np.arange(16, dtype=np.float32)


def test_reorg3d_is_space_to_depth():
    x = X16.reshape(1, 1, 4, 4)
    out = reorg.reorg3d_forward(x, 2)
    assert out.shape == (1, 4, 2, 2)
    # channel dy*2 + dx holds x[dy::2, dx::2]
    np.testing.assert_array_equal(out[0], [[[0, 2], [8, 10]], [[1, 3], [9, 11]], [[4, 6], [12, 14]],
                                           [[5, 7], [13, 15]]])


def test_reorg_darknet_order():
    # [reorg] on (4, 2, 2), stride 2: Darknet reads the input as if (1, 4, 4) = X16 as a 4x4 image, writes that
    # image's 2x2 space-to-depth as a (4, 2, 2) block, and the result is then read as (16, 1, 1).
    x = X16.reshape(1, 4, 2, 2)
    out = reorg.reorg_forward(x, 2)
    assert out.shape == (1, 16, 1, 1)
    np.testing.assert_array_equal(out.reshape(-1), [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15])


def test_reorg_reverse_is_depth_to_space():
    x = np.array([1, 2, 3, 4], np.float32).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(reorg.reorg_forward(x, 2, reverse=True)[0, 0], [[1, 2], [3, 4]])
    z = np.random.default_rng(0).normal(size=(2, 3, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(reorg.reorg_forward(reorg.reorg3d_forward(z, 2), 2, reverse=True), z)


def test_reorg_rejects_bad_geometry():
    with pytest.raises(ValueError):
        reorg.reorg_forward(np.zeros((1, 3, 4, 4), np.float32), 2)  # 3 channels, stride^2 = 4
    with pytest.raises(ValueError):
        reorg.reorg3d_forward(np.zeros((1, 4, 5, 4), np.float32), 2)


# --------------------------------------------------------------------------------------------------------- softmax

def _softmax(v):
    e = np.exp(np.asarray(v, np.float64) - np.max(v))
    return e / e.sum()


def test_softmax_groups_and_temperature():
    v = np.array([1.0, 2.0, 0.5, -1.0], np.float32)
    x = v.reshape(1, 4, 1, 1)
    np.testing.assert_allclose(softmax.softmax_forward(x).reshape(-1), _softmax(v), rtol=1e-6)
    np.testing.assert_allclose(softmax.softmax_forward(x, groups=2).reshape(-1),
                               np.concatenate([_softmax(v[:2]), _softmax(v[2:])]), rtol=1e-6)
    np.testing.assert_allclose(softmax.softmax_forward(x, temperature=2.0).reshape(-1), _softmax(v / 2), rtol=1e-6)


def test_softmax_flat_versus_spatial():
    v = np.array([1.0, 2.0, 3.0, 0.0], np.float32)
    x = v.reshape(1, 2, 1, 2)  # channel 0 = (1, 2), channel 1 = (3, 0)
    # Darknet's CPU softmax: over all four values of the sample
    np.testing.assert_allclose(softmax.softmax_forward(x).reshape(-1), _softmax(v), rtol=1e-6)
    # spatial: over the channels at each position: (1, 3) and (2, 0)
    sp = softmax.softmax_forward(x, spatial=True)
    np.testing.assert_allclose(sp[0, :, 0, 0], _softmax([1, 3]), rtol=1e-6)
    np.testing.assert_allclose(sp[0, :, 0, 1], _softmax([2, 0]), rtol=1e-6)


def test_softmax_cross_entropy_gradient():
    y = softmax.softmax_forward(np.array([[0.3, -1.0, 2.0]], np.float64).reshape(1, 3, 1, 1))
    t = np.array([0, 0, 1.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(softmax.softmax_cross_entropy_backward(y, t), y - t)
    assert softmax.softmax_cross_entropy_loss(y, t) == pytest.approx(-np.log(y[0, 2, 0, 0]))


# ------------------------------------------------------------------------------------------- scale_channels / sam

def test_scale_channels_per_channel_and_per_position():
    fmap = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    scales = np.array([2.0, -1.0], np.float32).reshape(1, 2, 1, 1)
    np.testing.assert_array_equal(scale_channels.scale_channels_forward(scales, fmap).reshape(-1),
                                  [0, 2, 4, 6, -4, -5, -6, -7])
    wh = np.array([1, 0, 10, -1], np.float32).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(scale_channels.scale_channels_forward(wh, fmap, scale_wh=True).reshape(-1),
                                  [0, 0, 20, -3, 4, 0, 60, -7])


def test_sam_is_elementwise():
    a = np.array([1, 2, 3, 4], np.float32).reshape(1, 1, 2, 2)
    b = np.array([0.5, -1, 2, 0], np.float32).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(sam.sam_forward(a, b).reshape(-1), [0.5, -2, 6, 0])


# --------------------------------------------------------------------------------------------------------- dropout

def test_dropout_training_mask():
    x = np.ones((4, 8, 16, 16), np.float32)
    out, mask = dropout.dropout_forward(x, 0.25, train=True, seed=7)
    kept = mask != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(out[kept], np.float32(1 / 0.75))
    assert np.all(out[~kept] == 0)
    _, mask2 = dropout.dropout_forward(x, 0.25, train=True, seed=7)  # same seed, same mask
    np.testing.assert_array_equal(mask, mask2)
    np.testing.assert_array_equal(dropout.dropout_backward(np.full_like(x, 2), mask), 2 * mask)
    assert dropout.dropout_forward(x, 0.25)[0] is x  # inference: identity


# ------------------------------------------------------------------------------------------------------------ crop

def test_crop_training_draws_offsets_and_flip():
    x = np.arange(2 * 6 * 7, dtype=np.float32).reshape(1, 2, 6, 7)
    out, (dh, dw, flipped) = crop.crop_forward(x, 3, 4, noadjust=True, flip=True, train=True,
                                               rng=np.random.default_rng(3))
    region = x[:, :, dh:dh + 3]
    expected = region[..., 7 - dw - 4:7 - dw][..., ::-1] if flipped else region[..., dw:dw + 4]
    np.testing.assert_array_equal(out, expected)
    assert 0 <= dh <= 3 and 0 <= dw <= 3


# -------------------------------------------------------------------------------------------------- yolo / region

def test_yolo_activations():
    classes = 2
    x = np.zeros((1, 2 * (5 + classes), 1, 1), np.float32)
    x[0, 2] = x[0, 3] = 1.5  # w, h of anchor 0: untouched
    out = yolo.yolo_forward(x, 2, classes)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.5, 0.5, 1.5, 1.5, 0.5, 0.5, 0.5] + [0.5, 0.5, 0, 0, 0.5, 0.5, 0.5])
    # scale_x_y 1.2: logistic then x*1.2 - 0.1; a large input saturates the logistic at 1 -> 1.1
    x[0, 0] = 40
    out = yolo.yolo_forward(x, 2, classes, scale_x_y=1.2)
    assert out[0, 0, 0, 0] == pytest.approx(1.1) and out[0, 1, 0, 0] == pytest.approx(0.5)
    # new_coords: no logistic anywhere, only the x, y affine step
    x2 = np.full((1, 5 + classes, 1, 1), 0.25, np.float32)
    out = yolo.yolo_forward(x2, 1, classes, scale_x_y=2.0, new_coords=True)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.25])


def test_region_activations():
    classes = 3
    v = np.array([0, 0, 1, 2, 0, 1, 2, 3], np.float32)  # x, y, w, h, obj, classes
    x = np.concatenate([v, v]).reshape(1, 16, 1, 1)
    out = yolo.region_forward(x, 2, classes, softmax=True)
    expected = np.concatenate([[0.5, 0.5, 1, 2, 0.5], _softmax([1, 2, 3])])
    np.testing.assert_allclose(out[0, :8, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, 8:, 0, 0], expected, rtol=1e-6)
    raw = yolo.region_forward(x, 2, classes, softmax=False)
    np.testing.assert_allclose(raw[0, 5:8, 0, 0], [1, 2, 3])  # no softmax: class values stay raw
