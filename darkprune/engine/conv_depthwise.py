"""Numba kernels of the convolution's direct path for one input channel per group (depthwise, any channel
multiplier): forward with fused bias + activation, and backward.

3x3 filters are unrolled; stride 2 reads a parity-split copy of the padded plane so every load is contiguous.
Called by darkprune.engine.conv (Conv2dPlan, conv2d_backward).
"""

from __future__ import annotations

import numba
from numba import njit, prange

from darkprune.engine.activations import bias_act_row, typed

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


@njit(cache=True, inline="always")
def _taps3x3(a0, a1, a2, b0, b1, b2, c0, c1, c2, w, f, acc, n, step):
    """acc[i] = the 3x3 filter w[f, 0] over its 9 taps at index i*step of a* / b* / c*, the taps of filter rows
    0 / 1 / 2 (slices indexed from 0; step 1 has its own loop, which vectorises), in the data's precision and
    Darknet's tap order."""
    w00 = w[f, 0, 0, 0]
    w01 = w[f, 0, 0, 1]
    w02 = w[f, 0, 0, 2]
    w10 = w[f, 0, 1, 0]
    w11 = w[f, 0, 1, 1]
    w12 = w[f, 0, 1, 2]
    w20 = w[f, 0, 2, 0]
    w21 = w[f, 0, 2, 1]
    w22 = w[f, 0, 2, 2]
    if step == 1:
        for i in range(n):
            acc[i] = (w00 * a0[i] + w01 * a1[i] + w02 * a2[i] + w10 * b0[i] + w11 * b1[i] + w12 * b2[i]
                      + w20 * c0[i] + w21 * c1[i] + w22 * c2[i])
    else:
        for i in range(n):
            j = step * i
            acc[i] = (w00 * a0[j] + w01 * a1[j] + w02 * a2[j] + w10 * b0[j] + w11 * b1[j] + w12 * b2[j]
                      + w20 * c0[j] + w21 * c1[j] + w22 * c2[j])


@njit(cache=True, inline="always")
def _copy_rows_out(acc, row_len, yflat, plane, oh, ow):
    """Output rows from a result computed over the padded width: row oy is acc[oy*row_len:][:ow]."""
    for oy in range(oh):
        dst = yflat[plane + oy * ow:plane + (oy + 1) * ow]
        src = acc[oy * row_len:]
        for ox in range(ow):
            dst[ox] = src[ox]


@njit(cache=True, parallel=True, nogil=True)
def direct_1ch_forward(x, w, bias, sy, sx, pad, dil, oh, ow, code, y, ws):
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
                _taps3x3(a0, a1, a2, b0, b1, b2, c0, c1, c2, w, f, acc, n, 1)
                _copy_rows_out(acc, wp2, yflat, plane, oh, ow)
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
                _taps3x3(a0, a1, a2, b0, b1, b2, c0, c1, c2, w, f, acc, n, 1)
                _copy_rows_out(acc, wp, yflat, plane, oh, ow)
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
                    _taps3x3(a0, a1, a2, b0, b1, b2, c0, c1, c2, w, f, dst, ow, sx)
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
                _copy_rows_out(acc, wp, yflat, plane, oh, ow)
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
                _copy_rows_out(acc, wp, yflat, plane, oh, ow)
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


def direct_1ch_scratch_elements(h, w, oh, ow, kh, kw, sy, sx, pad, dil):
    hp = max(h + 2 * pad, (oh - 1) * sy + (kh - 1) * dil + 1)
    wp = max(w + 2 * pad, (ow - 1) * sx + (kw - 1) * dil + 1)
    return max(4 * ((hp + 1) // 2) * ((wp + 1) // 2) + oh * ((wp + 1) // 2) + 2, hp * wp + oh * wp)


@njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def direct_1ch_backward(x, w, gy, sy, sx, pad, dil, gx, gw_partial, ws):
    """Backward of direct_1ch_forward (pre-activation): gx += dL/dx, gw_partial[b, f] = image b's filter gradient.

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
