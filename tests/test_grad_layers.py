"""Backward passes of the non-conv layer kernels against central finite differences, in float64 on small random
shapes, for every input and weight. The loss is L = sum(forward(...) * R) for a fixed random R, so dL/dout = R."""
import numpy as np
import pytest

from darkprune.engine import crop, dropout, pool, reorg, route, sam, scale_channels, shortcut, softmax, upsample, yolo

from conftest import central_grad

EPS = 1e-6


def _numeric_grad(loss, arrays, which):
    """Central differences of loss() w.r.t. arrays[which] (perturbed in place)."""
    return central_grad(loss, arrays[which], EPS)


def _check(forward, arrays, analytic, rtol=1e-6, atol=1e-8):
    """forward() uses `arrays` (a list, perturbed in place); analytic: {index in arrays: gradient}."""
    out = forward()
    r = np.random.default_rng(99).normal(size=out.shape)

    def loss():
        return float((forward() * r).sum())

    grads = analytic(r)
    for which, g in grads.items():
        num = _numeric_grad(loss, arrays, which)
        assert g.shape == arrays[which].shape
        np.testing.assert_allclose(g, num, rtol=rtol, atol=atol, err_msg=f"input {which}")


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


# --------------------------------------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("size,sx,sy,pad,h,w", [(2, 2, 2, 1, 5, 6), (2, 1, 1, 1, 4, 5), (3, 2, 1, 2, 5, 5),
                                                (3, 1, 1, 2, 4, 4), (3, 2, 2, 1, 6, 5)])
def test_maxpool_grad(kernels, size, sx, sy, pad, h, w):
    arrays = [_rand(2, 2, h, w, seed=size + h)]
    fwd = lambda: pool.maxpool_forward(arrays[0], size, sx, sy, pad)  # noqa: E731

    def analytic(r):
        _, idx = pool.maxpool_forward(arrays[0], size, sx, sy, pad, return_indices=True)
        return {0: pool.maxpool_backward(r, idx, arrays[0].shape)}

    _check(fwd, arrays, analytic)


def test_maxpool_depth_grad():
    arrays = [_rand(2, 6, 3, 4)]
    fwd = lambda: pool.maxpool_depth_forward(arrays[0], 2)  # noqa: E731

    def analytic(r):
        _, idx = pool.maxpool_depth_forward(arrays[0], 2, return_indices=True)
        return {0: pool.maxpool_backward(r, idx, arrays[0].shape)}

    _check(fwd, arrays, analytic)


def test_avgpool_grad():
    arrays = [_rand(2, 3, 4, 5)]
    _check(lambda: pool.avgpool_forward(arrays[0]), arrays,
           lambda r: {0: pool.avgpool_backward(r, arrays[0].shape)})


@pytest.mark.parametrize("size,sx,sy,pad", [(2, 1, 1, 1), (3, 2, 2, 2), (3, 2, 1, 1), (2, 2, 2, 0)])
def test_local_avgpool_grad(kernels, size, sx, sy, pad):
    arrays = [_rand(2, 2, 5, 6)]
    _check(lambda: pool.local_avgpool_forward(arrays[0], size, sx, sy, pad), arrays,
           lambda r: {0: pool.local_avgpool_backward(r, arrays[0].shape, size, sx, sy, pad)})


# -------------------------------------------------------------------------------------------------------- shortcut

@pytest.mark.parametrize("from_channels", [(3,), (2,), (5,), (3, 2), (4, 3, 1)])
def test_shortcut_grad_unweighted(from_channels):
    arrays = [_rand(2, 3, 3, 4)] + [_rand(2, c, 3, 4, seed=i + 1) for i, c in enumerate(from_channels)]
    fwd = lambda: shortcut.shortcut_forward(arrays[0], arrays[1:])  # noqa: E731

    def analytic(r):
        gp, gf, gw = shortcut.shortcut_backward(r, arrays[0], arrays[1:])
        assert gw is None
        return {0: gp, **{i + 1: g for i, g in enumerate(gf)}}

    _check(fwd, arrays, analytic)


