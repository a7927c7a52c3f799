"""Numba kernels of the convolution's Winograd paths (3x3, stride 1, dilation 1, ungrouped): F(4x4, 3x3) and, for
small images at batch 1, F(2x2, 3x3); each a filter transform, an input transform and an output transform with
fused bias + activation.

Two layouts: compact (tiles of one band side by side) and, for wide images, "long" (one dummy tile per band so all
bands form one flat run and each transform step is one long vector loop). The 36 GEMMs in between are
darkprune.engine.conv_gemm.batched_gemm; darkprune.engine.conv chooses the layout and sizes the scratch.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from darkprune.engine.activations import bias_act_row, typed

# numba kernels: Winograd F(4x4, 3x3), stride 1, dilation 1
#   out = A^T [ (G g G^T) .* (B^T d B) ] A  on 6x6 input tiles d giving 4x4 output tiles


@njit(cache=True, parallel=True, nogil=True)
def wino_filter_transform(w, u):
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


# ----------------------------------------------------------------------------------------------------------------
# the transforms' building blocks, shared by both layouts (inlined: each caller's loops compile as if written out).
# They read and write slices indexed from 0, so that the loops vectorise.


@njit(cache=True, inline="always")
def _zero4(p0, p1, p2, p3, n):
    for j in range(n):
        p0[j] = 0.0
        p1[j] = 0.0
        p2[j] = 0.0
        p3[j] = 0.0


@njit(cache=True, inline="always")
def _split_edge4(xr, t, j, p0, p1, p2, p3):
    """p_l[j] = xr[t + l] (0 outside the row) for one column group near the row's ends."""
    wd = xr.shape[0]
    p0[j] = xr[t] if 0 <= t < wd else 0.0
    p1[j] = xr[t + 1] if 0 <= t + 1 < wd else 0.0
    p2[j] = xr[t + 2] if 0 <= t + 2 < wd else 0.0
    p3[j] = xr[t + 3] if 0 <= t + 3 < wd else 0.0


@njit(cache=True, inline="always")
def _split_row4(xr, pad, j0, j1, n, p0, p1, p2, p3):
    """One zero-padded row split by column phase: p_l[j] = padded[4j + l], padded[q] = xr[q - pad] (0 outside),
    j < n. Columns j0..j1 lie inside the row: 4 contiguous values move per step; the few at either end are checked."""
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
    for j in range(min(j0, n)):
        _split_edge4(xr, 4 * j - pad, j, p0, p1, p2, p3)
    for j in range(j1, n):
        _split_edge4(xr, 4 * j - pad, j, p0, p1, p2, p3)


@njit(cache=True, inline="always")
def _bt6(d0, d1, d2, d3, d4, d5, out, start, stride, n, four, five, two):
    """B^T of six inputs, n at a time: out[start + k*stride + j] = (B^T (d0[j], ..., d5[j]))[k], k = 0..5."""
    o0 = out[start:start + n]
    o1 = out[start + stride:start + stride + n]
    o2 = out[start + 2 * stride:start + 2 * stride + n]
    o3 = out[start + 3 * stride:start + 3 * stride + n]
    o4 = out[start + 4 * stride:start + 4 * stride + n]
    o5 = out[start + 5 * stride:start + 5 * stride + n]
    for j in range(n):
        a0 = d0[j]
        a1 = d1[j]
        a2 = d2[j]
        a3 = d3[j]
        a4 = d4[j]
        a5 = d5[j]
        o0[j] = four * a0 - five * a2 + a4
        o1[j] = a3 + a4 - four * (a1 + a2)
        o2[j] = four * (a1 - a2) - a3 + a4
        o3[j] = two * (a3 - a1) - a2 + a4
        o4[j] = two * (a1 - a3) - a2 + a4
        o5[j] = four * a1 - five * a3 + a5


@njit(cache=True, inline="always")
def _bt6_rows(t, i, n_in, out, start, stride, n, four, five, two):
    """The row step of the input transform for row i of every tile: t[(l*6 + i)*n_in + tile] holds the column step's
    result per column phase l; a tile's 6 columns are phases 0..3 at its own index and phases 0, 1 at the next."""
    _bt6(t[i * n_in:], t[(6 + i) * n_in:], t[(12 + i) * n_in:], t[(18 + i) * n_in:], t[i * n_in + 1:],
         t[(6 + i) * n_in + 1:], out, start, stride, n, four, five, two)


