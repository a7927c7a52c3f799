"""Darknet's convolutional layer: forward (inference, with fused bias + activation) and backward.

Layout: x (N, C, H, W), weights (n, C/groups, kh, kw) as Darknet stores them, bias (n,), y (N, n, OH, OW); float32 for
inference, float64 works everywhere too (the gradient tests use it). Output size (per axis):
    out = (in + 2*pad - dilation*(k-1) - 1) // stride + 1
where `pad` is the zero padding in pixels on each side. Darknet's im2col pads by `padding*dilation` and sizes its output
as (in + 2*padding - k)/stride + 1; both agree whenever padding == (k-1)/2 (every `pad=1` cfg). For the other case pass
Darknet's size as out_h/out_w: positions past the input read zeros, as in Darknet.

Forward paths (chosen once per layer by `prepare_conv2d`, which also keeps the derived weight forms):
  - 1x1, stride 1, no padding, groups 1: GEMM on blocks of columns;
  - 3x3, stride 1, dilation 1, groups 1, >= 16 channels in and out: Winograd F(4x4, 3x3) (4x fewer multiplies
    than im2col): numba input transform, 36 GEMMs, numba output transform; on calls of at most 49 such tiles
    (13x13 or 26x26 at batch 1) F(2x2, 3x3) instead (16 GEMMs on wider blocks of columns);
  - one input channel per group (depthwise, any channel multiplier): direct numba kernels (3x3 unrolled; stride 2
    reads a parity-split copy of the plane, so every load is contiguous);
  - 3x3, dilation 1, groups 1, column stride 1 or 2, at most 3 input channels (a detector's first layer): a direct
    numba kernel on a padded, phase-split copy of the input (conv_direct; yolov3-tiny's 416 x 416 3 -> 16 layer,
    one thread: 7.5 ms with im2col + GEMM, 3.6 ms direct);
  - everything else: im2col + GEMM on blocks of output rows, per group.
GEMMs call BLAS from inside numba's parallel loops (darkprune.engine.blas), on a block that was just written and is
still in cache, followed by the bias + activation epilogue on the same block. Small layers run on one thread
(blas.threads_for). Scratch buffers are kept between calls (release_scratch() frees them).

This module holds the geometry, the path choice (Conv2dPlan) and the public forward/backward; the numba kernels
live in conv_gemm (im2col/1x1 GEMM forward, GEMM backward), conv_winograd, conv_depthwise and conv_direct.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from darkprune.engine.activations import CROSS_CHANNEL_CODES, LINEAR, activate_, activation_code
from darkprune.engine.blas import limit_threads, matmul, threads_for
from darkprune.engine.conv_depthwise import direct_1ch_backward, direct_1ch_forward, direct_1ch_scratch_elements
from darkprune.engine.conv_direct import direct3x3_forward, pad_split, padded_input
from darkprune.engine.conv_gemm import (
    batched_gemm,
    col2im_add,
    conv1x1_kernel,
    conv_backward_kernel,
    conv_im2col_kernel,
    im2col,
)
from darkprune.engine.conv_winograd import (
    wino2x2_filter_transform,
    wino2x2_input_transform,
    wino2x2_output_transform,
    wino_filter_transform,
    wino_input_long,
    wino_input_scratch_elements,
    wino_input_transform,
    wino_long_input_scratch_elements,
    wino_long_output_scratch_elements,
    wino_output_long,
    wino_output_scratch_elements,
    wino_output_transform,
)

# ----------------------------------------------------------------------------------------------------------------
# geometry and batch-norm folding


def conv_output_size(size_in: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    """Output extent along one axis: (in + 2*pad - dilation*(k-1) - 1) // stride + 1."""
    return (size_in + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def fold_batchnorm(weights, biases, scales, rolling_mean, rolling_variance, eps: float = 1e-5):
    """Fold inference batch-norm into the filters: returns (weights', bias') with

        conv(x, weights') + bias' == scales * (conv(x, weights) - mean) / sqrt(var + eps) + biases

    Darknet normalises with eps 1e-5 at inference; OpenCV's Darknet importer uses 1e-6. Works for conv weights
    (n, c, kh, kw) and connected weights (n, inputs) alike; the result has the dtype of `weights`.
    """
    w = np.asarray(weights)
    k = np.asarray(scales, np.float64) / np.sqrt(np.asarray(rolling_variance, np.float64) + eps)
    shape = (-1,) + (1,) * (w.ndim - 1)
    folded_w = (w.astype(np.float64) * k.reshape(shape)).astype(w.dtype)
    folded_b = (np.asarray(biases, np.float64) - np.asarray(rolling_mean, np.float64) * k).astype(w.dtype)
    return np.ascontiguousarray(folded_w), folded_b


# ----------------------------------------------------------------------------------------------------------------
# planning


PATH_GEMM_1X1 = "gemm1x1"
PATH_WINOGRAD = "winograd"
PATH_DIRECT_1CH = "depthwise"
PATH_IM2COL = "im2col"
PATH_DIRECT_3X3 = "direct3x3"
PATHS = (PATH_GEMM_1X1, PATH_WINOGRAD, PATH_DIRECT_1CH, PATH_IM2COL, PATH_DIRECT_3X3)
_DIRECT_3X3_MAX_CHANNELS = 3      # input channels up to which a 3x3 convolution runs conv_direct's kernel

_IM2COL_TARGET_COLS = 2048        # GEMM columns per im2col block
_IM2COL_MAX_SCRATCH = 8 << 20     # bytes of im2col scratch per thread
_WINOGRAD_MAX_SCRATCH = 6 << 20   # bytes of transformed input per batch chunk (the GEMM output needs as much again)
_WINOGRAD_MIN_TILES = 64          # ... but chunks of at least this many tiles (GEMM columns), for small images
_WINOGRAD_LONG_MIN_TILES = 8      # tiles per band from which the long-loop layout pays
_WINOGRAD_2X2_MAX_TILES = 49      # F(4x4) tiles per call up to which F(2x2) runs instead (conv_winograd's notes):
                                  # 13x13 and 26x26 at batch 1 (16, 49 tiles); at 64 and 128 (13x13 x 4, x 8) they
                                  # tie, and F(2x2)'s filters would only add memory
_BACKWARD_MAX_SCRATCH = 64 << 20  # bytes of im2col + col2im scratch per thread in the per-image backward

_scratch: dict = {}


def _thread_scratch(nthreads: int, elements: int, dtype) -> np.ndarray:
    """(nthreads, elements) scratch, reused across calls (grow-only, one per Python thread and dtype)."""
    key = (threading.get_ident(), "per-thread", np.dtype(dtype).str)
    buf = _scratch.get(key)
    if buf is None or buf.shape[0] < nthreads or buf.shape[1] < elements:
        rows = max(nthreads, 0 if buf is None else buf.shape[0])
        cols = max(elements, 0 if buf is None else buf.shape[1])
        buf = np.empty((rows, cols), dtype=dtype)
        _scratch[key] = buf
    return buf


def _named_scratch(name: str, elements: int, dtype) -> np.ndarray:
    """A reusable 1-D buffer of at least `elements` (grow-only, per Python thread, name and dtype)."""
    key = (threading.get_ident(), name, np.dtype(dtype).str)
    buf = _scratch.get(key)
    if buf is None or buf.shape[0] < elements:
        buf = np.empty(elements, dtype=dtype)
        _scratch[key] = buf
    return buf[:elements]


def release_scratch() -> None:
    """Free the per-thread scratch buffers the forward kernels keep between calls."""
    _scratch.clear()


def _check_array(a, what, ndim=None):
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be a float32/float64 numpy array")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {a.shape}")


