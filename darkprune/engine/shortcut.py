"""Darknet's [shortcut] layer (AlexeyAB's multi-input, optionally weighted version, shortcut_layer.c +
shortcut_multilayer_cpu in blas.c).

out = w0 * x_prev + sum_i w_{i+1} * x_from[i], where
- the addition runs over each sample's flattened C*H*W values: a `from` input adds to the first min(its size,
  x_prev's size) values. With equal H x W this is Darknet's "add over the common channels"; the output always has
  x_prev's shape;
- weights_type "none": all w = 1; "per_feature": weights shape (n+1,), one per input; "per_channel": weights shape
  (n+1, C), one per input and channel of x_prev (the .weights file order);
- weights_normalization "none", "relu" (w_k = relu(w_k) / (1e-4 + sum_j relu(w_j))) or "softmax"
  (w_k = exp(w_k - max_j w_j) / (1e-4 + sum_j exp(w_j - max_j w_j))), over the n+1 inputs (per channel).

The layer's activation is not applied here: the network runner applies it to the output (and its gradient to
grad_out before shortcut_backward), with the activation kernels.
Memory-bound, so the kernels run serially: on 2 cores a parallel region costs more than it saves here.
"""
import numpy as np
from numba import njit

WEIGHTS_TYPES = ("none", "per_feature", "per_channel")
NORMALIZATIONS = ("none", "relu", "softmax")
NORM_EPS = 0.0001  # Darknet's eps in the weight normalisation's denominator


@njit(cache=True, nogil=True)
def _scaled_copy(src, per_channel_w, plane, out):
    # out[b, i] = src[b, i] * w[i // plane]
    n_batch, size = src.shape
    n_ch = size // plane
    for bc in range(n_batch * n_ch):
        b = bc // n_ch
        c = bc % n_ch
        wc = per_channel_w[c]
        base = c * plane
        for p in range(base, base + plane):
            out[b, p] = src[b, p] * wc


@njit(cache=True, nogil=True)
def _add_prefix(src, per_channel_w, plane, count, weighted, out):
    # out[b, i] += src[b, i] * w[i // plane] for i < count (the flat prefix both tensors share)
    n_batch = out.shape[0]
    n_blocks = (count + plane - 1) // plane
    for bc in range(n_batch * n_blocks):
        b = bc // n_blocks
        c = bc % n_blocks
        start = c * plane
        stop = min(start + plane, count)
        if weighted:
            wc = per_channel_w[c]
            for p in range(start, stop):
                out[b, p] += src[b, p] * wc
        else:
            for p in range(start, stop):
                out[b, p] += src[b, p]


