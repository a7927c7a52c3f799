"""Numba kernels of the convolution's GEMM paths: im2col / col2im, the fused im2col + GEMM + epilogue forward,
the 1x1 GEMM forward, the batched GEMM Winograd uses, and the per-image backward of both GEMM paths.

Layouts and the choice between paths: darkprune.engine.conv (which calls these through Conv2dPlan and
conv2d_backward). GEMMs call BLAS from inside numba's parallel loops (darkprune.engine.blas).
"""

from __future__ import annotations

import numba
from numba import njit, prange

from darkprune.engine.activations import bias_act_row
from darkprune.engine.blas import gemm

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


@njit(cache=True, inline="always")
def _im2col_row(x, b, ch, ky, kx, sy, sx, pad, dil, oy0, oy1, ow, dst):
    """dst[(oy-oy0)*ow + ox] = x[b, ch, oy*sy - pad + ky*dil, ox*sx - pad + kx*dil] (0 outside) for output rows
    oy0..oy1: one row of the im2col matrix (channel ch, tap ky, kx)."""
    h = x.shape[2]
    w = x.shape[3]
    xoff = kx * dil - pad
    ox_lo, ox_hi = _valid_range(ow, sx, xoff, w)
    for oy in range(oy0, oy1):
        iy = oy * sy - pad + ky * dil
        base = (oy - oy0) * ow
        if iy < 0 or iy >= h:
            for ox in range(ow):
                dst[base + ox] = 0.0
            continue
        for ox in range(ox_lo):
            dst[base + ox] = 0.0
        if sx == 1:
            for ox in range(ox_lo, ox_hi):
                dst[base + ox] = x[b, ch, iy, ox + xoff]
        else:
            for ox in range(ox_lo, ox_hi):
                dst[base + ox] = x[b, ch, iy, ox * sx + xoff]
        for ox in range(ox_hi, ow):
            dst[base + ox] = 0.0