@njit(cache=True, inline="always")
def _at6(s0, s1, s2, s3, s4, s5, out, start, stride, n, two, four, eight):
    """A^T of six inputs, n at a time: out[start + r*stride + k] = (A^T (s0[k], ..., s5[k]))[r], r = 0..3."""
    o0 = out[start:start + n]
    o1 = out[start + stride:start + stride + n]
    o2 = out[start + 2 * stride:start + 2 * stride + n]
    o3 = out[start + 3 * stride:start + 3 * stride + n]
    for k in range(n):
        a = s1[k] + s2[k]
        bb = s1[k] - s2[k]
        cc = s3[k] + s4[k]
        dd = s3[k] - s4[k]
        o0[k] = s0[k] + a + cc
        o1[k] = bb + two * dd
        o2[k] = a + four * cc
        o3[k] = bb + eight * dd + s5[k]


@njit(cache=True, inline="always")
def _at6_from_products(m, i, f, col, n, q, two, four, eight):
    """A^T along j of row i of n tiles' products m[i*6 + j, f, col + tile] into q[(i*4 + k)*n + tile]."""
    _at6(m[i * 6, f, col:col + n], m[i * 6 + 1, f, col:col + n], m[i * 6 + 2, f, col:col + n],
         m[i * 6 + 3, f, col:col + n], m[i * 6 + 4, f, col:col + n], m[i * 6 + 5, f, col:col + n],
         q, i * 4 * n, n, n, two, four, eight)


@njit(cache=True, inline="always")
def _at6_columns(q, k, n, o, two, four, eight):
    """A^T along i of output column k of n tiles: q[(i*4 + k)*n + tile] into o[(r*4 + k)*n + tile]."""
    _at6(q[k * n:], q[(4 + k) * n:], q[(8 + k) * n:], q[(12 + k) * n:], q[(16 + k) * n:], q[(20 + k) * n:],
         o, k * n, 4 * n, n, two, four, eight)


@njit(cache=True, inline="always")
def _interleave4(o, start, stride, dst, full, rest):
    """One output row from its tiles: dst[4*tx + k] = o[start + k*stride + tx] (the last tile may be cut to rest)."""
    c0 = o[start:]
    c1 = o[start + stride:]
    c2 = o[start + 2 * stride:]
    c3 = o[start + 3 * stride:]
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


# ----------------------------------------------------------------------------------------------------------------
# compact layout: the tiles of one band side by side


@njit(cache=True, inline="always")
def _phase_split4(x, b, c, pad, hp, tw1, ph):
    """The zero-padded plane x[b, c] split by column phase: ph[(l*hp + r)*tw1 + j] = padded[r, 4j + l], l = 0..3,
    padded[r, q] = x[b, c, r - pad, q - pad] (0 outside). Every entry is written once."""
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
            _zero4(p0, p1, p2, p3, tw1)
        else:
            _split_row4(x[b, c, r - pad], pad, j0, j1, tw1, p0, p1, p2, p3)


def wino_input_scratch_elements(th, tw):
    hp = 4 * th + 2
    return 4 * hp * (tw + 1) + 24 * (tw + 1)


@njit(cache=True, parallel=True, nogil=True)
def wino_input_transform(x, pad, th, tw, v, ws):
    """x (nb, c, h, w) -> v (36, c, nb*th*tw): B^T d B for every 6x6 tile (tile origin (4ty - pad, 4tx - pad)).

    Per (image, channel): the padded plane is split into its 4 column phases (so a tile's 6 columns are phase
    0,1,2,3 of tile tx and phase 0,1 of tile tx+1: contiguous runs over tx), then for each band of 6 rows the column
    transform runs per phase and the row transform across phases, both as contiguous loops over the tiles."""
    nb, nc, h, wd = x.shape
    ntiles = th * tw
    hp = 4 * th + 2
    tw1 = tw + 1
    plane = hp * tw1
    vflat = v.reshape(-1)
    vstride = nc * v.shape[2]   # from v[a, c, t] to v[a + 1, c, t]
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
            # column transform (over the band's 6 rows), phase by phase
            for l in range(4):
                base = l * plane + 4 * ty * tw1
                _bt6(ph[base:], ph[base + tw1:], ph[base + 2 * tw1:], ph[base + 3 * tw1:], ph[base + 4 * tw1:],
                     ph[base + 5 * tw1:], t, l * 6 * tw1, tw1, tw1, four, five, two)
            # row transform into v[i*6 + k, c, tiles of this band]
            col0 = b * ntiles + ty * tw
            for i in range(6):
                _bt6_rows(t, i, tw1, vflat, (i * 6 * nc + c) * v.shape[2] + col0, vstride, tw, four, five, two)


