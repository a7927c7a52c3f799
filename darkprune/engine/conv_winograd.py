"""Numba kernels of the convolution's Winograd F(4x4, 3x3) path (3x3, stride 1, dilation 1, ungrouped):
filter transform, input transform, output transform with fused bias + activation.

Two layouts: compact (tiles of one band side by side) and, for wide images, "long" (one dummy tile per band so all
bands form one flat run and each transform step is one long vector loop). The 36 GEMMs in between are
darkprune.engine.conv_gemm._batched_gemm; darkprune.engine.conv chooses the layout and sizes the scratch.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from darkprune.engine.activations import bias_act_row, typed

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