@pytest.mark.parametrize("weights_type", ["per_feature", "per_channel"])
@pytest.mark.parametrize("normalization", ["none", "relu", "softmax"])
def test_shortcut_grad_weighted(weights_type, normalization):
    c, n_from = 3, 2
    rng = np.random.default_rng(5)
    shape = (n_from + 1,) if weights_type == "per_feature" else (n_from + 1, c)
    w = rng.uniform(0.2, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)  # away from relu's kink at 0
    arrays = [_rand(2, c, 2, 3), _rand(2, c, 2, 3, seed=1), _rand(2, 2, 2, 3, seed=2), w]
    fwd = lambda: shortcut.shortcut_forward(arrays[0], arrays[1:3], arrays[3], weights_type,  # noqa: E731
                                            normalization)

    def analytic(r):
        gp, gf, gw = shortcut.shortcut_backward(r, arrays[0], arrays[1:3], arrays[3], weights_type, normalization)
        return {0: gp, 1: gf[0], 2: gf[1], 3: gw}

    _check(fwd, arrays, analytic)


@pytest.mark.parametrize("prev_shape,from_shape", [((2, 2, 2, 3), (2, 3, 4, 6)), ((1, 3, 4, 6), (1, 2, 2, 3))])
def test_shortcut_strided_grad(prev_shape, from_shape):
    arrays = [_rand(*prev_shape), _rand(*from_shape, seed=1)]

    def analytic(r):
        gp, gf = shortcut.shortcut_strided_backward(r, from_shape)
        return {0: gp, 1: gf}

    _check(lambda: shortcut.shortcut_strided_forward(arrays[0], arrays[1]), arrays, analytic)


# ----------------------------------------------------------------------------------------------------------- route

@pytest.mark.parametrize("groups,group_id", [(1, 0), (2, 1), (2, 0)])
def test_route_grad(groups, group_id):
    arrays = [_rand(2, 4, 2, 3), _rand(2, 6, 2, 3, seed=1)]
    fwd = lambda: route.route_forward(arrays, groups, group_id)  # noqa: E731

    def analytic(r):
        g = route.route_backward(r, [a.shape for a in arrays], groups, group_id)
        return {0: g[0], 1: g[1]}

    _check(fwd, arrays, analytic)


# -------------------------------------------------------------------------------------------------------- upsample

@pytest.mark.parametrize("stride,scale,h,w", [(2, 1.0, 3, 4), (3, 0.5, 2, 3), (-2, 1.0, 4, 6), (-2, 0.7, 5, 7),
                                              (-3, 1.0, 6, 6)])
def test_upsample_grad(stride, scale, h, w):
    arrays = [_rand(2, 2, h, w)]
    _check(lambda: upsample.upsample_forward(arrays[0], stride, scale), arrays,
           lambda r: {0: upsample.upsample_backward(r, arrays[0].shape, stride, scale)})


# ----------------------------------------------------------------------------------------------------------- reorg

@pytest.mark.parametrize("kind,stride,reverse,shape", [("reorg", 2, False, (2, 4, 4, 6)),
                                                       ("reorg", 2, True, (2, 8, 2, 3)),
                                                       ("reorg3d", 2, False, (2, 3, 4, 6)),
                                                       ("reorg3d", 2, True, (1, 16, 2, 2)),
                                                       ("reorg", 3, False, (1, 9, 3, 6))])
def test_reorg_grad(kind, stride, reverse, shape):
    fwd_fn = reorg.reorg_forward if kind == "reorg" else reorg.reorg3d_forward
    bwd_fn = reorg.reorg_backward if kind == "reorg" else reorg.reorg3d_backward
    arrays = [_rand(*shape)]
    _check(lambda: fwd_fn(arrays[0], stride, reverse), arrays,
           lambda r: {0: bwd_fn(r, arrays[0].shape, stride, reverse)})


# --------------------------------------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("groups,temperature,spatial", [(1, 1.0, False), (2, 1.0, False), (3, 0.5, False),
                                                        (1, 2.0, False), (1, 1.0, True)])
def test_softmax_grad(groups, temperature, spatial):
    arrays = [_rand(2, 3, 2, 2)]
    fwd = lambda: softmax.softmax_forward(arrays[0], groups, temperature, spatial)  # noqa: E731

    def analytic(r):
        y = softmax.softmax_forward(arrays[0], groups, temperature, spatial)
        return {0: softmax.softmax_backward(r, y, groups, temperature, spatial)}

    _check(fwd, arrays, analytic)