@njit(cache=True, nogil=True)
def _weighted_prefix_dot(grad, src, plane, count, n_ch):
    # per channel c: sum over batch and the channel's cells (within the shared prefix) of grad * src
    acc = np.zeros(n_ch, np.float64)
    n_batch = grad.shape[0]
    for b in range(n_batch):
        for p in range(count):
            acc[p // plane] += grad[b, p] * src[b, p]
    return acc


def _flat(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(a.shape[0], -1)


def normalize_weights(weights: np.ndarray, normalization: str) -> np.ndarray:
    """The effective weights Darknet multiplies by: weights shape (n+1,) or (n+1, C); normalised over axis 0."""
    w = np.asarray(weights)
    if normalization == "none":
        return w
    if normalization == "relu":
        terms = np.maximum(w, 0)
    elif normalization == "softmax":
        terms = np.exp(w - w.max(axis=0))
    else:
        raise ValueError(f"shortcut: weights_normalization={normalization!r}, expected one of {NORMALIZATIONS}")
    total = np.full(w.shape[1:], NORM_EPS, w.dtype)
    for t in terms:  # Darknet's summation order: eps + t0 + t1 + ...
        total = total + t
    return terms / total


def _per_channel(weights_eff, weights_type: str, k: int, channels: int, dtype) -> np.ndarray:
    if weights_type == "per_channel":
        return np.ascontiguousarray(weights_eff[k], dtype)
    return np.full(channels, weights_eff[k], dtype)


def _check(x_prev, froms, weights, weights_type, weights_normalization):
    if x_prev.ndim != 4 or x_prev.dtype not in (np.float32, np.float64):
        raise ValueError(f"shortcut: x_prev must be a float32/float64 NCHW array, got {x_prev.dtype} {x_prev.shape}")
    if weights_type not in WEIGHTS_TYPES:
        raise ValueError(f"shortcut: weights_type={weights_type!r}, expected one of {WEIGHTS_TYPES}")
    if weights_normalization not in NORMALIZATIONS:
        raise ValueError(f"shortcut: weights_normalization={weights_normalization!r}, expected one of "
                         f"{NORMALIZATIONS}")
    for f in froms:
        if f.ndim != 4 or f.shape[0] != x_prev.shape[0] or f.dtype != x_prev.dtype:
            raise ValueError(f"shortcut: a from input {f.dtype} {f.shape} does not match x_prev "
                             f"{x_prev.dtype} {x_prev.shape}")
    n, c = len(froms), x_prev.shape[1]
    if weights_type == "per_feature":
        if weights is None or np.shape(weights) != (n + 1,):
            raise ValueError(f"shortcut: per_feature needs weights of shape ({n + 1},), got {np.shape(weights)}")
    elif weights_type == "per_channel":
        if weights is None or np.shape(weights) != (n + 1, c):
            raise ValueError(f"shortcut: per_channel needs weights of shape ({n + 1}, {c}), got {np.shape(weights)}")


def shortcut_forward(x_prev: np.ndarray, froms, weights: np.ndarray | None = None, weights_type: str = "none",
                     weights_normalization: str = "none", out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [shortcut]: x_prev (N, C, H, W) is the previous layer's output, froms the outputs of the `from`
    layers (any C, H, W). Returns (N, C, H, W)."""
    froms = list(froms)
    _check(x_prev, froms, weights, weights_type, weights_normalization)
    if out is None:
        out = np.empty_like(x_prev)
    elif out.shape != x_prev.shape or out.dtype != x_prev.dtype or not out.flags.c_contiguous:
        raise ValueError("shortcut: out must be C-contiguous with x_prev's shape and dtype")
    x_prev = np.ascontiguousarray(x_prev)
    n_batch, c, h, w = x_prev.shape
    plane = h * w
    if weights_type == "none" and len(froms) == 1 and froms[0].shape == x_prev.shape:
        np.add(x_prev, froms[0], out=out)  # the common residual: one pass
        return out
    out_flat = out.reshape(n_batch, -1)
    if weights_type == "none":
        ones = np.ones(c, x_prev.dtype)
        out_flat[...] = x_prev.reshape(n_batch, -1)
        for f in froms:
            f_flat = _flat(f)
            _add_prefix(f_flat, ones, plane, min(f_flat.shape[1], out_flat.shape[1]), False, out_flat)
        return out
    w_eff = normalize_weights(np.asarray(weights, x_prev.dtype), weights_normalization)
    _scaled_copy(x_prev.reshape(n_batch, -1), _per_channel(w_eff, weights_type, 0, c, x_prev.dtype), plane, out_flat)
    for k, f in enumerate(froms, start=1):
        f_flat = _flat(f)
        _add_prefix(f_flat, _per_channel(w_eff, weights_type, k, c, x_prev.dtype), plane,
                    min(f_flat.shape[1], out_flat.shape[1]), True, out_flat)
    return out


def _normalization_backward(weights: np.ndarray, grad_eff: np.ndarray, normalization: str) -> np.ndarray:
    """Chain dL/d(effective weights) through the normalisation to dL/d(raw weights); axis 0 = the n+1 inputs."""
    w = np.asarray(weights, np.float64)
    g = np.asarray(grad_eff, np.float64)
    if normalization == "none":
        return g
    if normalization == "relu":
        r = np.maximum(w, 0)
        s = NORM_EPS + r.sum(axis=0)
        eff = r / s
        return (w > 0) / s * (g - (g * eff).sum(axis=0))
    # softmax with Darknet's eps: the max shift is part of the function (eps does not scale with it)
    m_idx = np.argmax(w, axis=0)
    e = np.exp(w - w.max(axis=0))
    s = NORM_EPS + e.sum(axis=0)
    eff = e / s
    inner = (g * eff).sum(axis=0)
    grad = eff * (g - inner)
    np.put_along_axis(grad, np.expand_dims(m_idx, 0),
                      np.take_along_axis(grad, np.expand_dims(m_idx, 0), 0) - NORM_EPS / s * inner, 0)
    return grad


def shortcut_backward(grad_out: np.ndarray, x_prev: np.ndarray, froms, weights: np.ndarray | None = None,
                      weights_type: str = "none", weights_normalization: str = "none"):
    """Gradients of shortcut_forward. grad_out: dL/dout (after the runner has applied the activation's gradient).
    Returns (grad_x_prev, [grad_from_i, ...], grad_weights or None); grad_from_i has from_i's shape, zero where
    from_i was not added. grad_weights is the exact dL/d(raw weights) through the normalisation (Darknet's own
    update skips the normalisation's derivative)."""
    froms = list(froms)
    _check(x_prev, froms, weights, weights_type, weights_normalization)
    dtype = x_prev.dtype
    n_batch, c, h, w = x_prev.shape
    plane = h * w
    g_flat = _flat(grad_out.astype(dtype, copy=False))
    size = g_flat.shape[1]
    weighted = weights_type != "none"
    w_eff = normalize_weights(np.asarray(weights, dtype), weights_normalization) if weighted else None

    if weighted:
        grad_prev = np.empty_like(x_prev)
        _scaled_copy(g_flat, _per_channel(w_eff, weights_type, 0, c, dtype), plane, grad_prev.reshape(n_batch, -1))
    else:
        grad_prev = g_flat.reshape(x_prev.shape).copy()

    grad_froms = []
    for k, f in enumerate(froms, start=1):
        gf = np.zeros(f.shape, dtype)
        gf_flat = gf.reshape(n_batch, -1)
        count = min(gf_flat.shape[1], size)
        wk = _per_channel(w_eff, weights_type, k, c, dtype) if weighted else np.ones(c, dtype)
        _add_prefix(g_flat, wk, plane, count, weighted, gf_flat)
        grad_froms.append(gf)

    if not weighted:
        return grad_prev, grad_froms, None
    # dL/d(effective weight k, channel c) = sum over the cells input k contributed to, of grad * input_k
    grad_eff = np.zeros((len(froms) + 1, c), np.float64)
    grad_eff[0] = _weighted_prefix_dot(g_flat, _flat(x_prev), plane, size, c)
    for k, f in enumerate(froms, start=1):
        f_flat = _flat(f)
        grad_eff[k] = _weighted_prefix_dot(g_flat, f_flat, plane, min(f_flat.shape[1], size), c)
    if weights_type == "per_feature":
        grad_eff = grad_eff.sum(axis=1)
    grad_w = _normalization_backward(weights, grad_eff, weights_normalization).astype(dtype)
    return grad_prev, grad_froms, grad_w


# ----------------------------------------------------------------------------------------------------------------
# pjreddie's shortcut for inputs of different H x W (the ResNet cfgs: e.g. a 32x32x512 layer + a 64x64x256 `from`)


@njit(cache=True, nogil=True)
def _strided_add(src, dst, sample_src, sample_dst, count_c, count_h, count_w):
    # dst[b, k, j*sample_dst, i*sample_dst] += src[b, k, j*sample_src, i*sample_src]
    for b in range(dst.shape[0]):
        for k in range(count_c):
            for j in range(count_h):
                for i in range(count_w):
                    dst[b, k, j * sample_dst, i * sample_dst] += src[b, k, j * sample_src, i * sample_src]


def _strided_geometry(prev_shape, from_shape):
    _, c2, h2, w2 = prev_shape
    _, c1, h1, w1 = from_shape
    stride = max(w1 // w2, 1)  # the `from` is larger: read every stride-th cell
    sample = max(w2 // w1, 1)  # the `from` is smaller: write every sample-th cell
    if max(h1 // h2, 1) != stride or max(h2 // h1, 1) != sample:
        raise ValueError(f"shortcut (strided): {w1}x{h1} and {w2}x{h2} differ by different factors in W and H")
    return stride, sample, min(c1, c2), min(h1, h2), min(w1, w2)


def shortcut_strided_forward(x_prev: np.ndarray, x_from: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """pjreddie's shortcut_cpu: out = x_prev, plus x_from added over the common channels on a strided grid:
    out[k, j*sample, i*sample] += x_from[k, j*stride, i*stride] for k < min(C), j < min(H), i < min(W), where
    stride = W_from / W_prev and sample = W_prev / W_from (each at least 1). AlexeyAB's darknet (shortcut_forward)
    adds flat prefixes instead; for equal H x W both agree. The ResNet cfgs were trained with this one."""
    if x_prev.ndim != 4 or x_from.ndim != 4 or x_prev.dtype != x_from.dtype or x_prev.shape[0] != x_from.shape[0]:
        raise ValueError(f"shortcut (strided): x_prev {x_prev.dtype} {x_prev.shape} and x_from {x_from.dtype} "
                         f"{x_from.shape} must be NCHW arrays of one dtype and batch")
    stride, sample, cc, ch, cw = _strided_geometry(x_prev.shape, x_from.shape)
    if out is None:
        out = np.array(x_prev, order="C")
    else:
        out[...] = x_prev
    _strided_add(np.ascontiguousarray(x_from), out, stride, sample, cc, ch, cw)
    return out


def shortcut_strided_backward(grad_out: np.ndarray, from_shape: tuple):
    """Returns (grad_x_prev, grad_x_from) for shortcut_strided_forward."""
    grad_out = np.ascontiguousarray(grad_out)
    stride, sample, cc, ch, cw = _strided_geometry(grad_out.shape, tuple(from_shape))
    grad_from = np.zeros(from_shape, grad_out.dtype)
    _strided_add(grad_out, grad_from, sample, stride, cc, ch, cw)
    return grad_out.copy(), grad_from