@njit(cache=True, parallel=True, nogil=True)
def im2col(x, b, c0, cg, kh, kw, sy, sx, pad, dil, oh, ow, col, col_off, col_ld):
    """col[row, col_off + oy*ow + ox] = x[b, c0 + c, oy*sy - pad + ky*dil, ox*sx - pad + kx*dil] (0 outside),
    row = (c*kh + ky)*kw + kx. col_ld is col's row length (images may be packed side by side)."""
    for row in prange(cg * kh * kw):
        c = row // (kh * kw)
        _im2col_row(x, b, c0 + c, (row // kw) % kh, row % kw, sy, sx, pad, dil, 0, oh, ow,
                    col[row, col_off:col_off + oh * ow])


@njit(cache=True, inline="always")
def _col2im_row(src, b, ch, ky, kx, sy, sx, pad, dil, oh, ow, gx):
    """Adjoint of _im2col_row over all output rows: gx[b, ch, iy, ix] += src[oy*ow + ox]."""
    h = gx.shape[2]
    w = gx.shape[3]
    xoff = kx * dil - pad
    ox_lo, ox_hi = _valid_range(ow, sx, xoff, w)
    for oy in range(oh):
        iy = oy * sy - pad + ky * dil
        if iy < 0 or iy >= h or ox_hi <= ox_lo:
            continue
        seg = src[oy * ow + ox_lo:oy * ow + ox_hi]
        dst = gx[b, ch, iy, ox_lo * sx + xoff:]
        if sx == 1:
            for i in range(ox_hi - ox_lo):
                dst[i] += seg[i]
        else:
            for i in range(ox_hi - ox_lo):
                dst[i * sx] += seg[i]


@njit(cache=True, parallel=True, nogil=True)
def col2im_add(col, b, c0, cg, kh, kw, sy, sx, pad, dil, oh, ow, gx):
    """Adjoint of im2col: gx[b, c0 + c, iy, ix] += col[row, oy*ow + ox]. Parallel over channels (no write races)."""
    for c in prange(cg):
        for ky in range(kh):
            for kx in range(kw):
                _col2im_row(col[(c * kh + ky) * kw + kx], b, c0 + c, ky, kx, sy, sx, pad, dil, oh, ow, gx)


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: fused forward (GEMM inside prange, epilogue on the block just written)


@njit(cache=True, inline="always")
def row_block(job, jobs_per_img, rows_per_job, oh):
    """Job `job` of a kernel split into blocks of `rows_per_job` output rows per image: (image, first row, end)."""
    oy0 = (job % jobs_per_img) * rows_per_job
    return job // jobs_per_img, oy0, min(oh, oy0 + rows_per_job)


@njit(cache=True, inline="always")
def _im2col_block(x, b, c0, cg, kh, kw, sy, sx, pad, dil, oy0, oy1, ow, col):
    """col[row*ncols + (oy-oy0)*ow + ox] for output rows oy0..oy1 of image b, channels c0..c0+cg (sequential)."""
    ncols = (oy1 - oy0) * ow
    for c in range(cg):
        for ky in range(kh):
            for kx in range(kw):
                row = (c * kh + ky) * kw + kx
                _im2col_row(x, b, c0 + c, ky, kx, sy, sx, pad, dil, oy0, oy1, ow, col[row * ncols:(row + 1) * ncols])


@njit(cache=True, parallel=True, nogil=True)
def conv_im2col_kernel(x, w2d, bias, groups, kh, kw, sy, sx, pad, dil, oh, ow, code, y, rows_per_job, ws):
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
        b, oy0, oy1 = row_block(job, jobs_per_img, rows_per_job, oh)
        ncols = (oy1 - oy0) * ow
        for g in range(groups):
            _im2col_block(x, b, g * cg, cg, kh, kw, sy, sx, pad, dil, oy0, oy1, ow, col)
            gemm(False, False, ng, ncols, kg, 1.0, w2d, g * ng * kg, kg, col, 0, ncols, 0.0,
                 y, (b * n + g * ng) * s + oy0 * ow, s)
        for f in range(n):
            base = (b * n + f) * s
            bias_act_row(yflat, base + oy0 * ow, base + oy1 * ow, bias[f], code)


@njit(cache=True, parallel=True, nogil=True)
def conv1x1_kernel(x, w2d, bias, code, y, cols_per_job):
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
def batched_gemm(u, v, m, cols_per_job):
    """m[a] = u[a] @ v[a] for every a; u (A, n, c), v (A, c, t), m (A, n, t); jobs = (a, block of columns)."""
    na, n, c = u.shape
    t = v.shape[2]
    blocks = (t + cols_per_job - 1) // cols_per_job
    for job in prange(na * blocks):
        a = job // blocks
        t0 = (job % blocks) * cols_per_job
        t1 = min(t, t0 + cols_per_job)
        gemm(False, False, n, t1 - t0, c, 1.0, u, a * n * c, c, v, a * c * t + t0, t, 0.0, m, a * n * t + t0, t)


# numba kernels: backward of the GEMM convolutions, one job per image


@njit(cache=True, inline="always")
def _col2im_block(col, b, c0, cg, kh, kw, sy, sx, pad, dil, oh, ow, gx):
    """Adjoint of _im2col_block over all output rows: gx[b, c0 + c, iy, ix] += col[row*s + oy*ow + ox]."""
    s = oh * ow
    for c in range(cg):
        for ky in range(kh):
            for kx in range(kw):
                row = (c * kh + ky) * kw + kx
                _col2im_row(col[row * s:(row + 1) * s], b, c0 + c, ky, kx, sy, sx, pad, dil, oh, ow, gx)


@njit(cache=True, parallel=True, nogil=True)
def conv_backward_kernel(x, w2d, gy, groups, kh, kw, sy, sx, pad, dil, one_by_one, need_gx, gx, gw_partial, ws):
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