@pytest.mark.parametrize("groups,temperature", [(1, 1.0), (2, 0.5)])
def test_softmax_cross_entropy_grad(groups, temperature):
    x = _rand(2, 6, 1, 1)
    truth = np.abs(_rand(2, 6, 1, 1, seed=3))
    truth = (truth.reshape(2 * groups, -1) / truth.reshape(2 * groups, -1).sum(axis=1, keepdims=True)).reshape(
        truth.shape)  # each group's labels sum to 1 (smoothed labels)
    loss = lambda: softmax.softmax_cross_entropy_loss(softmax.softmax_forward(x, groups, temperature),  # noqa: E731
                                                      truth)
    y = softmax.softmax_forward(x, groups, temperature)
    analytic = softmax.softmax_cross_entropy_backward(y, truth, groups, temperature)
    np.testing.assert_allclose(analytic, _numeric_grad(loss, [x], 0), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------- scale_channels / sam

@pytest.mark.parametrize("scale_wh", [False, True])
def test_scale_channels_grad(scale_wh):
    fmap = _rand(2, 3, 2, 4)
    scales = _rand(2, 1, 2, 4, seed=1) if scale_wh else _rand(2, 3, 1, 1, seed=1)
    arrays = [scales, fmap]
    fwd = lambda: scale_channels.scale_channels_forward(arrays[0], arrays[1], scale_wh)  # noqa: E731

    def analytic(r):
        gp, gf = scale_channels.scale_channels_backward(r, arrays[0], arrays[1], scale_wh)
        return {0: gp, 1: gf}

    _check(fwd, arrays, analytic)


def test_sam_grad():
    arrays = [_rand(2, 3, 2, 4), _rand(2, 3, 2, 4, seed=1)]

    def analytic(r):
        gp, gf = sam.sam_backward(r, arrays[0], arrays[1])
        return {0: gp, 1: gf}

    _check(lambda: sam.sam_forward(arrays[0], arrays[1]), arrays, analytic)


# -------------------------------------------------------------------------------------------------- dropout / crop

def test_dropout_grad():
    x0 = _rand(2, 3, 4, 4)
    _, mask = dropout.dropout_forward(x0, 0.3, train=True, seed=1)
    arrays = [x0]
    _check(lambda: arrays[0] * mask, arrays, lambda r: {0: dropout.dropout_backward(r, mask)})
    np.testing.assert_array_equal(dropout.dropout_forward(x0, 0.3, train=True, seed=1)[0], x0 * mask)


@pytest.mark.parametrize("train,noadjust", [(False, False), (True, True)])
def test_crop_grad(train, noadjust):
    arrays = [_rand(2, 2, 6, 7)]
    _, params = crop.crop_forward(arrays[0], 3, 4, noadjust, flip=True, train=train, rng=np.random.default_rng(1))

    def fwd():  # replay the same offsets and flip
        return crop.crop_forward(arrays[0], 3, 4, noadjust, flip=True, train=train,
                                 rng=np.random.default_rng(1))[0]

    _check(fwd, arrays, lambda r: {0: crop.crop_backward(r, arrays[0].shape, params, noadjust)})


# -------------------------------------------------------------------------------------------------- yolo / region

@pytest.mark.parametrize("scale_x_y,new_coords", [(1.0, False), (1.2, False), (2.0, True)])
def test_yolo_grad(kernels, scale_x_y, new_coords):
    classes = 2
    arrays = [_rand(2, 2 * (5 + classes), 2, 3)]
    fwd = lambda: yolo.yolo_forward(arrays[0], 2, classes, scale_x_y, new_coords)  # noqa: E731
    _check(fwd, arrays, lambda r: {0: yolo.yolo_backward(r, fwd(), 2, classes, scale_x_y, new_coords)})


@pytest.mark.parametrize("softmax_on", [True, False])
def test_region_grad(kernels, softmax_on):
    classes = 3
    arrays = [_rand(2, 2 * (5 + classes), 2, 3)]
    fwd = lambda: yolo.region_forward(arrays[0], 2, classes, 4, softmax_on)  # noqa: E731
    _check(fwd, arrays, lambda r: {0: yolo.region_backward(r, fwd(), 2, classes, 4, softmax_on)})