class Conv2dPlan:
    """A convolutional layer ready to run: derived weight forms computed once, the fastest path chosen.

    Build with `prepare_conv2d`; call `plan(x)` (or `plan.forward(x, out=...)`). Holds its own copies of the
    weights: rebuild it after changing them.
    """

    def __init__(self, weights, bias, stride_x=1, stride_y=1, pad=0, dilation=1, groups=1, activation="linear",
                 path=None):
        _check_array(weights, "weights", 4)
        self.dtype = weights.dtype
        self.weights = np.ascontiguousarray(weights)
        n, cg, kh, kw = self.weights.shape
        if bias is None:
            bias = np.zeros(n, self.dtype)
        self.bias = np.ascontiguousarray(np.asarray(bias, dtype=self.dtype).reshape(-1))
        if self.bias.shape[0] != n:
            raise ValueError(f"bias has {self.bias.shape[0]} entries for {n} filters")
        if groups < 1 or n % groups:
            raise ValueError(f"{n} filters do not split into {groups} groups")
        if stride_x < 1 or stride_y < 1 or dilation < 1 or pad < 0:
            raise ValueError("stride and dilation must be >= 1 and pad >= 0")
        self.n, self.cg, self.kh, self.kw = n, cg, kh, kw
        self.c = cg * groups
        self.stride_x, self.stride_y = int(stride_x), int(stride_y)
        self.pad, self.dilation, self.groups = int(pad), int(dilation), int(groups)
        self.activation = activation
        self.code = activation_code(activation)
        self.fused_code = LINEAR if self.code in CROSS_CHANNEL_CODES else self.code
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown convolution path {path!r}")
        self.path = path or self._choose_path()
        self.w2d = self.weights.reshape(n, cg * kh * kw)
        self.wino_u = None
        self._wino_u2 = None               # F(2x2)'s filters, made on the first call that runs it
        if self.path == PATH_WINOGRAD:
            if not (kh == kw == 3 and self.stride_x == self.stride_y == 1 and self.dilation == 1 and groups == 1):
                raise ValueError("the Winograd path needs a 3x3, stride 1, dilation 1, ungrouped convolution")
            self.wino_u = np.empty((36, n, cg), dtype=self.dtype)
            wino_filter_transform(self.weights, self.wino_u)
        elif self.path == PATH_DIRECT_3X3 and not self._direct_3x3_fits():
            raise ValueError("the direct 3x3 path needs an ungrouped, undilated 3x3 convolution of column stride 1 "
                             "or 2")
        elif self.path == PATH_DIRECT_1CH and cg != 1:
            raise ValueError("the depthwise path needs one input channel per group")
        elif self.path == PATH_GEMM_1X1 and not (kh == kw == 1 and self.stride_x == self.stride_y == 1
                                                  and self.pad == 0 and groups == 1):
            raise ValueError("the 1x1 GEMM path needs a 1x1, stride 1, unpadded, ungrouped convolution")

    def _choose_path(self):
        if self.cg == 1 and self.groups > 1:
            return PATH_DIRECT_1CH
        if self.groups == 1 and self.kh == self.kw == 1 and self.stride_x == self.stride_y == 1 and self.pad == 0:
            return PATH_GEMM_1X1
        if (self.groups == 1 and self.kh == self.kw == 3 and self.stride_x == self.stride_y == 1
                and self.dilation == 1 and self.pad <= 2 and self.c >= 16 and self.n >= 16):
            return PATH_WINOGRAD
        if self._direct_3x3_fits() and self.c <= _DIRECT_3X3_MAX_CHANNELS:
            return PATH_DIRECT_3X3
        return PATH_IM2COL

    def _direct_3x3_fits(self):
        return self.groups == 1 and self.kh == self.kw == 3 and self.dilation == 1 and self.stride_x in (1, 2)

    def output_shape(self, x_shape, out_h=None, out_w=None):
        nb, c, h, w = x_shape
        oh = conv_output_size(h, self.kh, self.stride_y, self.pad, self.dilation) if out_h is None else int(out_h)
        ow = conv_output_size(w, self.kw, self.stride_x, self.pad, self.dilation) if out_w is None else int(out_w)
        return nb, self.n, oh, ow

    def __call__(self, x, out=None, out_h=None, out_w=None):
        return self.forward(x, out=out, out_h=out_h, out_w=out_w)

    def forward(self, x, out=None, out_h=None, out_w=None):
        """y = act(conv(x) + bias) for x (N, C, H, W); `out` (C-contiguous, right shape/dtype) is filled if given."""
        if x.ndim != 4 or x.shape[1] != self.c:
            raise ValueError(f"input of shape {x.shape} for a convolution over {self.c} channels")
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        x = np.ascontiguousarray(x)
        nb, n, oh, ow = self.output_shape(x.shape, out_h, out_w)
        if oh < 1 or ow < 1:
            raise ValueError(f"convolution of a {x.shape[2]}x{x.shape[3]} input gives an empty output")
        if out is None:
            y = np.empty((nb, n, oh, ow), dtype=self.dtype)
        else:
            y = out
            if y.shape != (nb, n, oh, ow) or y.dtype != self.dtype or not y.flags.c_contiguous:
                raise ValueError(f"out must be C-contiguous {self.dtype} of shape {(nb, n, oh, ow)}")
        if nb == 0:
            return y
        with limit_threads(self._threads_for(x.shape, oh, ow)):
            return self._run(x, y, oh, ow)

    def _threads_for(self, x_shape, oh, ow):
        nb, c, h, w = x_shape
        outputs = nb * self.n * oh * ow
        flops = 2.0 * outputs * self.cg * self.kh * self.kw
        if self.path == PATH_WINOGRAD:
            flops /= 2.25
        itemsize = np.dtype(self.dtype).itemsize
        return threads_for(flops, (nb * c * h * w + 2 * outputs) * itemsize)

    def _run(self, x, y, oh, ow):
        path = self.path
        standard = (oh == conv_output_size(x.shape[2], self.kh, self.stride_y, self.pad, self.dilation)
                    and ow == conv_output_size(x.shape[3], self.kw, self.stride_x, self.pad, self.dilation))
        if not standard and path in (PATH_GEMM_1X1, PATH_WINOGRAD):
            path = PATH_IM2COL
        if path == PATH_GEMM_1X1:
            self._forward_1x1(x, y)
        elif path == PATH_WINOGRAD:
            self._forward_winograd(x, y)
        elif path == PATH_DIRECT_3X3:
            self._forward_direct_3x3(x, y)
        elif path == PATH_DIRECT_1CH:
            elements = direct_1ch_scratch_elements(x.shape[2], x.shape[3], oh, ow, self.kh, self.kw, self.stride_y,
                                                    self.stride_x, self.pad, self.dilation)
            ws = _thread_scratch(numba.get_num_threads(), elements, self.dtype)
            direct_1ch_forward(x, self.weights, self.bias, self.stride_y, self.stride_x, self.pad, self.dilation,
                                oh, ow, self.fused_code, y, ws)
        else:
            self._forward_im2col(x, y)
        if self.code in CROSS_CHANNEL_CODES:
            activate_(y, self.code)
        return y

    # -- paths ---------------------------------------------------------------------------------------------------

    def _forward_1x1(self, x, y):
        nb, c, h, w = x.shape
        s = h * w
        threads = numba.get_num_threads()
        # enough jobs to balance the threads, blocks wide enough to keep the GEMM efficient
        cols = max(256, min(_IM2COL_TARGET_COLS, -(-nb * s // (2 * threads))))
        cols = min(s, ((cols + 15) // 16) * 16)
        conv1x1_kernel(x.reshape(nb, c, s), self.w2d, self.bias, self.fused_code, y.reshape(nb, self.n, s), cols)

    def _forward_direct_3x3(self, x, y):
        nb, oh, ow = x.shape[0], y.shape[2], y.shape[3]
        xp = padded_input(x.shape, self.pad, self.stride_y, self.stride_x, oh, ow, self.dtype)
        pad_split(x, self.pad, xp)
        # about four jobs per thread (rows of one image each), so that the threads finish together
        rows = max(1, min(oh, nb * oh // (4 * numba.get_num_threads())))
        direct3x3_forward(xp, self.weights, self.bias, self.stride_y, oh, ow, self.fused_code, y, rows)

    def _forward_im2col(self, x, y):
        nb = x.shape[0]
        oh, ow = y.shape[2], y.shape[3]
        kg = self.w2d.shape[1]
        threads = numba.get_num_threads()
        itemsize = np.dtype(self.dtype).itemsize
        target = max(ow, min(_IM2COL_TARGET_COLS, -(-nb * oh * ow // (2 * threads))))
        target = max(ow, min(target, _IM2COL_MAX_SCRATCH // (kg * itemsize)))
        rows = max(1, min(oh, target // ow))
        ws = _thread_scratch(threads, kg * rows * ow, self.dtype)
        conv_im2col_kernel(x, self.w2d, self.bias, self.groups, self.kh, self.kw, self.stride_y, self.stride_x,
                            self.pad, self.dilation, oh, ow, self.fused_code, y, rows, ws)

    def _winograd_2x2_filters(self):
        # two threads arriving together may both compute them: the same array either way, so no lock is needed
        u2 = self._wino_u2
        if u2 is None:
            u2 = np.empty((16, self.n, self.cg), dtype=self.dtype)
            wino2x2_filter_transform(self.weights, u2)
            self._wino_u2 = u2
        return u2

    def _forward_winograd_2x2(self, x, y):
        nb = x.shape[0]
        oh, ow = y.shape[2], y.shape[3]
        th, tw = (oh + 1) // 2, (ow + 1) // 2
        tiles = nb * th * tw
        v = _named_scratch("wino2_v", 16 * self.c * tiles, self.dtype).reshape(16, self.c, tiles)
        m = _named_scratch("wino2_m", 16 * self.n * tiles, self.dtype).reshape(16, self.n, tiles)
        wino2x2_input_transform(x, self.pad, th, tw, v)
        batched_gemm(self._winograd_2x2_filters(), v, m, tiles)    # 16 jobs: enough to balance the threads
        wino2x2_output_transform(m, self.bias, th, tw, self.fused_code, y)

    def _forward_winograd(self, x, y):
        nb = x.shape[0]
        oh, ow = y.shape[2], y.shape[3]
        th = (oh + 3) // 4
        tw = (ow + 3) // 4
        if nb * th * tw <= _WINOGRAD_2X2_MAX_TILES:
            self._forward_winograd_2x2(x, y)
            return
        threads = numba.get_num_threads()
        itemsize = np.dtype(self.dtype).itemsize
        # Wide images: one dummy tile per band buys long vector loops in the transforms (it costs 1/tw more GEMM
        # columns, so narrow images keep the compact layout)
        long_loops = tw >= _WINOGRAD_LONG_MIN_TILES
        per_band = tw + 1 if long_loops else tw
        per_image = 36 * max(self.c, self.n) * th * per_band * itemsize
        per_image_tiles = th * per_band
        chunk = max(1, min(nb, max(_WINOGRAD_MAX_SCRATCH // per_image, -(-_WINOGRAD_MIN_TILES // per_image_tiles))))
        for b0 in range(0, nb, chunk):
            b1 = min(nb, b0 + chunk)
            tiles = (b1 - b0) * th * per_band
            v = _named_scratch("wino_v", 36 * self.c * tiles, self.dtype).reshape(36, self.c, tiles)
            m = _named_scratch("wino_m", 36 * self.n * tiles, self.dtype).reshape(36, self.n, tiles)
            if long_loops:
                ws = _thread_scratch(threads, max(wino_long_input_scratch_elements(th, tw),
                                                  wino_long_output_scratch_elements(th, tw)), self.dtype)
                wino_input_long(x[b0:b1], self.pad, th, tw, v, ws)
            else:
                ws = _thread_scratch(threads, max(wino_input_scratch_elements(th, tw),
                                                  wino_output_scratch_elements(tw)), self.dtype)
                wino_input_transform(x[b0:b1], self.pad, th, tw, v, ws)
            # 36 GEMMs: split columns only when there are too few to keep every thread busy
            gemm_blocks = max(1, -(-2 * threads // 36))
            cols = max(64, -(-tiles // gemm_blocks))
            batched_gemm(self.wino_u, v, m, cols)
            if long_loops:
                wino_output_long(m, self.bias, th, tw, self.fused_code, y[b0:b1], ws)
            else:
                wino_output_transform(m, self.bias, th, tw, self.fused_code, y[b0:b1], ws)


def prepare_conv2d(weights, bias=None, stride_x=1, stride_y=1, pad=0, dilation=1, groups=1, activation="linear",
                   path=None) -> Conv2dPlan:
    """Build a Conv2dPlan (see its doc). `path` forces a forward path (tests/benchmarks): one of PATHS."""
    return Conv2dPlan(weights, bias, stride_x, stride_y, pad, dilation, groups, activation, path)


def conv2d_forward(x, weights, bias=None, stride_x=1, stride_y=1, pad=0, dilation=1, groups=1, *,
                   activation="linear", out_h=None, out_w=None, out=None, path=None):
    """y = act(conv(x, weights) + bias), x (N, C, H, W), weights (n, C/groups, kh, kw).

    One-shot form of `prepare_conv2d(...)(x)`; for repeated inference keep the plan (it caches the Winograd filters).
    """
    _check_array(x, "x", 4)
    plan = Conv2dPlan(weights, bias, stride_x, stride_y, pad, dilation, groups, activation, path)
    return plan.forward(x, out=out, out_h=out_h, out_w=out_w)


# ----------------------------------------------------------------------------------------------------------------
# backward


def conv2d_backward(x, weights, grad_y, stride_x=1, stride_y=1, pad=0, dilation=1, groups=1, *,
                    need_grad_x=True):
    """Gradients of y = conv(x, weights) + bias (pre-activation) given dL/dy.

    Returns (grad_x, grad_w, grad_b); grad_x is None when need_grad_x is False (a network's first layer).
    """
    _check_array(x, "x", 4)
    _check_array(weights, "weights", 4)
    _check_array(grad_y, "grad_y", 4)
    dtype = x.dtype
    weights = np.ascontiguousarray(weights, dtype=dtype)
    x = np.ascontiguousarray(x)
    grad_y = np.ascontiguousarray(grad_y, dtype=dtype)
    nb, c, h, w = x.shape
    n, cg, kh, kw = weights.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    if grad_y.shape[:2] != (nb, n) or cg * groups != c:
        raise ValueError(f"shapes do not match: x {x.shape}, weights {weights.shape}, grad_y {grad_y.shape}, "
                         f"groups {groups}")
    grad_b = grad_y.sum(axis=(0, 2, 3))
    itemsize = np.dtype(dtype).itemsize
    s = oh * ow
    flops = 4.0 * nb * n * cg * kh * kw * s
    threads = threads_for(flops, (2 * x.size + 2 * grad_y.size) * itemsize)
    with limit_threads(threads):
        threads = numba.get_num_threads()
        if cg == 1 and groups > 1:
            gx = np.zeros_like(x)
            gw_partial = np.empty((nb, n, kh, kw), dtype=dtype)
            hp = max(h + 2 * pad, (oh - 1) * stride_y + (kh - 1) * dilation + 1)
            wp = max(w + 2 * pad, (ow - 1) * stride_x + (kw - 1) * dilation + 1)
            plane = max(hp * wp, 4 * ((hp + 1) // 2 + 1) * ((wp + 1) // 2 + 1))
            ws = _thread_scratch(threads, 2 * plane + oh * wp + 8, dtype)
            direct_1ch_backward(x, weights, grad_y, stride_y, stride_x, pad, dilation, gx, gw_partial, ws)
            return (gx if need_grad_x else None), gw_partial.sum(axis=0).reshape(n, 1, kh, kw), grad_b
        ng = n // groups
        kk = cg * kh * kw
        w2d = weights.reshape(n, kk)
        one_by_one = kh == kw == 1 and stride_x == stride_y == 1 and pad == 0 and oh == h and ow == w
        grad_x = np.zeros_like(x) if need_grad_x else np.zeros((1, 1, 1, 1), dtype=dtype)
        if nb >= threads and 2 * kk * s * itemsize <= _BACKWARD_MAX_SCRATCH:
            # one job per image; each thread accumulates its own filter gradient
            ws = _thread_scratch(threads, 1 if one_by_one else 2 * kk * s, dtype)
            gw_partial = np.zeros((threads, n, kk), dtype=dtype)
            conv_backward_kernel(x, w2d, grad_y, groups, kh, kw, stride_y, stride_x, pad, dilation, one_by_one,
                                  need_grad_x, grad_x, gw_partial, ws)
            grad_w2d = gw_partial.sum(axis=0)
        else:
            # few (large) images: parallel inside each step
            grad_w2d = np.zeros((n, kk), dtype=dtype)
            col = np.empty((kk, s), dtype=dtype)
            dcol = np.empty((kk, s), dtype=dtype) if need_grad_x else None
            for b in range(nb):
                for g in range(groups):
                    gy = grad_y[b, g * ng:(g + 1) * ng].reshape(ng, s)
                    if one_by_one:
                        xcol = x[b, g * cg:(g + 1) * cg].reshape(cg, s)
                    else:
                        im2col(x, b, g * cg, cg, kh, kw, stride_y, stride_x, pad, dilation, oh, ow, col, 0, s)
                        xcol = col
                    matmul(gy, xcol, grad_w2d[g * ng:(g + 1) * ng], trans_b=True, beta=1.0)
                    if need_grad_x:
                        if one_by_one:
                            matmul(w2d[g * ng:(g + 1) * ng], gy, grad_x[b, g * cg:(g + 1) * cg].reshape(cg, s),
                                   trans_a=True, beta=1.0)
                        else:
                            matmul(w2d[g * ng:(g + 1) * ng], gy, dcol, trans_a=True)
                            col2im_add(dcol, b, g * cg, cg, kh, kw, stride_y, stride_x, pad, dilation, oh, ow,
                                        grad_x)
    return (grad_x if need_grad_x else None), grad_w2d.reshape(n, cg, kh, kw), grad_b
