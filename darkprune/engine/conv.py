"""Darknet's convolutional layer: forward (inference, with fused bias + activation) and backward.

Layout: x (N, C, H, W), weights (n, C/groups, kh, kw) as Darknet stores them, bias (n,), y (N, n, OH, OW); float32 for
inference, float64 works everywhere too (the gradient tests use it). Output size (per axis):
    out = (in + 2*pad - dilation*(k-1) - 1) // stride + 1
where `pad` is the zero padding in pixels on each side. Darknet's im2col pads by `padding*dilation` and sizes its output
as (in + 2*padding - k)/stride + 1; both agree whenever padding == (k-1)/2 (every `pad=1` cfg). For the other case pass
Darknet's size as out_h/out_w: positions past the input read zeros, as in Darknet.

Forward paths (chosen once per layer by `prepare_conv2d`, which also keeps the derived weight forms):
  - 1x1, stride 1, no padding, groups 1: GEMM on blocks of columns;
  - 3x3, stride 1, dilation 1, groups 1, >= 16 channels in and out: Winograd F(4x4, 3x3) (2.25x fewer multiplies
    than im2col): numba input transform, 36 GEMMs, numba output transform;
  - one input channel per group (depthwise, any channel multiplier): direct numba kernels (3x3 unrolled; stride 2
    reads a parity-split copy of the plane, so every load is contiguous);
  - everything else: im2col + GEMM on blocks of output rows, per group.
GEMMs call BLAS from inside numba's parallel loops (darkprune.engine.blas), on a block that was just written and is
still in cache, followed by the bias + activation epilogue on the same block. Small layers run on one thread
(blas.threads_for). Scratch buffers are kept between calls (release_scratch() frees them).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

from darkprune.engine.activations import (
    CROSS_CHANNEL_CODES,
    LINEAR,
    activate_,
    activation_code,
    bias_act_row,
    typed,
)
from darkprune.engine.blas import gemm, limit_threads, matmul, threads_for

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
# numba kernels: im2col / col2im


@njit(cache=True, inline="always")
def _valid_range(out_len, stride, offset, in_len):
    """[lo, hi) of output indices o with 0 <= o*stride + offset < in_len."""
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi_num = in_len - 1 - offset
    if hi_num < 0:
        return 0, 0
    hi = hi_num // stride + 1
    if hi > out_len:
        hi = out_len
    if lo > hi:
        lo = hi
    return lo, hi


@njit(cache=True, parallel=True, nogil=True)
def _im2col(x, b, c0, cg, kh, kw, sy, sx, pad, dil, oh, ow, col, col_off, col_ld):
    """col[row, col_off + oy*ow + ox] = x[b, c0 + c, oy*sy - pad + ky*dil, ox*sx - pad + kx*dil] (0 outside),
    row = (c*kh + ky)*kw + kx. col_ld is col's row length (images may be packed side by side)."""
    h = x.shape[2]
    w = x.shape[3]
    nrows = cg * kh * kw
    for row in prange(nrows):
        c = row // (kh * kw)
        ky = (row // kw) % kh
        kx = row % kw
        xoff = kx * dil - pad
        ox_lo, ox_hi = _valid_range(ow, sx, xoff, w)
        for oy in range(oh):
            iy = oy * sy - pad + ky * dil
            base = col_off + oy * ow
            if iy < 0 or iy >= h:
                for ox in range(ow):
                    col[row, base + ox] = 0.0
                continue
            for ox in range(ox_lo):
                col[row, base + ox] = 0.0
            if sx == 1:
                for ox in range(ox_lo, ox_hi):
                    col[row, base + ox] = x[b, c0 + c, iy, ox + xoff]
            else:
                for ox in range(ox_lo, ox_hi):
                    col[row, base + ox] = x[b, c0 + c, iy, ox * sx + xoff]
            for ox in range(ox_hi, ow):
                col[row, base + ox] = 0.0


@njit(cache=True, parallel=True, nogil=True)
def _col2im_add(col, b, c0, cg, kh, kw, sy, sx, pad, dil, oh, ow, gx):
    """Adjoint of _im2col: gx[b, c0 + c, iy, ix] += col[row, oy*ow + ox]. Parallel over channels (no write races)."""
    h = gx.shape[2]
    w = gx.shape[3]
    for c in prange(cg):
        for ky in range(kh):
            for kx in range(kw):
                row = (c * kh + ky) * kw + kx
                xoff = kx * dil - pad
                ox_lo, ox_hi = _valid_range(ow, sx, xoff, w)
                for oy in range(oh):
                    iy = oy * sy - pad + ky * dil
                    if iy < 0 or iy >= h:
                        continue
                    base = oy * ow
                    for ox in range(ox_lo, ox_hi):
                        gx[b, c0 + c, iy, ox * sx + xoff] += col[row, base + ox]


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: fused forward (GEMM inside prange, epilogue on the block just written)


@njit(cache=True, inline="always")
def _im2col_block(x, b, c0, cg, kh, kw, sy, sx, pad, dil, oy0, oy1, ow, col):
    """col[row*ncols + (oy-oy0)*ow + ox] for output rows oy0..oy1 of image b, channels c0..c0+cg (sequential)."""
    h = x.shape[2]
    w = x.shape[3]
    ncols = (oy1 - oy0) * ow
    for c in range(cg):
        for ky in range(kh):
            for kx in range(kw):
                row = (c * kh + ky) * kw + kx
                xoff = kx * dil - pad
                ox_lo, ox_hi = _valid_range(ow, sx, xoff, w)
                for oy in range(oy0, oy1):
                    iy = oy * sy - pad + ky * dil
                    base = row * ncols + (oy - oy0) * ow
                    if iy < 0 or iy >= h:
                        for ox in range(ow):
                            col[base + ox] = 0.0
                        continue
                    for ox in range(ox_lo):
                        col[base + ox] = 0.0
                    if sx == 1:
                        for ox in range(ox_lo, ox_hi):
                            col[base + ox] = x[b, c0 + c, iy, ox + xoff]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            col[base + ox] = x[b, c0 + c, iy, ox * sx + xoff]
                    for ox in range(ox_hi, ow):
                        col[base + ox] = 0.0


@njit(cache=True, parallel=True, nogil=True)
def _conv_im2col_kernel(x, w2d, bias, groups, kh, kw, sy, sx, pad, dil, oh, ow, code, y, rows_per_job, ws):
    """y = act(conv(x) + bias) by blocks of output rows: im2col into the thread's scratch, GEMM, epilogue."""
    nb, c, h, w = x.shape
    n = w2d.shape[0]
    kg = w2d.shape[1]
    cg = c // groups
    ng = n // groups
    s = oh * ow
    jobs_per_img = (oh + rows_per_job - 1) // rows_per_job
    yflat = y.reshape(-1)
    for job in prange(nb * jobs_per_img):
        col = ws[numba.get_thread_id()]
        b = job // jobs_per_img
        oy0 = (job % jobs_per_img) * rows_per_job
        oy1 = min(oh, oy0 + rows_per_job)
        ncols = (oy1 - oy0) * ow
        for g in range(groups):
            _im2col_block(x, b, g * cg, cg, kh, kw, sy, sx, pad, dil, oy0, oy1, ow, col)
            gemm(False, False, ng, ncols, kg, 1.0, w2d, g * ng * kg, kg, col, 0, ncols, 0.0,
                 y, (b * n + g * ng) * s + oy0 * ow, s)
        for f in range(n):
            base = (b * n + f) * s
            bias_act_row(yflat, base + oy0 * ow, base + oy1 * ow, bias[f], code)


@njit(cache=True, parallel=True, nogil=True)
def _conv1x1_kernel(x, w2d, bias, code, y, cols_per_job):
    """x (nb, c, s) -> y (nb, n, s) = act(w2d @ x[b] + bias) by blocks of columns."""
    nb, c, s = x.shape
    n = w2d.shape[0]
    jobs_per_img = (s + cols_per_job - 1) // cols_per_job
    yflat = y.reshape(-1)
    for job in prange(nb * jobs_per_img):
        b = job // jobs_per_img
        s0 = (job % jobs_per_img) * cols_per_job
        s1 = min(s, s0 + cols_per_job)
        gemm(False, False, n, s1 - s0, c, 1.0, w2d, 0, c, x, b * c * s + s0, s, 0.0, y, b * n * s + s0, s)
        for f in range(n):
            base = (b * n + f) * s
            bias_act_row(yflat, base + s0, base + s1, bias[f], code)


@njit(cache=True, parallel=True, nogil=True)
def _batched_gemm(u, v, m, cols_per_job):
    """m[a] = u[a] @ v[a] for every a; u (A, n, c), v (A, c, t), m (A, n, t); jobs = (a, block of columns)."""
    na, n, c = u.shape
    t = v.shape[2]
    blocks = (t + cols_per_job - 1) // cols_per_job
    for job in prange(na * blocks):
        a = job // blocks
        t0 = (job % blocks) * cols_per_job
        t1 = min(t, t0 + cols_per_job)
        gemm(False, False, n, t1 - t0, c, 1.0, u, a * n * c, c, v, a * c * t + t0, t, 0.0, m, a * n * t + t0, t)


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: direct convolution for one input channel per group (depthwise, any channel multiplier)


@njit(cache=True, inline="always")
def _pad_plane(x, b, c, pad, hp, wp, buf):
    """buf[0:hp*wp] = x[b, c] zero-padded by `pad` on the top/left (and whatever remains on the bottom/right).
    Written with slices indexed from 0 so the copies vectorise."""
    h = x.shape[2]
    wd = x.shape[3]
    top = buf[:pad * wp]
    for i in range(top.size):
        top[i] = 0.0
    for r in range(h):
        row = buf[(r + pad) * wp:(r + pad + 1) * wp]
        for s in range(pad):
            row[s] = 0.0
        inner = row[pad:]
        src = x[b, c, r]
        for s in range(wd):
            inner[s] = src[s]
        tail = row[pad + wd:]
        for s in range(tail.size):
            tail[s] = 0.0
    bottom = buf[(h + pad) * wp:hp * wp]
    for i in range(bottom.size):
        bottom[i] = 0.0


@njit(cache=True, inline="always")
def _pad_plane_split22(x, b, c, pad, hp2, wp2, buf):
    """The zero-padded plane x[b, c] split by (row parity, column parity) for stride-2 filters:
    buf[((py*2 + px)*hp2 + i)*wp2 + j] = padded[2i + py, 2j + px], padded[r, q] = x[b, c, r - pad, q - pad]."""
    h = x.shape[2]
    wd = x.shape[3]
    j0 = (pad + 1) // 2                               # first j with 2j - pad >= 0
    j1 = max(j0, min(wp2, (wd - 2 + pad) // 2 + 1))   # past the last j with 2j + 1 - pad < wd
    for pr in range(2 * hp2):
        py = pr % 2
        i = pr // 2
        r = pr - pad
        e0 = (2 * py * hp2 + i) * wp2
        o0 = ((2 * py + 1) * hp2 + i) * wp2
        er = buf[e0:e0 + wp2]
        orow = buf[o0:o0 + wp2]
        if r < 0 or r >= h:
            for j in range(wp2):
                er[j] = 0.0
            for j in range(wp2):
                orow[j] = 0.0
            continue
        xr = x[b, c, r]
        # whole pairs: two contiguous loads per step vectorise far better than two stride-2 passes
        xs = xr[2 * j0 - pad:]
        eo = er[j0:]
        oo = orow[j0:]
        for jj in range(j1 - j0):
            first = xs[2 * jj]
            second = xs[2 * jj + 1]
            eo[jj] = first
            oo[jj] = second
        # the few columns at either end (padding, a lone last column)
        for j in range(min(j0, wp2)):
            t = 2 * j - pad
            er[j] = xr[t] if 0 <= t < wd else 0.0
            orow[j] = xr[t + 1] if 0 <= t + 1 < wd else 0.0
        for j in range(j1, wp2):
            t = 2 * j - pad
            er[j] = xr[t] if 0 <= t < wd else 0.0
            orow[j] = xr[t + 1] if 0 <= t + 1 < wd else 0.0


@njit(cache=True, parallel=True, nogil=True)
def _direct_1ch_forward(x, w, bias, sy, sx, pad, dil, oh, ow, code, y, ws):
    """y[b, f] = act(bias[f] + sum_{ky,kx} w[f, 0, ky, kx] * x[b, f // mult, ...]), mult = n // C.

    One job per (image, input channel): the channel is zero-padded once into the thread's scratch and serves its
    `mult` filters. 3x3 filters are unrolled (9 taps in one pass, in the data's precision):
      - stride 2: the padded plane is split by row and column parity, so every tap reads a contiguous run;
      - stride 1 on narrow planes: the output is computed over the padded width as one flat run (long vector loops;
        the few columns past the output are dropped when copying out); on wide planes row by row.
    Other sizes accumulate tap by tap: at stride 1 on narrow planes over the same flat run, else row by row."""
    nb, nc, h, wd = x.shape
    nf = w.shape[0]
    kh = w.shape[2]
    kw = w.shape[3]
    mult = nf // nc
    hp = max(h + 2 * pad, (oh - 1) * sy + (kh - 1) * dil + 1)
    wp = max(wd + 2 * pad, (ow - 1) * sx + (kw - 1) * dil + 1)
    hp2 = (hp + 1) // 2
    wp2 = (wp + 1) // 2
    three = kh == 3 and kw == 3
    stride2 = three and sx == 2 and sy == 2 and dil == 1
    flat1 = three and sx == 1 and sy == 1 and ow < 32
    flatk = (not three) and sx == 1 and sy == 1 and ow < 32
    yflat = y.reshape(-1)
    for job in prange(nb * nc):
        scratch = ws[numba.get_thread_id()]
        b = job // nc
        c = job % nc
        if stride2:
            buf = scratch[:4 * hp2 * wp2]
            acc = scratch[4 * hp2 * wp2:4 * hp2 * wp2 + oh * wp2]
            _pad_plane_split22(x, b, c, pad, hp2, wp2, buf)
        else:
            buf = scratch[:hp * wp]
            acc = scratch[hp * wp:hp * wp + oh * wp]
            _pad_plane(x, b, c, pad, hp, wp, buf)
        for f in range(c * mult, (c + 1) * mult):
            plane = (b * nf + f) * oh * ow
            if three:
                w00 = w[f, 0, 0, 0]
                w01 = w[f, 0, 0, 1]
                w02 = w[f, 0, 0, 2]
                w10 = w[f, 0, 1, 0]
                w11 = w[f, 0, 1, 1]
                w12 = w[f, 0, 1, 2]
                w20 = w[f, 0, 2, 0]
                w21 = w[f, 0, 2, 1]
                w22 = w[f, 0, 2, 2]
            if stride2:
                # tap (ky, kx) of output (oy, ox) = plane (ky%2, kx%2) at (oy + ky//2, ox + kx//2)
                n = (oh - 1) * wp2 + ow
                pl = hp2 * wp2
                ee = buf[:]
                eo = buf[pl:]
                oe = buf[2 * pl:]
                oo = buf[3 * pl:]
                a0 = ee[:n]
                a1 = eo[:n]
                a2 = ee[1:n + 1]
                b0 = oe[:n]
                b1 = oo[:n]
                b2 = oe[1:n + 1]
                c0 = ee[wp2:wp2 + n]
                c1 = eo[wp2:wp2 + n]
                c2 = ee[wp2 + 1:wp2 + 1 + n]
                for i in range(n):
                    acc[i] = (w00 * a0[i] + w01 * a1[i] + w02 * a2[i] + w10 * b0[i] + w11 * b1[i] + w12 * b2[i]
                              + w20 * c0[i] + w21 * c1[i] + w22 * c2[i])
                for oy in range(oh):
                    dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
                    src = acc[oy * wp2:]
                    for ox in range(ow):
                        dst[ox] = src[ox]
            elif flat1:
                n = (oh - 1) * wp + ow
                r1 = dil * wp
                r2 = 2 * dil * wp
                a0 = buf[:n]
                a1 = buf[dil:dil + n]
                a2 = buf[2 * dil:2 * dil + n]
                b0 = buf[r1:r1 + n]
                b1 = buf[r1 + dil:r1 + dil + n]
                b2 = buf[r1 + 2 * dil:r1 + 2 * dil + n]
                c0 = buf[r2:r2 + n]
                c1 = buf[r2 + dil:r2 + dil + n]
                c2 = buf[r2 + 2 * dil:r2 + 2 * dil + n]
                for i in range(n):
                    acc[i] = (w00 * a0[i] + w01 * a1[i] + w02 * a2[i] + w10 * b0[i] + w11 * b1[i] + w12 * b2[i]
                              + w20 * c0[i] + w21 * c1[i] + w22 * c2[i])
                for oy in range(oh):
                    dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
                    src = acc[oy * wp:]
                    for ox in range(ow):
                        dst[ox] = src[ox]
            elif three:
                for oy in range(oh):
                    # row slices: the loops below index them from 0, so no wraparound checks and they vectorise
                    r0 = oy * sy * wp
                    r1 = r0 + dil * wp
                    r2 = r1 + dil * wp
                    dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
                    a0 = buf[r0:]
                    a1 = buf[r0 + dil:]
                    a2 = buf[r0 + 2 * dil:]
                    b0 = buf[r1:]
                    b1 = buf[r1 + dil:]
                    b2 = buf[r1 + 2 * dil:]
                    c0 = buf[r2:]
                    c1 = buf[r2 + dil:]
                    c2 = buf[r2 + 2 * dil:]
                    if sx == 1:
                        for ox in range(ow):
                            dst[ox] = (w00 * a0[ox] + w01 * a1[ox] + w02 * a2[ox] + w10 * b0[ox] + w11 * b1[ox]
                                       + w12 * b2[ox] + w20 * c0[ox] + w21 * c1[ox] + w22 * c2[ox])
                    else:
                        for ox in range(ow):
                            i = sx * ox
                            dst[ox] = (w00 * a0[i] + w01 * a1[i] + w02 * a2[i] + w10 * b0[i] + w11 * b1[i]
                                       + w12 * b2[i] + w20 * c0[i] + w21 * c1[i] + w22 * c2[i])
            elif flatk and kw == 5:
                # over the padded width as one run, a filter row (5 taps) per pass: a fifth of the passes over the
                # accumulator that tap-by-tap accumulation makes
                n = (oh - 1) * wp + ow
                for ky in range(kh):
                    row = ky * dil * wp
                    w0 = w[f, 0, ky, 0]
                    w1 = w[f, 0, ky, 1]
                    w2 = w[f, 0, ky, 2]
                    w3 = w[f, 0, ky, 3]
                    w4 = w[f, 0, ky, 4]
                    s0 = buf[row:row + n]
                    s1 = buf[row + dil:row + dil + n]
                    s2 = buf[row + 2 * dil:row + 2 * dil + n]
                    s3 = buf[row + 3 * dil:row + 3 * dil + n]
                    s4 = buf[row + 4 * dil:row + 4 * dil + n]
                    if ky == 0:
                        for i in range(n):
                            acc[i] = w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i] + w4 * s4[i]
                    else:
                        for i in range(n):
                            acc[i] += w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i] + w4 * s4[i]
                for oy in range(oh):
                    dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
                    src = acc[oy * wp:]
                    for ox in range(ow):
                        dst[ox] = src[ox]
            elif flatk:
                # as the row-by-row loop below (same taps in the same order), over the padded width as one run
                n = (oh - 1) * wp + ow
                for ky in range(kh):
                    for kx in range(kw):
                        wv = w[f, 0, ky, kx]
                        src = buf[ky * dil * wp + kx * dil:]
                        if ky == 0 and kx == 0:
                            for i in range(n):
                                acc[i] = wv * src[i]
                        else:
                            for i in range(n):
                                acc[i] += wv * src[i]
                for oy in range(oh):
                    dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
                    src = acc[oy * wp:]
                    for ox in range(ow):
                        dst[ox] = src[ox]
            else:
                for oy in range(oh):
                    dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
                    for ky in range(kh):
                        for kx in range(kw):
                            wv = w[f, 0, ky, kx]
                            src = buf[(oy * sy + ky * dil) * wp + kx * dil:]
                            if ky == 0 and kx == 0:
                                for ox in range(ow):
                                    dst[ox] = wv * src[ox * sx]
                            elif sx == 1:
                                for ox in range(ow):
                                    dst[ox] += wv * src[ox]
                            else:
                                for ox in range(ow):
                                    dst[ox] += wv * src[ox * sx]
            bias_act_row(yflat, plane, plane + oh * ow, bias[f], code)


def _direct_1ch_scratch_elements(h, w, oh, ow, kh, kw, sy, sx, pad, dil):
    hp = max(h + 2 * pad, (oh - 1) * sy + (kh - 1) * dil + 1)
    wp = max(w + 2 * pad, (ow - 1) * sx + (kw - 1) * dil + 1)
    return max(4 * ((hp + 1) // 2) * ((wp + 1) // 2) + oh * ((wp + 1) // 2) + 2, hp * wp + oh * wp)


@njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def _direct_1ch_backward(x, w, gy, sy, sx, pad, dil, gx, gw_partial, ws):
    """Backward of _direct_1ch_forward (pre-activation): gx += dL/dx, gw_partial[b, f] = image b's filter gradient.

    One job per (image, input channel), like the forward. The incoming gradient of each filter is laid out over the
    padded width (zeros past the output), so that for stride 1 (and, on the parity-split plane, stride 2) every tap
    is one long loop: its weight gradient a dot product, its input gradient an axpy into the padded gradient plane
    (sums reassociated, vectorised). Other strides go row by row."""
    nb, nc, h, wd = x.shape
    nf = w.shape[0]
    kh = w.shape[2]
    kw = w.shape[3]
    oh = gy.shape[2]
    ow = gy.shape[3]
    mult = nf // nc
    hp = max(h + 2 * pad, (oh - 1) * sy + (kh - 1) * dil + 1)
    wp = max(wd + 2 * pad, (ow - 1) * sx + (kw - 1) * dil + 1)
    hp2 = (hp + 1) // 2 + 1
    wp2 = (wp + 1) // 2 + 1
    split = sx == 2 and sy == 2 and dil == 1
    flat = sx == 1 and sy == 1
    size = 4 * hp2 * wp2 if split else hp * wp
    stride = wp2 if split else wp
    for job in prange(nb * nc):
        scratch = ws[numba.get_thread_id()]
        b = job // nc
        c = job % nc
        buf = scratch[:size]
        gbuf = scratch[size:2 * size]
        gyw = scratch[2 * size:2 * size + oh * stride]
        if split:
            _pad_plane_split22(x, b, c, pad, hp2, wp2, buf)
        else:
            _pad_plane(x, b, c, pad, hp, wp, buf)
        for i in range(size):
            gbuf[i] = 0.0
        for i in range(oh * stride):
            gyw[i] = 0.0
        for f in range(c * mult, (c + 1) * mult):
            if split or flat:
                for oy in range(oh):
                    src = gy[b, f, oy]
                    dst = gyw[oy * stride:]
                    for ox in range(ow):
                        dst[ox] = src[ox]
                n = (oh - 1) * stride + ow
                g = gyw[:n]
                for ky in range(kh):
                    for kx in range(kw):
                        wv = w[f, 0, ky, kx]
                        if split:
                            start = ((2 * (ky % 2) + kx % 2) * hp2 + ky // 2) * wp2 + kx // 2
                        else:
                            start = ky * dil * wp + kx * dil
                        src = buf[start:start + n]
                        dst = gbuf[start:start + n]
                        acc = typed(buf, 0.0)
                        for i in range(n):
                            acc += g[i] * src[i]
                            dst[i] += wv * g[i]
                        gw_partial[b, f, ky, kx] = acc
                continue
            for ky in range(kh):
                for kx in range(kw):
                    wv = w[f, 0, ky, kx]
                    acc = typed(buf, 0.0)
                    for oy in range(oh):
                        start = (oy * sy + ky * dil) * wp + kx * dil
                        src = buf[start:]
                        dst = gbuf[start:]
                        grow = gy[b, f, oy]
                        for ox in range(ow):
                            acc += grow[ox] * src[ox * sx]
                            dst[ox * sx] += wv * grow[ox]
                    gw_partial[b, f, ky, kx] = acc
        for r in range(h):
            dst = gx[b, c, r]
            if split:
                pr = r + pad
                # padded column q = s + pad lives in plane (pr%2, q%2) at column q//2
                ev = gbuf[((2 * (pr % 2)) * hp2 + pr // 2) * wp2:]
                od = gbuf[((2 * (pr % 2) + 1) * hp2 + pr // 2) * wp2:]
                for q in range(wd):
                    qq = q + pad
                    if qq % 2 == 0:
                        dst[q] += ev[qq // 2]
                    else:
                        dst[q] += od[qq // 2]
            else:
                src = gbuf[(r + pad) * wp + pad:]
                for q in range(wd):
                    dst[q] += src[q]


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: backward of the GEMM convolutions, one job per image


@njit(cache=True, inline="always")
def _col2im_block(col, b, c0, cg, kh, kw, sy, sx, pad, dil, oh, ow, gx):
    """Adjoint of _im2col_block over all output rows: gx[b, c0 + c, iy, ix] += col[row*s + oy*ow + ox]."""
    h = gx.shape[2]
    w = gx.shape[3]
    s = oh * ow
    for c in range(cg):
        for ky in range(kh):
            for kx in range(kw):
                row = (c * kh + ky) * kw + kx
                xoff = kx * dil - pad
                ox_lo, ox_hi = _valid_range(ow, sx, xoff, w)
                for oy in range(oh):
                    iy = oy * sy - pad + ky * dil
                    if iy < 0 or iy >= h or ox_hi <= ox_lo:
                        continue
                    src = col[row * s + oy * ow + ox_lo:row * s + oy * ow + ox_hi]
                    dst = gx[b, c0 + c, iy, ox_lo * sx + xoff:]
                    if sx == 1:
                        for i in range(ox_hi - ox_lo):
                            dst[i] += src[i]
                    else:
                        for i in range(ox_hi - ox_lo):
                            dst[i * sx] += src[i]


@njit(cache=True, parallel=True, nogil=True)
def _conv_backward_kernel(x, w2d, gy, groups, kh, kw, sy, sx, pad, dil, one_by_one, need_gx, gx, gw_partial, ws):
    """Per image (one job each): im2col, grad_w += gy @ col^T into the thread's partial sum, and
    dcol = W^T @ gy scattered back by col2im."""
    nb, c, h, w = x.shape
    n = w2d.shape[0]
    kg = w2d.shape[1]
    cg = c // groups
    ng = n // groups
    oh = gy.shape[2]
    ow = gy.shape[3]
    s = oh * ow
    for b in prange(nb):
        tid = numba.get_thread_id()
        col = ws[tid, :kg * s]
        dcol = ws[tid, kg * s:2 * kg * s]
        for g in range(groups):
            if one_by_one:
                gemm(False, True, ng, kg, s, 1.0, gy, (b * n + g * ng) * s, s, x, (b * c + g * cg) * s, s, 1.0,
                     gw_partial, (tid * n + g * ng) * kg, kg)
                if need_gx:
                    gemm(True, False, kg, s, ng, 1.0, w2d, g * ng * kg, kg, gy, (b * n + g * ng) * s, s, 0.0,
                         gx, (b * c + g * cg) * s, s)
                continue
            _im2col_block(x, b, g * cg, cg, kh, kw, sy, sx, pad, dil, 0, oh, ow, col)
            gemm(False, True, ng, kg, s, 1.0, gy, (b * n + g * ng) * s, s, col, 0, s, 1.0,
                 gw_partial, (tid * n + g * ng) * kg, kg)
            if need_gx:
                gemm(True, False, kg, s, ng, 1.0, w2d, g * ng * kg, kg, gy, (b * n + g * ng) * s, s, 0.0,
                     dcol, 0, s)
                _col2im_block(dcol, b, g * cg, cg, kh, kw, sy, sx, pad, dil, oh, ow, gx)


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: Winograd F(4x4, 3x3), stride 1, dilation 1
#   out = A^T [ (G g G^T) .* (B^T d B) ] A  on 6x6 input tiles d giving 4x4 output tiles


@njit(cache=True, parallel=True, nogil=True)
def _wino_filter_transform(w, u):
    """w (n, c, 3, 3) -> u (36, n, c) = G w G^T."""
    nf, nc = w.shape[0], w.shape[1]
    for f in prange(nf):
        t = np.empty((6, 3), dtype=np.float64)
        for c in range(nc):
            for j in range(3):
                g0 = w[f, c, 0, j]
                g1 = w[f, c, 1, j]
                g2 = w[f, c, 2, j]
                t[0, j] = g0 / 4.0
                t[1, j] = -(g0 + g1 + g2) / 6.0
                t[2, j] = -(g0 - g1 + g2) / 6.0
                t[3, j] = g0 / 24.0 + g1 / 12.0 + g2 / 6.0
                t[4, j] = g0 / 24.0 - g1 / 12.0 + g2 / 6.0
                t[5, j] = g2
            for i in range(6):
                g0 = t[i, 0]
                g1 = t[i, 1]
                g2 = t[i, 2]
                u[i * 6 + 0, f, c] = g0 / 4.0
                u[i * 6 + 1, f, c] = -(g0 + g1 + g2) / 6.0
                u[i * 6 + 2, f, c] = -(g0 - g1 + g2) / 6.0
                u[i * 6 + 3, f, c] = g0 / 24.0 + g1 / 12.0 + g2 / 6.0
                u[i * 6 + 4, f, c] = g0 / 24.0 - g1 / 12.0 + g2 / 6.0
                u[i * 6 + 5, f, c] = g2


@njit(cache=True, inline="always")
def _phase_split4(x, b, c, pad, hp, tw1, ph):
    """The zero-padded plane x[b, c] split by column phase: ph[(l*hp + r)*tw1 + j] = padded[r, 4j + l], l = 0..3,
    padded[r, q] = x[b, c, r - pad, q - pad] (0 outside). Every entry is written once; the bulk moves 4 contiguous
    values per step."""
    h = x.shape[2]
    wd = x.shape[3]
    plane = hp * tw1
    j0 = (pad + 3) // 4                      # first j with 4j - pad >= 0
    j1 = max(j0, min(tw1, (wd - 4 + pad) // 4 + 1))  # past the last j with 4j + 3 - pad < wd
    for r in range(hp):
        p0 = ph[r * tw1:(r + 1) * tw1]
        p1 = ph[plane + r * tw1:plane + (r + 1) * tw1]
        p2 = ph[2 * plane + r * tw1:2 * plane + (r + 1) * tw1]
        p3 = ph[3 * plane + r * tw1:3 * plane + (r + 1) * tw1]
        if r < pad or r >= pad + h:
            for j in range(tw1):
                p0[j] = 0.0
                p1[j] = 0.0
                p2[j] = 0.0
                p3[j] = 0.0
            continue
        xr = x[b, c, r - pad]
        if j1 > j0:
            xs = xr[4 * j0 - pad:]
            q0 = p0[j0:]
            q1 = p1[j0:]
            q2 = p2[j0:]
            q3 = p3[j0:]
            for jj in range(j1 - j0):
                a0 = xs[4 * jj]
                a1 = xs[4 * jj + 1]
                a2 = xs[4 * jj + 2]
                a3 = xs[4 * jj + 3]
                q0[jj] = a0
                q1[jj] = a1
                q2[jj] = a2
                q3[jj] = a3
        for j in range(min(j0, tw1)):
            t = 4 * j - pad
            p0[j] = xr[t] if 0 <= t < wd else 0.0
            p1[j] = xr[t + 1] if 0 <= t + 1 < wd else 0.0
            p2[j] = xr[t + 2] if 0 <= t + 2 < wd else 0.0
            p3[j] = xr[t + 3] if 0 <= t + 3 < wd else 0.0
        for j in range(j1, tw1):
            t = 4 * j - pad
            p0[j] = xr[t] if 0 <= t < wd else 0.0
            p1[j] = xr[t + 1] if 0 <= t + 1 < wd else 0.0
            p2[j] = xr[t + 2] if 0 <= t + 2 < wd else 0.0
            p3[j] = xr[t + 3] if 0 <= t + 3 < wd else 0.0


def _wino_input_scratch_elements(th, tw):
    hp = 4 * th + 2
    return 4 * hp * (tw + 1) + 24 * (tw + 1)


@njit(cache=True, parallel=True, nogil=True)
def _wino_input_transform(x, pad, th, tw, v, ws):
    """x (nb, c, h, w) -> v (36, c, nb*th*tw): B^T d B for every 6x6 tile (tile origin (4ty - pad, 4tx - pad)).

    Per (image, channel): the padded plane is split into its 4 column phases (so a tile's 6 columns are phase
    0,1,2,3 of tile tx and phase 0,1 of tile tx+1: contiguous runs over tx), then for each band of 6 rows the column
    transform runs per phase and the row transform across phases, both as contiguous loops over the tiles."""
    nb, nc, h, wd = x.shape
    ntiles = th * tw
    hp = 4 * th + 2
    tw1 = tw + 1
    plane = hp * tw1
    four = typed(v, 4.0)
    five = typed(v, 5.0)
    two = typed(v, 2.0)
    for job in prange(nb * nc):
        scratch = ws[numba.get_thread_id()]
        b = job // nc
        c = job % nc
        ph = scratch[:4 * plane]
        t = scratch[4 * plane:4 * plane + 24 * tw1]   # t[(l*6 + i)*tw1 + j]
        _phase_split4(x, b, c, pad, hp, tw1, ph)
        for ty in range(th):
            r0 = 4 * ty
            # column transform (over the band's 6 rows), phase by phase
            for l in range(4):
                base = l * plane + r0 * tw1
                d0 = ph[base:base + tw1]
                d1 = ph[base + tw1:base + 2 * tw1]
                d2 = ph[base + 2 * tw1:base + 3 * tw1]
                d3 = ph[base + 3 * tw1:base + 4 * tw1]
                d4 = ph[base + 4 * tw1:base + 5 * tw1]
                d5 = ph[base + 5 * tw1:base + 6 * tw1]
                tb = l * 6 * tw1
                t0 = t[tb:tb + tw1]
                t1 = t[tb + tw1:tb + 2 * tw1]
                t2 = t[tb + 2 * tw1:tb + 3 * tw1]
                t3 = t[tb + 3 * tw1:tb + 4 * tw1]
                t4 = t[tb + 4 * tw1:tb + 5 * tw1]
                t5 = t[tb + 5 * tw1:tb + 6 * tw1]
                for j in range(tw1):
                    a0 = d0[j]
                    a1 = d1[j]
                    a2 = d2[j]
                    a3 = d3[j]
                    a4 = d4[j]
                    a5 = d5[j]
                    t0[j] = four * a0 - five * a2 + a4
                    t1[j] = a3 + a4 - four * (a1 + a2)
                    t2[j] = four * (a1 - a2) - a3 + a4
                    t3[j] = two * (a3 - a1) - a2 + a4
                    t4[j] = two * (a1 - a3) - a2 + a4
                    t5[j] = four * a1 - five * a3 + a5
            # row transform: tile tx's columns are phases 0..3 at tx and phases 0,1 at tx + 1
            col0 = b * ntiles + ty * tw
            for i in range(6):
                e0 = t[i * tw1:]
                e1 = t[(6 + i) * tw1:]
                e2 = t[(12 + i) * tw1:]
                e3 = t[(18 + i) * tw1:]
                e4 = t[i * tw1 + 1:]
                e5 = t[(6 + i) * tw1 + 1:]
                v0 = v[i * 6, c, col0:col0 + tw]
                v1 = v[i * 6 + 1, c, col0:col0 + tw]
                v2 = v[i * 6 + 2, c, col0:col0 + tw]
                v3 = v[i * 6 + 3, c, col0:col0 + tw]
                v4 = v[i * 6 + 4, c, col0:col0 + tw]
                v5 = v[i * 6 + 5, c, col0:col0 + tw]
                for tx in range(tw):
                    a0 = e0[tx]
                    a1 = e1[tx]
                    a2 = e2[tx]
                    a3 = e3[tx]
                    a4 = e4[tx]
                    a5 = e5[tx]
                    v0[tx] = four * a0 - five * a2 + a4
                    v1[tx] = a3 + a4 - four * (a1 + a2)
                    v2[tx] = four * (a1 - a2) - a3 + a4
                    v3[tx] = two * (a3 - a1) - a2 + a4
                    v4[tx] = two * (a1 - a3) - a2 + a4
                    v5[tx] = four * a1 - five * a3 + a5


def _wino_output_scratch_elements(tw):
    return 40 * tw


@njit(cache=True, parallel=True, nogil=True)
def _wino_output_transform(m, bias, th, tw, code, y, ws):
    """m (36, n, nb*th*tw) -> y (nb, n, oh, ow) = act(A^T m A + bias), contiguous loops over the tiles of a band."""
    nb, nf, oh, ow = y.shape
    ntiles = th * tw
    yflat = y.reshape(-1)
    two = typed(y, 2.0)
    four = typed(y, 4.0)
    eight = typed(y, 8.0)
    full = ow // 4          # tiles whose 4 columns are all inside the output
    rest = ow - 4 * full
    for job in prange(nb * nf):
        scratch = ws[numba.get_thread_id()]
        b = job // nf
        f = job % nf
        q = scratch[:24 * tw]             # q[(i*4 + k)*tw + tx]
        o = scratch[24 * tw:40 * tw]      # o[(r*4 + k)*tw + tx]
        for ty in range(th):
            col0 = b * ntiles + ty * tw
            # A^T along j for each of the 6 rows i
            for i in range(6):
                m0 = m[i * 6, f, col0:col0 + tw]
                m1 = m[i * 6 + 1, f, col0:col0 + tw]
                m2 = m[i * 6 + 2, f, col0:col0 + tw]
                m3 = m[i * 6 + 3, f, col0:col0 + tw]
                m4 = m[i * 6 + 4, f, col0:col0 + tw]
                m5 = m[i * 6 + 5, f, col0:col0 + tw]
                q0 = q[(i * 4) * tw:(i * 4 + 1) * tw]
                q1 = q[(i * 4 + 1) * tw:(i * 4 + 2) * tw]
                q2 = q[(i * 4 + 2) * tw:(i * 4 + 3) * tw]
                q3 = q[(i * 4 + 3) * tw:(i * 4 + 4) * tw]
                for tx in range(tw):
                    a = m1[tx] + m2[tx]
                    bb = m1[tx] - m2[tx]
                    cc = m3[tx] + m4[tx]
                    dd = m3[tx] - m4[tx]
                    q0[tx] = m0[tx] + a + cc
                    q1[tx] = bb + two * dd
                    q2[tx] = a + four * cc
                    q3[tx] = bb + eight * dd + m5[tx]
            # A^T along i for each output column k
            for k in range(4):
                s0 = q[k * tw:]
                s1 = q[(4 + k) * tw:]
                s2 = q[(8 + k) * tw:]
                s3 = q[(12 + k) * tw:]
                s4 = q[(16 + k) * tw:]
                s5 = q[(20 + k) * tw:]
                o0 = o[k * tw:]
                o1 = o[(4 + k) * tw:]
                o2 = o[(8 + k) * tw:]
                o3 = o[(12 + k) * tw:]
                for tx in range(tw):
                    a = s1[tx] + s2[tx]
                    bb = s1[tx] - s2[tx]
                    cc = s3[tx] + s4[tx]
                    dd = s3[tx] - s4[tx]
                    o0[tx] = s0[tx] + a + cc
                    o1[tx] = bb + two * dd
                    o2[tx] = a + four * cc
                    o3[tx] = bb + eight * dd + s5[tx]
            # interleave the 4 columns of every tile into the output rows
            for r in range(4):
                oy = 4 * ty + r
                if oy >= oh:
                    break
                dst = yflat[((b * nf + f) * oh + oy) * ow:((b * nf + f) * oh + oy + 1) * ow]
                c0 = o[(r * 4) * tw:]
                c1 = o[(r * 4 + 1) * tw:]
                c2 = o[(r * 4 + 2) * tw:]
                c3 = o[(r * 4 + 3) * tw:]
                for tx in range(full):
                    v0 = c0[tx]
                    v1 = c1[tx]
                    v2 = c2[tx]
                    v3 = c3[tx]
                    dst[4 * tx] = v0
                    dst[4 * tx + 1] = v1
                    dst[4 * tx + 2] = v2
                    dst[4 * tx + 3] = v3
                if rest > 0:
                    dst[4 * full] = c0[full]
                    if rest > 1:
                        dst[4 * full + 1] = c1[full]
                    if rest > 2:
                        dst[4 * full + 2] = c2[full]
        start = job * oh * ow
        bias_act_row(yflat, start, start + oh * ow, bias[f], code)


# Winograd with long loops (wide images): every band carries one dummy tile (tx = tw), so that the tiles of all
# bands form one flat run of th*(tw+1) and every transform step is a single long vectorised loop over it.


def _wino_long_input_scratch_elements(th, tw):
    return 16 * (th + 1) * (tw + 1) + 24 * th * (tw + 1) + 1


@njit(cache=True, parallel=True, nogil=True)
def _wino_input_long(x, pad, th, tw, v, ws):
    """x (nb, c, h, w) -> v (36, c, nb*th*(tw+1)): tile (b, ty, tx) in column (b*th + ty)*(tw+1) + tx.

    Per (image, channel) the padded plane is split 16 ways by (row mod 4, column mod 4): P[m][l][ty][tx] =
    padded[4ty + m, 4tx + l]. A tile's 6 rows are then row phases 0..3 at ty and 0,1 at ty + 1 (one row of the
    phase grid = tw+1 further in the flat index), its 6 columns phases 0..3 at tx and 0,1 at tx + 1 (the next flat
    index): both transform steps are flat loops over the whole tile grid."""
    nb, nc, h, wd = x.shape
    tw1 = tw + 1
    th1 = th + 1
    n2 = th1 * tw1
    flat = th * tw1
    j0 = (pad + 3) // 4
    j1 = max(j0, min(tw1, (wd - 4 + pad) // 4 + 1))
    four = typed(v, 4.0)
    five = typed(v, 5.0)
    two = typed(v, 2.0)
    for job in prange(nb * nc):
        scratch = ws[numba.get_thread_id()]
        b = job // nc
        c = job % nc
        ph = scratch[:16 * n2]
        t = scratch[16 * n2:16 * n2 + 24 * flat + 1]
        for pr in range(4 * th1):
            mrow = pr % 4
            ty = pr // 4
            base = mrow * 4 * n2 + ty * tw1
            p0 = ph[base:base + tw1]
            p1 = ph[base + n2:base + n2 + tw1]
            p2 = ph[base + 2 * n2:base + 2 * n2 + tw1]
            p3 = ph[base + 3 * n2:base + 3 * n2 + tw1]
            r = pr - pad
            if r < 0 or r >= h:
                for j in range(tw1):
                    p0[j] = 0.0
                    p1[j] = 0.0
                    p2[j] = 0.0
                    p3[j] = 0.0
                continue
            xr = x[b, c, r]
            if j1 > j0:
                xs = xr[4 * j0 - pad:]
                q0 = p0[j0:]
                q1 = p1[j0:]
                q2 = p2[j0:]
                q3 = p3[j0:]
                for jj in range(j1 - j0):
                    a0 = xs[4 * jj]
                    a1 = xs[4 * jj + 1]
                    a2 = xs[4 * jj + 2]
                    a3 = xs[4 * jj + 3]
                    q0[jj] = a0
                    q1[jj] = a1
                    q2[jj] = a2
                    q3[jj] = a3
            for j in range(min(j0, tw1)):
                s0 = 4 * j - pad
                p0[j] = xr[s0] if 0 <= s0 < wd else 0.0
                p1[j] = xr[s0 + 1] if 0 <= s0 + 1 < wd else 0.0
                p2[j] = xr[s0 + 2] if 0 <= s0 + 2 < wd else 0.0
                p3[j] = xr[s0 + 3] if 0 <= s0 + 3 < wd else 0.0
            for j in range(j1, tw1):
                s0 = 4 * j - pad
                p0[j] = xr[s0] if 0 <= s0 < wd else 0.0
                p1[j] = xr[s0 + 1] if 0 <= s0 + 1 < wd else 0.0
                p2[j] = xr[s0 + 2] if 0 <= s0 + 2 < wd else 0.0
                p3[j] = xr[s0 + 3] if 0 <= s0 + 3 < wd else 0.0
        # column transform (B^T over the tile's 6 rows), per column phase l
        for l in range(4):
            d0 = ph[l * n2:]
            d1 = ph[(4 + l) * n2:]
            d2 = ph[(8 + l) * n2:]
            d3 = ph[(12 + l) * n2:]
            d4 = ph[l * n2 + tw1:]
            d5 = ph[(4 + l) * n2 + tw1:]
            t0 = t[(l * 6) * flat:(l * 6 + 1) * flat]
            t1 = t[(l * 6 + 1) * flat:(l * 6 + 2) * flat]
            t2 = t[(l * 6 + 2) * flat:(l * 6 + 3) * flat]
            t3 = t[(l * 6 + 3) * flat:(l * 6 + 4) * flat]
            t4 = t[(l * 6 + 4) * flat:(l * 6 + 5) * flat]
            t5 = t[(l * 6 + 5) * flat:(l * 6 + 6) * flat]
            for i in range(flat):
                a0 = d0[i]
                a1 = d1[i]
                a2 = d2[i]
                a3 = d3[i]
                a4 = d4[i]
                a5 = d5[i]
                t0[i] = four * a0 - five * a2 + a4
                t1[i] = a3 + a4 - four * (a1 + a2)
                t2[i] = four * (a1 - a2) - a3 + a4
                t3[i] = two * (a3 - a1) - a2 + a4
                t4[i] = two * (a1 - a3) - a2 + a4
                t5[i] = four * a1 - five * a3 + a5
        # row transform (B over the tile's 6 columns): phases 0..3 at this flat index, 0,1 at the next one
        col = b * flat
        for ir in range(6):
            e0 = t[ir * flat:]
            e1 = t[(6 + ir) * flat:]
            e2 = t[(12 + ir) * flat:]
            e3 = t[(18 + ir) * flat:]
            e4 = t[ir * flat + 1:]
            e5 = t[(6 + ir) * flat + 1:]
            v0 = v[ir * 6, c, col:col + flat]
            v1 = v[ir * 6 + 1, c, col:col + flat]
            v2 = v[ir * 6 + 2, c, col:col + flat]
            v3 = v[ir * 6 + 3, c, col:col + flat]
            v4 = v[ir * 6 + 4, c, col:col + flat]
            v5 = v[ir * 6 + 5, c, col:col + flat]
            for i in range(flat):
                a0 = e0[i]
                a1 = e1[i]
                a2 = e2[i]
                a3 = e3[i]
                a4 = e4[i]
                a5 = e5[i]
                v0[i] = four * a0 - five * a2 + a4
                v1[i] = a3 + a4 - four * (a1 + a2)
                v2[i] = four * (a1 - a2) - a3 + a4
                v3[i] = two * (a3 - a1) - a2 + a4
                v4[i] = two * (a1 - a3) - a2 + a4
                v5[i] = four * a1 - five * a3 + a5


def _wino_long_output_scratch_elements(th, tw):
    return 40 * th * (tw + 1)


@njit(cache=True, parallel=True, nogil=True)
def _wino_output_long(m, bias, th, tw, code, y, ws):
    """m (36, n, nb*th*(tw+1)) (layout of _wino_input_long) -> y = act(A^T m A + bias), flat loops over the tiles."""
    nb, nf, oh, ow = y.shape
    tw1 = tw + 1
    flat = th * tw1
    yflat = y.reshape(-1)
    two = typed(y, 2.0)
    four = typed(y, 4.0)
    eight = typed(y, 8.0)
    full = ow // 4
    rest = ow - 4 * full
    for job in prange(nb * nf):
        scratch = ws[numba.get_thread_id()]
        b = job // nf
        f = job % nf
        q = scratch[:24 * flat]
        o = scratch[24 * flat:40 * flat]
        col = b * flat
        for i in range(6):
            m0 = m[i * 6, f, col:col + flat]
            m1 = m[i * 6 + 1, f, col:col + flat]
            m2 = m[i * 6 + 2, f, col:col + flat]
            m3 = m[i * 6 + 3, f, col:col + flat]
            m4 = m[i * 6 + 4, f, col:col + flat]
            m5 = m[i * 6 + 5, f, col:col + flat]
            q0 = q[(i * 4) * flat:(i * 4 + 1) * flat]
            q1 = q[(i * 4 + 1) * flat:(i * 4 + 2) * flat]
            q2 = q[(i * 4 + 2) * flat:(i * 4 + 3) * flat]
            q3 = q[(i * 4 + 3) * flat:(i * 4 + 4) * flat]
            for k in range(flat):
                a = m1[k] + m2[k]
                bb = m1[k] - m2[k]
                cc = m3[k] + m4[k]
                dd = m3[k] - m4[k]
                q0[k] = m0[k] + a + cc
                q1[k] = bb + two * dd
                q2[k] = a + four * cc
                q3[k] = bb + eight * dd + m5[k]
        for kc in range(4):
            s0 = q[kc * flat:]
            s1 = q[(4 + kc) * flat:]
            s2 = q[(8 + kc) * flat:]
            s3 = q[(12 + kc) * flat:]
            s4 = q[(16 + kc) * flat:]
            s5 = q[(20 + kc) * flat:]
            o0 = o[kc * flat:(kc + 1) * flat]
            o1 = o[(4 + kc) * flat:(5 + kc) * flat]
            o2 = o[(8 + kc) * flat:(9 + kc) * flat]
            o3 = o[(12 + kc) * flat:(13 + kc) * flat]
            for k in range(flat):
                a = s1[k] + s2[k]
                bb = s1[k] - s2[k]
                cc = s3[k] + s4[k]
                dd = s3[k] - s4[k]
                o0[k] = s0[k] + a + cc
                o1[k] = bb + two * dd
                o2[k] = a + four * cc
                o3[k] = bb + eight * dd + s5[k]
        plane = (b * nf + f) * oh * ow
        for oy in range(oh):
            ty = oy // 4
            r = oy % 4
            dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
            c0 = o[(r * 4) * flat + ty * tw1:]
            c1 = o[(r * 4 + 1) * flat + ty * tw1:]
            c2 = o[(r * 4 + 2) * flat + ty * tw1:]
            c3 = o[(r * 4 + 3) * flat + ty * tw1:]
            for tx in range(full):
                v0 = c0[tx]
                v1 = c1[tx]
                v2 = c2[tx]
                v3 = c3[tx]
                dst[4 * tx] = v0
                dst[4 * tx + 1] = v1
                dst[4 * tx + 2] = v2
                dst[4 * tx + 3] = v3
            if rest > 0:
                dst[4 * full] = c0[full]
                if rest > 1:
                    dst[4 * full + 1] = c1[full]
                if rest > 2:
                    dst[4 * full + 2] = c2[full]
        bias_act_row(yflat, plane, plane + oh * ow, bias[f], code)


# ----------------------------------------------------------------------------------------------------------------
# planning


PATH_GEMM_1X1 = "gemm1x1"
PATH_WINOGRAD = "winograd"
PATH_DIRECT_1CH = "depthwise"
PATH_IM2COL = "im2col"
PATHS = (PATH_GEMM_1X1, PATH_WINOGRAD, PATH_DIRECT_1CH, PATH_IM2COL)

_IM2COL_TARGET_COLS = 2048        # GEMM columns per im2col block
_IM2COL_MAX_SCRATCH = 8 << 20     # bytes of im2col scratch per thread
_WINOGRAD_MAX_SCRATCH = 16 << 20  # bytes of transformed input per batch chunk (the GEMM output needs as much again)
_WINOGRAD_LONG_MIN_TILES = 8      # tiles per band from which the long-loop layout pays
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
        if self.path == PATH_WINOGRAD:
            if not (kh == kw == 3 and self.stride_x == self.stride_y == 1 and self.dilation == 1 and groups == 1):
                raise ValueError("the Winograd path needs a 3x3, stride 1, dilation 1, ungrouped convolution")
            self.wino_u = np.empty((36, n, cg), dtype=self.dtype)
            _wino_filter_transform(self.weights, self.wino_u)
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
        return PATH_IM2COL

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
        elif path == PATH_DIRECT_1CH:
            elements = _direct_1ch_scratch_elements(x.shape[2], x.shape[3], oh, ow, self.kh, self.kw, self.stride_y,
                                                    self.stride_x, self.pad, self.dilation)
            ws = _thread_scratch(numba.get_num_threads(), elements, self.dtype)
            _direct_1ch_forward(x, self.weights, self.bias, self.stride_y, self.stride_x, self.pad, self.dilation,
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
        _conv1x1_kernel(x.reshape(nb, c, s), self.w2d, self.bias, self.fused_code, y.reshape(nb, self.n, s), cols)

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
        _conv_im2col_kernel(x, self.w2d, self.bias, self.groups, self.kh, self.kw, self.stride_y, self.stride_x,
                            self.pad, self.dilation, oh, ow, self.fused_code, y, rows, ws)

    def _forward_winograd(self, x, y):
        nb = x.shape[0]
        oh, ow = y.shape[2], y.shape[3]
        th = (oh + 3) // 4
        tw = (ow + 3) // 4
        threads = numba.get_num_threads()
        itemsize = np.dtype(self.dtype).itemsize
        # Wide images: one dummy tile per band buys long vector loops in the transforms (it costs 1/tw more GEMM
        # columns, so narrow images keep the compact layout)
        long_loops = tw >= _WINOGRAD_LONG_MIN_TILES
        per_band = tw + 1 if long_loops else tw
        per_image = 36 * max(self.c, self.n) * th * per_band * itemsize
        chunk = max(1, min(nb, _WINOGRAD_MAX_SCRATCH // per_image))
        for b0 in range(0, nb, chunk):
            b1 = min(nb, b0 + chunk)
            tiles = (b1 - b0) * th * per_band
            v = _named_scratch("wino_v", 36 * self.c * tiles, self.dtype).reshape(36, self.c, tiles)
            m = _named_scratch("wino_m", 36 * self.n * tiles, self.dtype).reshape(36, self.n, tiles)
            if long_loops:
                ws = _thread_scratch(threads, max(_wino_long_input_scratch_elements(th, tw),
                                                  _wino_long_output_scratch_elements(th, tw)), self.dtype)
                _wino_input_long(x[b0:b1], self.pad, th, tw, v, ws)
            else:
                ws = _thread_scratch(threads, max(_wino_input_scratch_elements(th, tw),
                                                  _wino_output_scratch_elements(tw)), self.dtype)
                _wino_input_transform(x[b0:b1], self.pad, th, tw, v, ws)
            # 36 GEMMs: split columns only when there are too few to keep every thread busy
            gemm_blocks = max(1, -(-2 * threads // 36))
            cols = max(64, -(-tiles // gemm_blocks))
            _batched_gemm(self.wino_u, v, m, cols)
            if long_loops:
                _wino_output_long(m, self.bias, th, tw, self.fused_code, y[b0:b1], ws)
            else:
                _wino_output_transform(m, self.bias, th, tw, self.fused_code, y[b0:b1], ws)


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
            _direct_1ch_backward(x, weights, grad_y, stride_y, stride_x, pad, dilation, gx, gw_partial, ws)
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
            _conv_backward_kernel(x, w2d, grad_y, groups, kh, kw, stride_y, stride_x, pad, dilation, one_by_one,
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
                        _im2col(x, b, g * cg, cg, kh, kw, stride_y, stride_x, pad, dilation, oh, ow, col, 0, s)
                        xcol = col
                    matmul(gy, xcol, grad_w2d[g * ng:(g + 1) * ng], trans_b=True, beta=1.0)
                    if need_grad_x:
                        if one_by_one:
                            matmul(w2d[g * ng:(g + 1) * ng], gy, grad_x[b, g * cg:(g + 1) * cg].reshape(cg, s),
                                   trans_a=True, beta=1.0)
                        else:
                            matmul(w2d[g * ng:(g + 1) * ng], gy, dcol, trans_a=True)
                            _col2im_add(dcol, b, g * cg, cg, kh, kw, stride_y, stride_x, pad, dilation, oh, ow,
                                        grad_x)
    return (grad_x if need_grad_x else None), grad_w2d.reshape(n, cg, kh, kw), grad_b
