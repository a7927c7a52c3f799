"""Numba kernels of the direct 3x3 convolution for layers with very few input channels: a detector's first layer
(3 channels, 27 taps in all).

There im2col + GEMM is a poor fit: the GEMM has K = 27 and M = the filter count (16 or 32), too small for BLAS to
reach its speed, and the im2col matrix is 9 times the input, written and read once each. The direct kernel reads a
zero-padded copy of the input whose rows are split into their `stride` column phases (phase p of a row holds
columns p, p + stride, p + 2*stride, ...), so that each of the 9 taps of an output row is a contiguous, shifted
read: y[f, oy, i] += sum over ky, kx of w[f, c, ky, kx] * phase[kx mod stride][i + kx // stride] of padded row
oy*stride + ky. Two filters share each pass over the 9 shifted rows, which makes the loop bound by its
multiply-adds rather than its loads (measured per filter and 416-column row: one filter a pass 138 ns, two 81 ns,
four 85 ns).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from darkprune.engine.activations import bias_act_row
from darkprune.engine.conv_gemm import row_block


def padded_input(x_shape, pad: int, stride_y: int, stride_x: int, oh: int, ow: int, dtype) -> np.ndarray:
    """An array for pad_split's output (fresh each call: it is as small as the input): (N, C, rows, stride_x,
    columns per phase) for an input of `x_shape` and an output of oh x ow, large enough for every tap of every
    output position."""
    nb, c, h, w = x_shape
    rows = max(h + 2 * pad, (oh - 1) * stride_y + 3)
    cols = max(w + 2 * pad, (ow - 1) * stride_x + 3)
    return np.empty((nb, c, rows, stride_x, (cols + stride_x - 1) // stride_x + 1), dtype=dtype)


@njit(cache=True, parallel=True, nogil=True)
def pad_split(x, pad, xp):
    """xp[b, c, r, p, j] = x[b, c, r - pad, j*stride + p - pad], 0 outside x (stride = xp.shape[3])."""
    nb, c, h, w = x.shape
    rows = xp.shape[2]
    stride = xp.shape[3]
    cols = xp.shape[4]
    for job in prange(nb * c * rows):
        b = job // (c * rows)
        ci = (job // rows) % c
        r = job % rows
        iy = r - pad
        for p in range(stride):
            dst = xp[b, ci, r, p]
            if iy < 0 or iy >= h:
                for j in range(cols):
                    dst[j] = 0.0
                continue
            src = x[b, ci, iy]
            for j in range(cols):
                ix = j * stride + p - pad
                dst[j] = src[ix] if 0 <= ix < w else 0.0


@njit(cache=True, inline="always", fastmath={"contract"})
def _two_filters(d0, d1, wa, wb, r0, r1, r2, ow, sx):
    """d0 += conv of padded rows r0..r2 (each (sx, columns)) with 3x3 filter wa, d1 with wb, for ow columns.
    Literal phase and shift indices in each stride's loop keep every index provably non-negative (so the loop
    vectorizes) and the loop's arrays few (LLVM checks each pair for overlap)."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = (wa[0, 0], wa[0, 1], wa[0, 2], wa[1, 0], wa[1, 1], wa[1, 2], wa[2, 0],
                                          wa[2, 1], wa[2, 2])
    e0, e1, e2, e3, e4, e5, e6, e7, e8 = (wb[0, 0], wb[0, 1], wb[0, 2], wb[1, 0], wb[1, 1], wb[1, 2], wb[2, 0],
                                          wb[2, 1], wb[2, 2])
    if sx == 1:
        for i in range(ow):
            v0, v1, v2 = r0[0, i], r0[0, i + 1], r0[0, i + 2]
            v3, v4, v5 = r1[0, i], r1[0, i + 1], r1[0, i + 2]
            v6, v7, v8 = r2[0, i], r2[0, i + 1], r2[0, i + 2]
            d0[i] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3 + a4 * v4 + a5 * v5 + a6 * v6 + a7 * v7 + a8 * v8
            d1[i] += e0 * v0 + e1 * v1 + e2 * v2 + e3 * v3 + e4 * v4 + e5 * v5 + e6 * v6 + e7 * v7 + e8 * v8
    else:                       # stride 2: columns 2i, 2i + 1, 2i + 2 = phase 0 at i, phase 1 at i, phase 0 at i + 1
        for i in range(ow):
            v0, v1, v2 = r0[0, i], r0[1, i], r0[0, i + 1]
            v3, v4, v5 = r1[0, i], r1[1, i], r1[0, i + 1]
            v6, v7, v8 = r2[0, i], r2[1, i], r2[0, i + 1]
            d0[i] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3 + a4 * v4 + a5 * v5 + a6 * v6 + a7 * v7 + a8 * v8
            d1[i] += e0 * v0 + e1 * v1 + e2 * v2 + e3 * v3 + e4 * v4 + e5 * v5 + e6 * v6 + e7 * v7 + e8 * v8


@njit(cache=True, parallel=True, nogil=True, fastmath={"contract"})
def direct3x3_forward(xp, w, bias, sy, oh, ow, code, y, rows_per_job):
    """y = act(conv3x3(x) + bias) from pad_split's xp (column stride xp.shape[3]: 1 or 2), by jobs of
    `rows_per_job` output rows of one image; fastmath only lets multiply and add fuse."""
    nb, c, _, sx, _ = xp.shape
    n = w.shape[0]
    s = oh * ow
    jobs_per_img = (oh + rows_per_job - 1) // rows_per_job
    yflat = y.reshape(-1)
    for job in prange(nb * jobs_per_img):
        b, oy0, oy1 = row_block(job, jobs_per_img, rows_per_job, oh)
        spare = np.empty(ow, dtype=y.dtype)      # the partner row of an odd last filter
        for oy in range(oy0, oy1):
            r = oy * sy
            for f0 in range(0, n, 2):
                base0 = (b * n + f0) * s + oy * ow
                d0 = yflat[base0:base0 + ow]
                if f0 + 1 < n:
                    f1 = f0 + 1
                    d1 = yflat[base0 + s:base0 + s + ow]
                else:
                    f1 = f0
                    d1 = spare
                for i in range(ow):
                    d0[i] = 0.0
                    d1[i] = 0.0
                for ci in range(c):
                    _two_filters(d0, d1, w[f0, ci], w[f1, ci], xp[b, ci, r], xp[b, ci, r + 1], xp[b, ci, r + 2],
                                 ow, sx)
            for f in range(n):          # the epilogue while the rows are still in cache
                base = (b * n + f) * s + oy * ow
                bias_act_row(yflat, base, base + ow, bias[f], code)