def wino_output_scratch_elements(tw):
    return 40 * tw


@njit(cache=True, parallel=True, nogil=True)
def wino_output_transform(m, bias, th, tw, code, y, ws):
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
            for i in range(6):
                _at6_from_products(m, i, f, col0, tw, q, two, four, eight)
            for k in range(4):
                _at6_columns(q, k, tw, o, two, four, eight)
            for r in range(min(4, oh - 4 * ty)):
                row = (b * nf + f) * oh + 4 * ty + r
                _interleave4(o, r * 4 * tw, tw, yflat[row * ow:(row + 1) * ow], full, rest)
        start = job * oh * ow
        bias_act_row(yflat, start, start + oh * ow, bias[f], code)


# ----------------------------------------------------------------------------------------------------------------
# long layout (wide images): every band carries one dummy tile (tx = tw), so that the tiles of all bands form one
# flat run of th*(tw+1) and every transform step is a single long vectorised loop over it.


def wino_long_input_scratch_elements(th, tw):
    return 16 * (th + 1) * (tw + 1) + 24 * th * (tw + 1) + 1


@njit(cache=True, parallel=True, nogil=True)
def wino_input_long(x, pad, th, tw, v, ws):
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
    vflat = v.reshape(-1)
    vstride = nc * v.shape[2]
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
            # padded row pr is row phase pr % 4 of phase-grid row pr // 4
            base = (pr % 4) * 4 * n2 + (pr // 4) * tw1
            p0 = ph[base:base + tw1]
            p1 = ph[base + n2:base + n2 + tw1]
            p2 = ph[base + 2 * n2:base + 2 * n2 + tw1]
            p3 = ph[base + 3 * n2:base + 3 * n2 + tw1]
            r = pr - pad
            if r < 0 or r >= h:
                _zero4(p0, p1, p2, p3, tw1)
            else:
                _split_row4(x[b, c, r], pad, j0, j1, tw1, p0, p1, p2, p3)
        # column transform (B^T over the tile's 6 rows: row phases 0..3 here, 0 and 1 one grid row on), per phase l
        for l in range(4):
            _bt6(ph[l * n2:], ph[(4 + l) * n2:], ph[(8 + l) * n2:], ph[(12 + l) * n2:], ph[l * n2 + tw1:],
                 ph[(4 + l) * n2 + tw1:], t, l * 6 * flat, flat, flat, four, five, two)
        # row transform (B over the tile's 6 columns) into v[i*6 + k, c, this image's tiles]
        for i in range(6):
            _bt6_rows(t, i, flat, vflat, (i * 6 * nc + c) * v.shape[2] + b * flat, vstride, flat, four, five, two)


def wino_long_output_scratch_elements(th, tw):
    return 40 * th * (tw + 1)


@njit(cache=True, parallel=True, nogil=True)
def wino_output_long(m, bias, th, tw, code, y, ws):
    """m (36, n, nb*th*(tw+1)) (layout of wino_input_long) -> y = act(A^T m A + bias), flat loops over the tiles."""
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
        for i in range(6):
            _at6_from_products(m, i, f, b * flat, flat, q, two, four, eight)
        for k in range(4):
            _at6_columns(q, k, flat, o, two, four, eight)
        plane = (b * nf + f) * oh * ow
        for oy in range(oh):
            _interleave4(o, (oy % 4) * 4 * flat + (oy // 4) * tw1, flat, yflat[plane + oy * ow:plane + (oy + 1) * ow],
                         full, rest)
        bias_act_row(yflat, plane, plane + oh * ow, bias[f], code)


# ----------------------------------------------------------------------------------------------------------------
# numba kernels: Winograd F(2x2, 3x3) for small images at batch 1 (13x13, 26x26)
#   out = A^T [ (G g G^T) .* (B^T d B) ] A  on 4x4 input tiles d giving 2x2 output tiles
# F(4x4) needs 2.25x fewer multiplies but 36 GEMMs of very few columns on 2.25x more transformed weights: on a
# 13x13 image (16 tiles) those GEMMs stream 36 x n x c weights for 16 columns each and are memory-bound. F(2x2)'s 16
# GEMMs read 16 x n x c weights for 49 columns: yolov3-tiny's 512->1024 3x3 at 13x13, batch 1, 15.6 -> 13.2 ms on one
# thread, 8.1 -> 6.8 on two; at batch 8 or on larger images F(4x4) wins (darkprune.engine.conv chooses). Plain
# per-tile loops suffice here: the transforms are a few percent of these layers' time.

@njit(cache=True, parallel=True, nogil=True)
def wino2x2_filter_transform(w, u):
    """w (n, c, 3, 3) -> u (16, n, c) = G w G^T, G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]]."""
    nf, nc = w.shape[0], w.shape[1]
    for f in prange(nf):
        t = np.empty((4, 3), dtype=np.float64)
        for c in range(nc):
            for j in range(3):
                g0 = w[f, c, 0, j]
                g1 = w[f, c, 1, j]
                g2 = w[f, c, 2, j]
                t[0, j] = g0
                t[1, j] = (g0 + g1 + g2) / 2.0
                t[2, j] = (g0 - g1 + g2) / 2.0
                t[3, j] = g2
            for i in range(4):
                g0 = t[i, 0]
                g1 = t[i, 1]
                g2 = t[i, 2]
                u[i * 4 + 0, f, c] = g0
                u[i * 4 + 1, f, c] = (g0 + g1 + g2) / 2.0
                u[i * 4 + 2, f, c] = (g0 - g1 + g2) / 2.0
                u[i * 4 + 3, f, c] = g2


@njit(cache=True, parallel=True, nogil=True)
def wino2x2_input_transform(x, pad, th, tw, v):
    """x (nb, c, h, w) -> v (16, c, nb*th*tw) = B^T d B on the 4x4 input tiles d at (2ty - pad, 2tx - pad)."""
    nb, nc, h, w = x.shape
    ntiles = th * tw
    for job in prange(nb * nc):
        b = job // nc
        c = job % nc
        d = np.zeros(16, dtype=x.dtype)
        for ty in range(th):
            for tx in range(tw):
                y0 = 2 * ty - pad
                x0 = 2 * tx - pad
                for i in range(4):
                    yy = y0 + i
                    for j in range(4):
                        xx = x0 + j
                        if 0 <= yy < h and 0 <= xx < w:
                            d[i * 4 + j] = x[b, c, yy, xx]
                        else:
                            d[i * 4 + j] = 0
                # rows: B^T d  (B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]])
                col = b * ntiles + ty * tw + tx
                for j in range(4):
                    r0 = d[j] - d[8 + j]
                    r1 = d[4 + j] + d[8 + j]
                    r2 = d[8 + j] - d[4 + j]
                    r3 = d[4 + j] - d[12 + j]
                    d[j] = r0
                    d[4 + j] = r1
                    d[8 + j] = r2
                    d[12 + j] = r3
                for i in range(4):
                    a0 = d[i * 4]
                    a1 = d[i * 4 + 1]
                    a2 = d[i * 4 + 2]
                    a3 = d[i * 4 + 3]
                    v[i * 4 + 0, c, col] = a0 - a2
                    v[i * 4 + 1, c, col] = a1 + a2
                    v[i * 4 + 2, c, col] = a2 - a1
                    v[i * 4 + 3, c, col] = a1 - a3


@njit(cache=True, parallel=True, nogil=True)
def wino2x2_output_transform(m, bias, th, tw, code, y):
    """m (16, n, nb*th*tw) -> y (nb, n, oh, ow) = act(A^T m A + bias), A^T = [[1,1,1,0],[0,1,-1,-1]]."""
    nb, nf, oh, ow = y.shape
    ntiles = th * tw
    yflat = y.reshape(-1)
    for job in prange(nb * nf):
        b = job // nf
        f = job % nf
        q = np.empty(8, dtype=y.dtype)
        for ty in range(th):
            for tx in range(tw):
                col = b * ntiles + ty * tw + tx
                for j in range(4):
                    s0 = m[j, f, col]
                    s1 = m[4 + j, f, col]
                    s2 = m[8 + j, f, col]
                    s3 = m[12 + j, f, col]
                    q[j] = s0 + s1 + s2
                    q[4 + j] = s1 - s2 - s3
                for r in range(2):
                    oy = 2 * ty + r
                    if oy < oh:
                        e0 = q[r * 4] + q[r * 4 + 1] + q[r * 4 + 2]
                        e1 = q[r * 4 + 1] - q[r * 4 + 2] - q[r * 4 + 3]
                        ox = 2 * tx
                        y[b, f, oy, ox] = e0
                        if ox + 1 < ow:
                            y[b, f, oy, ox + 1] = e1
        start = job * oh * ow
        bias_act_row(yflat, start, start + oh * ow, bias[f], code)
