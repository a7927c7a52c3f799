"""Darknet's pooling layers: [maxpool] (incl. maxpool_depth), [avgpool] (global) and [local_avgpool].

Semantics follow AlexeyAB's maxpool_layer.c / avgpool_layer.c:
- output size: out = (w + padding - size) / stride + 1 with C's truncating division; `padding` defaults to size-1 in
  the cfg (the caller resolves defaults);
- the window of output (i, j) starts at (i*stride_y - padding/2, j*stride_x - padding/2), padding/2 truncating, so
  an odd padding puts the extra cell right/bottom (padding=1: all of it);
- maxpool reads cells outside the image as -FLT_MAX and keeps the first maximum in row-major window order (strict >);
- local_avgpool averages the in-image cells of the window and divides by their count (not by size*size).

Every function works on float32 or float64 NCHW C-contiguous arrays (numba compiles one version per dtype).
Backward functions return dL/dinput given dL/doutput.
"""
import numpy as np
import numba
from numba import njit, prange

FLT_MAX = 3.4028234663852886e38  # C's FLT_MAX: Darknet's value for out-of-image maxpool reads


def _c_div(a: int, b: int) -> int:
    """C's integer division (truncates toward zero), as Darknet computes output sizes."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def pool_output_hw(h: int, w: int, size: int, stride_x: int, stride_y: int, padding: int) -> tuple[int, int]:
    """Output (height, width) of a Darknet maxpool/local_avgpool: (in + padding - size) / stride + 1."""
    return _c_div(h + padding - size, stride_y) + 1, _c_div(w + padding - size, stride_x) + 1


def _check_input(x: np.ndarray, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected an NCHW array, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: expected float32 or float64, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")


def _output(out, shape, dtype, name):
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{name}: out must be a C-contiguous {dtype} array of shape {tuple(shape)}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# maxpool
#
# Kernels work row by row: for each output row, each window row n and window column m sweep the output row's
# columns j (innermost, a strided read the compiler vectorises), keeping a cell only if strictly greater. Per output
# cell the candidates are still visited in Darknet's row-major window order, so the same maximum (and, for ties, the
# same first cell) wins; out-of-image cells are skipped, which is what reading them as -FLT_MAX amounts to.
# Each kernel has a serial and a parallel (over N*C planes) entry: a parallel region costs tens of microseconds on
# an idle machine and milliseconds on a busy one, so small layers (most of a YOLO's) run serially.

PARALLEL_MIN_WORK = 1 << 19  # window reads per call above which the parallel kernels are used


@njit(cache=True, nogil=True)
def _valid_cols(col0, sx, w, out_w):
    """Output columns j whose input column col0 + j*sx lies inside [0, w)."""
    j_lo = 0
    if col0 < 0:
        j_lo = (-col0 + sx - 1) // sx
    if col0 > w - 1:
        return j_lo, j_lo
    return j_lo, min(out_w, (w - 1 - col0) // sx + 1)


@njit(cache=True, nogil=True, inline="always")
def _maxpool_plane_2x2s2(xp, op):
    """size 2, stride 2, every window inside the plane (YOLO's downsampling pool): the four cells in Darknet's
    window order, each kept only if strictly greater, as _maxpool_plane does."""
    out_h, out_w = op.shape
    for i in range(out_h):
        r0 = xp[2 * i]
        r1 = xp[2 * i + 1]
        orow = op[i]
        for j in range(out_w):
            m = -FLT_MAX
            v = r0[2 * j]
            m = v if v > m else m
            v = r0[2 * j + 1]
            m = v if v > m else m
            v = r1[2 * j]
            m = v if v > m else m
            v = r1[2 * j + 1]
            orow[j] = v if v > m else m


@njit(cache=True, nogil=True)
def _maxpool_plane(xp, op, ip, base, size, sx, sy, off, want_idx):
    h, w = xp.shape
    out_h, out_w = op.shape
    if (not want_idx and size == 2 and sx == 2 and sy == 2 and off == 0 and 2 * out_h <= h
            and 2 * out_w <= w):
        _maxpool_plane_2x2s2(xp, op)
        return
    for i in range(out_h):
        h0 = off + i * sy
        orow = op[i]
        for j in range(out_w):
            orow[j] = -FLT_MAX
        irow = ip[i] if want_idx else ip[0]  # ip is a dummy (1, 1) array when indices are not wanted
        if want_idx:
            for j in range(out_w):
                irow[j] = -1
        for n in range(max(0, -h0), min(size, h - h0)):
            r = h0 + n
            xrow = xp[r]
            for m in range(size):
                col0 = off + m
                j_lo, j_hi = _valid_cols(col0, sx, w, out_w)
                if want_idx:
                    for j in range(j_lo, j_hi):
                        v = xrow[col0 + j * sx]
                        if v > orow[j]:
                            orow[j] = v
                            irow[j] = base + r * w + col0 + j * sx
                else:
                    for j in range(j_lo, j_hi):
                        v = xrow[col0 + j * sx]
                        o = orow[j]
                        orow[j] = v if v > o else o


@njit(cache=True, nogil=True)
def _maxpool_plane_separable(xp, op, rows, size, sx, sy, off):
    # Inference only (no indices), for windows of 3 and more: the max over a window is the max over its rows of
    # each row's max over the window's columns, so first each input row's column maxima (rows: (H, out_w)), then
    # the maxima over window rows: 2*size reads per output instead of size^2. Strict '>' keeps Darknet's values.
    h, w = xp.shape
    out_h, out_w = op.shape
    for r in range(h):
        rrow = rows[r]
        xrow = xp[r]
        for j in range(out_w):
            rrow[j] = -FLT_MAX
        for m in range(size):
            col0 = off + m
            j_lo, j_hi = _valid_cols(col0, sx, w, out_w)
            for j in range(j_lo, j_hi):
                v = xrow[col0 + j * sx]
                o = rrow[j]
                rrow[j] = v if v > o else o
    for i in range(out_h):
        h0 = off + i * sy
        orow = op[i]
        for j in range(out_w):
            orow[j] = -FLT_MAX
        for n in range(max(0, -h0), min(size, h - h0)):
            rrow = rows[h0 + n]
            for j in range(out_w):
                v = rrow[j]
                o = orow[j]
                orow[j] = v if v > o else o


@njit(cache=True, nogil=True, inline="always")
def _maxpool_plane_flat_s1(xp, op, size, off, buf):
    """Stride 1, inference only: the plane padded with -FLT_MAX (what Darknet's skipped cells amount to) into
    buf, then the maxima over window columns and over window rows each as one flat run over the padded width
    (positions past a row's output columns are computed and dropped): long loops indexed from 0 that vectorise,
    where the row-by-row kernels spend their time in loop overhead on the small planes of an SPP block. Each max
    is `v if v > m else m` from -FLT_MAX, so a NaN is skipped as Darknet skips it, and the result does not depend
    on the order the window is visited in."""
    h, w = xp.shape
    oh, ow = op.shape
    hp = oh + size - 1
    wp = ow + size - 1
    low = -FLT_MAX
    padded = buf[:hp * wp]
    left = -off
    for rr in range(hp):
        r = rr + off
        row = padded[rr * wp:(rr + 1) * wp]
        if r < 0 or r >= h:
            for q in range(wp):
                row[q] = low
            continue
        for q in range(left):
            row[q] = low
        inner = row[left:]
        src = xp[r]
        for q in range(w):
            inner[q] = src[q]
        tail = row[left + w:]
        for q in range(tail.size):
            tail[q] = low
    n1 = (hp - 1) * wp + ow            # row maxima at every padded row, valid at columns < ow
    rows = buf[hp * wp:hp * wp + n1]
    for i in range(n1):
        rows[i] = low
    for m in range(size):
        src = padded[m:m + n1]
        for i in range(n1):
            v = src[i]
            o = rows[i]
            rows[i] = v if v > o else o
    n2 = (oh - 1) * wp + ow
    cols = buf[:n2]                    # the padded plane is no longer needed
    for i in range(n2):
        cols[i] = low
    for n in range(size):
        src = rows[n * wp:n * wp + n2]
        for i in range(n2):
            v = src[i]
            o = cols[i]
            cols[i] = v if v > o else o
    for oy in range(oh):
        dst = op[oy]
        src = cols[oy * wp:]
        for ox in range(ow):
            dst[ox] = src[ox]


@njit(cache=True, nogil=True)
def _maxpool_s1_serial(x, out, size, pad, buf):
    n_batch, channels = x.shape[0], x.shape[1]
    off = -(pad // 2)
    for bc in range(n_batch * channels):
        _maxpool_plane_flat_s1(x[bc // channels, bc % channels], out[bc // channels, bc % channels], size, off,
                               buf[0])


@njit(cache=True, parallel=True, nogil=True)
def _maxpool_s1_parallel(x, out, size, pad, buf):
    n_batch, channels = x.shape[0], x.shape[1]
    off = -(pad // 2)
    for bc in prange(n_batch * channels):
        _maxpool_plane_flat_s1(x[bc // channels, bc % channels], out[bc // channels, bc % channels], size, off,
                               buf[numba.get_thread_id()])


@njit(cache=True, nogil=True)
def _maxpool_serial(x, out, idx, size, sx, sy, pad, want_idx):
    n_batch, channels, h, w = x.shape
    off = -(pad // 2)
    separable = size >= 3 and not want_idx
    rows = np.empty((h, out.shape[3]), x.dtype)
    for bc in range(n_batch * channels):
        b, k = bc // channels, bc % channels
        if separable:
            _maxpool_plane_separable(x[b, k], out[b, k], rows, size, sx, sy, off)
        else:
            _maxpool_plane(x[b, k], out[b, k], idx[b, k] if want_idx else idx[0, 0], bc * h * w, size, sx, sy,
                           off, want_idx)


@njit(cache=True, parallel=True, nogil=True)
def _maxpool_parallel(x, out, idx, size, sx, sy, pad, want_idx):
    n_batch, channels, h, w = x.shape
    off = -(pad // 2)
    separable = size >= 3 and not want_idx
    for bc in prange(n_batch * channels):
        b, k = bc // channels, bc % channels
        if separable:
            rows = np.empty((h, out.shape[3]), x.dtype)
            _maxpool_plane_separable(x[b, k], out[b, k], rows, size, sx, sy, off)
        else:
            _maxpool_plane(x[b, k], out[b, k], idx[b, k] if want_idx else idx[0, 0], bc * h * w, size, sx, sy,
                           off, want_idx)


@njit(cache=True, nogil=True)
def _maxpool_depth_kernel(x, out, idx, want_idx):
    n_batch, channels, h, w = x.shape
    groups = out.shape[1]
    hw = h * w
    for b in range(n_batch):
        for g in range(groups):
            for p in range(hw):
                y = p // w
                xx = p % w
                best = -FLT_MAX
                best_i = -1
                for k in range(g, channels, groups):
                    val = x[b, k, y, xx]
                    if val > best:
                        best = val
                        best_i = (b * channels + k) * hw + p
                out[b, g, y, xx] = best
                if want_idx:
                    idx[b, g, y, xx] = best_i


@njit(cache=True, nogil=True)
def _scatter_argmax(grad_out_flat, idx_flat, grad_in_flat):
    # Serial: with overlapping windows (stride < size) several outputs can route to one input cell.
    for i in range(grad_out_flat.size):
        t = idx_flat[i]
        if t >= 0:
            grad_in_flat[t] += grad_out_flat[i]


def _index_array(x, shape, wanted, dummy_shape):
    # int32 like Darknet's l.indexes: half the memory of int64 for a training run's saved indices
    if wanted and x.size >= 2 ** 31:
        raise ValueError(f"maxpool: input of {x.size} values is too large for int32 indices")
    return np.empty(shape if wanted else dummy_shape, np.int32)


def _window_output_shape(x: np.ndarray, size: int, stride_x: int, stride_y: int, padding: int,
                         name: str) -> tuple[int, int, int, int]:
    """(N, C, out_h, out_w) of a windowed pool over x, after checking x and the window (errors name the layer)."""
    _check_input(x, name)
    if size < 1 or stride_x < 1 or stride_y < 1 or padding < 0:
        raise ValueError(f"{name}: bad size={size} stride_x={stride_x} stride_y={stride_y} padding={padding}")
    n, c, h, w = x.shape
    out_h, out_w = pool_output_hw(h, w, size, stride_x, stride_y, padding)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{name}: a {w}x{h} input is too small for size={size}, padding={padding}")
    return n, c, out_h, out_w


def maxpool_forward(x: np.ndarray, size: int, stride_x: int, stride_y: int, padding: int,
                    return_indices: bool = False, out: np.ndarray | None = None):
    """Darknet [maxpool] (not maxpool_depth). x: (N, C, H, W). Returns out (N, C, out_h, out_w), or (out, indices)
    with return_indices: int32 flat indices into x of each output's maximum (-1 if none), for maxpool_backward."""
    n, c, out_h, out_w = _window_output_shape(x, size, stride_x, stride_y, padding, "maxpool")
    out = _output(out, (n, c, out_h, out_w), x.dtype, "maxpool")
    idx = _index_array(x, out.shape, return_indices, (1, 1, 1, 1))
    parallel = out.size * size * size >= PARALLEL_MIN_WORK
    if stride_x == stride_y == 1 and size >= 2 and not return_indices:
        threads = numba.get_num_threads() if parallel else 1
        buf = np.empty((threads, 2 * (out_h + size - 1) * (out_w + size - 1)), x.dtype)
        (_maxpool_s1_parallel if parallel else _maxpool_s1_serial)(x, out, size, padding, buf)
    else:
        kernel = _maxpool_parallel if parallel else _maxpool_serial
        kernel(x, out, idx, size, stride_x, stride_y, padding, return_indices)
    return (out, idx) if return_indices else out


def maxpool_depth_forward(x: np.ndarray, out_channels: int, return_indices: bool = False,
                          out: np.ndarray | None = None):
    """Darknet [maxpool] with maxpool_depth=1: output channel g is the max over input channels g, g+out_channels,
    g+2*out_channels, ...; spatial size unchanged (size/stride/padding are ignored, as in Darknet)."""
    _check_input(x, "maxpool_depth")
    n, c, h, w = x.shape
    if not 1 <= out_channels <= c:
        raise ValueError(f"maxpool_depth: out_channels={out_channels} must be in 1..{c}")
    out = _output(out, (n, out_channels, h, w), x.dtype, "maxpool_depth")
    idx = _index_array(x, out.shape, return_indices, (1, 1, 1, 1))
    _maxpool_depth_kernel(x, out, idx, return_indices)
    return (out, idx) if return_indices else out


def maxpool_backward(grad_out: np.ndarray, indices: np.ndarray, x_shape: tuple) -> np.ndarray:
    """Gradient of maxpool / maxpool_depth: each output's gradient goes to the input cell that was its maximum
    (indices from the forward pass with return_indices=True). Returns dL/dx of shape x_shape."""
    if indices.shape != grad_out.shape:
        raise ValueError("maxpool_backward: indices and grad_out shapes differ")
    grad_in = np.zeros(x_shape, grad_out.dtype)
    _scatter_argmax(np.ascontiguousarray(grad_out).reshape(-1), np.ascontiguousarray(indices).reshape(-1),
                    grad_in.reshape(-1))
    return grad_in


# ----------------------------------------------------------------------------------------------------------------
# avgpool (global)


@njit(cache=True, nogil=True)
def _avgpool_kernel(x, out, zero):
    # memory-bound: serial (a parallel region costs more than it saves on these sizes)
    n_batch, channels, h, w = x.shape
    hw = h * w
    for bc in range(n_batch * channels):
        b = bc // channels
        k = bc % channels
        acc = zero  # typed zero: accumulate in the array's precision, as Darknet does in float
        for y in range(h):
            for xx in range(w):
                acc += x[b, k, y, xx]
        out[b, k, 0, 0] = acc / hw


def avgpool_forward(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [avgpool]: global average over H x W. (N, C, H, W) -> (N, C, 1, 1)."""
    _check_input(x, "avgpool")
    n, c = x.shape[:2]
    out = _output(out, (n, c, 1, 1), x.dtype, "avgpool")
    _avgpool_kernel(x, out, x.dtype.type(0))
    return out


def avgpool_backward(grad_out: np.ndarray, x_shape: tuple) -> np.ndarray:
    """Gradient of the global average: dL/dx = dL/dout / (H*W), broadcast over H x W."""
    h, w = x_shape[2], x_shape[3]
    grad = np.empty(x_shape, grad_out.dtype)
    grad[...] = grad_out.reshape(x_shape[0], x_shape[1], 1, 1) / grad_out.dtype.type(h * w)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# local_avgpool


@njit(cache=True, nogil=True)
def _local_avgpool_plane(xp, op, size, sx, sy, off, zero):
    # Row by row as maxpool; per output cell the sum runs in Darknet's (n, m) order from 0, so the float result is
    # Darknet's. The count of in-image cells factors into (valid rows) * (valid columns).
    h, w = xp.shape
    out_h, out_w = op.shape
    for i in range(out_h):
        h0 = off + i * sy
        orow = op[i]
        for j in range(out_w):
            orow[j] = zero
        n_lo, n_hi = max(0, -h0), min(size, h - h0)
        for n in range(n_lo, n_hi):
            xrow = xp[h0 + n]
            for m in range(size):
                col0 = off + m
                j_lo, j_hi = _valid_cols(col0, sx, w, out_w)
                for j in range(j_lo, j_hi):
                    orow[j] += xrow[col0 + j * sx]
        for j in range(out_w):
            w0 = off + j * sx
            orow[j] = orow[j] / ((n_hi - n_lo) * (min(size, w - w0) - max(0, -w0)))


@njit(cache=True, nogil=True)
def _local_avgpool_serial(x, out, size, sx, sy, pad, zero):
    for b in range(x.shape[0]):
        for k in range(x.shape[1]):
            _local_avgpool_plane(x[b, k], out[b, k], size, sx, sy, -(pad // 2), zero)


@njit(cache=True, parallel=True, nogil=True)
def _local_avgpool_parallel(x, out, size, sx, sy, pad, zero):
    channels = x.shape[1]
    for bc in prange(x.shape[0] * channels):
        _local_avgpool_plane(x[bc // channels, bc % channels], out[bc // channels, bc % channels], size, sx, sy,
                             -(pad // 2), zero)


@njit(cache=True, nogil=True)
def _local_avgpool_backward_kernel(grad_out, grad_in, size, sx, sy, pad):
    n_batch, channels, h, w = grad_in.shape
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    off = -(pad // 2)
    for b in range(n_batch):
        for k in range(channels):
            for i in range(out_h):
                h0 = off + i * sy
                n_lo, n_hi = max(0, -h0), min(size, h - h0)
                for j in range(out_w):
                    w0 = off + j * sx
                    m_lo, m_hi = max(0, -w0), min(size, w - w0)
                    g = grad_out[b, k, i, j] / ((n_hi - n_lo) * (m_hi - m_lo))
                    for n in range(n_lo, n_hi):
                        for m in range(m_lo, m_hi):
                            grad_in[b, k, h0 + n, w0 + m] += g


def local_avgpool_forward(x: np.ndarray, size: int, stride_x: int, stride_y: int, padding: int,
                          out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [local_avgpool]: windowed average with maxpool's geometry; each output divides by the number of
    in-image cells in its window."""
    shape = _window_output_shape(x, size, stride_x, stride_y, padding, "local_avgpool")
    out = _output(out, shape, x.dtype, "local_avgpool")
    kernel = _local_avgpool_parallel if out.size * size * size >= PARALLEL_MIN_WORK else _local_avgpool_serial
    kernel(x, out, size, stride_x, stride_y, padding, x.dtype.type(0))
    return out


def local_avgpool_backward(grad_out: np.ndarray, x_shape: tuple, size: int, stride_x: int, stride_y: int,
                           padding: int) -> np.ndarray:
    """Exact gradient of local_avgpool_forward (each window's gradient split over its in-image cells).
    Darknet's own backward divides by size*size instead, which is not the forward's derivative at the borders."""
    grad_in = np.zeros(x_shape, grad_out.dtype)
    _local_avgpool_backward_kernel(np.ascontiguousarray(grad_out), grad_in, size, stride_x, stride_y, padding)
    return grad_in
