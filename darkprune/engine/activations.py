"""Darknet's activations (AlexeyAB's activations.c/.h) by cfg name: forward in place and the exact backward.

Forward formulas follow Darknet's, including its quirks: leaky's slope is 0.1, selu uses 1.0507 and 1.6732, gelu is
the tanh approximation with Darknet's constants, mish uses softplus with a threshold of 20, tanh is computed as
2/(1+exp(-2x))-1, hard_mish is Yashas' piecewise quadratic, and the normalize_channels* family normalises across the
channel axis (axis 1) with Darknet's eps of 1e-4. Where Darknet's formula is numerically undefined (its elu/selu
multiply an overflowed exp(x) by 0 for large x and get NaN) we return the intended value instead.

Backward returns the true derivative of the forward, evaluated from the input where that is needed. Darknet's own
gradient functions differ in places (gelu's is evaluated at the output, the normalize_channels* gradients are
approximations); a finetune that used them would not be following the loss it computes.

Arrays are float32 or float64, C-contiguous; the elementwise activations accept any shape, the normalize_channels*
family needs (N, C, H, W) or (N, C).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import overload

from darkprune.engine.blas import limit_threads, threads_for
from darkprune.errors import DarkpruneError

# Integer codes used inside the kernels. Fixed numbers (not derived from a dict's order) so cached kernels stay valid.
LINEAR = 0
LOGISTIC = 1
LOGGY = 2
RELU = 3
RELU6 = 4
ELU = 5
SELU = 6
GELU = 7
RELIE = 8
RAMP = 9
LEAKY = 10
TANH = 11
PLSE = 12
STAIR = 13
HARDTAN = 14
LHTAN = 15
MISH = 16
HARD_MISH = 17
SWISH = 18
NORM_CHAN = 19
NORM_CHAN_SOFTMAX = 20
NORM_CHAN_SOFTMAX_MAXVAL = 21

ACTIVATION_CODES: dict[str, int] = {
    "linear": LINEAR,
    "logistic": LOGISTIC,
    "loggy": LOGGY,
    "relu": RELU,
    "relu6": RELU6,
    "elu": ELU,
    "selu": SELU,
    "gelu": GELU,
    "relie": RELIE,
    "ramp": RAMP,
    "leaky": LEAKY,
    # AlexeyAB's darknet parses "revleaky" and then runs it exactly as leaky (forward and gradient).
    "revleaky": LEAKY,
    "tanh": TANH,
    "plse": PLSE,
    "stair": STAIR,
    "hardtan": HARDTAN,
    "lhtan": LHTAN,
    "mish": MISH,
    "hard_mish": HARD_MISH,
    "swish": SWISH,
    "normalize_channels": NORM_CHAN,
    "normalize_channels_softmax": NORM_CHAN_SOFTMAX,
    "normalize_channels_softmax_maxval": NORM_CHAN_SOFTMAX_MAXVAL,
}
ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATION_CODES)

# Activations that mix channels: they cannot be fused into a per-channel epilogue.
CROSS_CHANNEL_CODES = frozenset((NORM_CHAN, NORM_CHAN_SOFTMAX, NORM_CHAN_SOFTMAX_MAXVAL))

MISH_THRESHOLD = 20.0
SELU_LAMBDA = 1.0507
SELU_ALPHA = 1.6732
GELU_A = 0.797885
GELU_B = 0.035677
NORM_CHAN_EPS = 0.0001

_CHUNK = 16384  # elements per parallel work item in the flat elementwise kernels


def activation_code(name: str) -> int:
    """The kernel code of a Darknet activation name; an unknown name is a user error that names it."""
    try:
        return ACTIVATION_CODES[name]
    except (KeyError, TypeError):
        raise DarkpruneError(
            f"unknown activation {name!r} (Darknet knows: {', '.join(ACTIVATION_NAMES)})"
        ) from None


def _code_of(name_or_code) -> int:
    if isinstance(name_or_code, (int, np.integer)):
        code = int(name_or_code)
        if not 0 <= code <= NORM_CHAN_SOFTMAX_MAXVAL:
            raise DarkpruneError(f"unknown activation code {code}")
        return code
    return activation_code(name_or_code)


def is_cross_channel(name_or_code) -> bool:
    """True for the normalize_channels* family, which normalises across axis 1 instead of element by element."""
    return _code_of(name_or_code) in CROSS_CHANNEL_CODES


# ----------------------------------------------------------------------------------------------------------------
# scalar forms


@njit(cache=True, inline="always")
def _softplus_thresholded(v):
    if v > MISH_THRESHOLD:
        return v
    if v < -MISH_THRESHOLD:
        return math.exp(v)
    return math.log(math.exp(v) + 1.0)


@njit(cache=True, inline="always")
def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@njit(cache=True, inline="always")
def _darknet_tanh(v):
    return 2.0 / (1.0 + math.exp(-2.0 * v)) - 1.0


@njit(cache=True, nogil=True)
def act_scalar(v, code):
    """Darknet's elementwise activation `code` at v (float64 arithmetic)."""
    if code == LINEAR:
        return v
    if code == LEAKY:
        return v if v > 0.0 else 0.1 * v
    if code == RELU:
        return v if v > 0.0 else 0.0
    if code == LOGISTIC:
        return _sigmoid(v)
    if code == MISH:
        return v * _darknet_tanh(_softplus_thresholded(v))
    if code == SWISH:
        return v * _sigmoid(v)
    if code == HARD_MISH:
        if v > 0.0:
            return v
        if v > -2.0:
            return v * v / 2.0 + v
        return 0.0
    if code == RELU6:
        return min(max(v, 0.0), 6.0)
    if code == TANH:
        return _darknet_tanh(v)
    if code == LOGGY:
        return 2.0 / (1.0 + math.exp(-v)) - 1.0
    if code == ELU:
        return v if v >= 0.0 else math.exp(v) - 1.0
    if code == SELU:
        return SELU_LAMBDA * v if v >= 0.0 else SELU_LAMBDA * SELU_ALPHA * (math.exp(v) - 1.0)
    if code == GELU:
        return 0.5 * v * (1.0 + math.tanh(GELU_A * v + GELU_B * v * v * v))
    if code == RELIE:
        return v if v > 0.0 else 0.01 * v
    if code == RAMP:
        return (v if v > 0.0 else 0.0) + 0.1 * v
    if code == PLSE:
        if v < -4.0:
            return 0.01 * (v + 4.0)
        if v > 4.0:
            return 0.01 * (v - 4.0) + 1.0
        return 0.125 * v + 0.5
    if code == STAIR:
        n = math.floor(v)
        # C's n % 2 is -1 for odd negative n and Python's is 1: "== 0" tests evenness the same way in both.
        if n % 2 == 0:
            return math.floor(v / 2.0)
        return (v - n) + math.floor(v / 2.0)
    if code == HARDTAN:
        if v < -1.0:
            return -1.0
        if v > 1.0:
            return 1.0
        return v
    if code == LHTAN:
        if v < 0.0:
            return 0.001 * v
        if v > 1.0:
            return 0.001 * (v - 1.0) + 1.0
        return v
    return v


@njit(cache=True, nogil=True)
def grad_scalar(x, y, code):
    """d act(x) / dx for elementwise `code`, given the input x and the output y = act(x)."""
    if code == LINEAR:
        return 1.0
    if code == LEAKY:
        return 1.0 if x > 0.0 else 0.1
    if code == RELU:
        return 1.0 if x > 0.0 else 0.0
    if code == LOGISTIC:
        s = _sigmoid(x)
        return s * (1.0 - s)
    if code == MISH:
        sp = _softplus_thresholded(x)
        if x > MISH_THRESHOLD:
            dsp = 1.0
        elif x < -MISH_THRESHOLD:
            dsp = math.exp(x)
        else:
            dsp = _sigmoid(x)
        t = _darknet_tanh(sp)
        return t + x * (1.0 - t * t) * dsp
    if code == SWISH:
        s = _sigmoid(x)
        return s + x * s * (1.0 - s)
    if code == HARD_MISH:
        if x > 0.0:
            return 1.0
        if x > -2.0:
            return x + 1.0
        return 0.0
    if code == RELU6:
        return 1.0 if (x > 0.0 and x < 6.0) else 0.0
    if code == TANH:
        t = _darknet_tanh(x)
        return 1.0 - t * t
    if code == LOGGY:
        s = _sigmoid(x)
        return 2.0 * s * (1.0 - s)
    if code == ELU:
        return 1.0 if x >= 0.0 else math.exp(x)
    if code == SELU:
        return SELU_LAMBDA if x >= 0.0 else SELU_LAMBDA * SELU_ALPHA * math.exp(x)
    if code == GELU:
        u = GELU_A * x + GELU_B * x * x * x
        t = math.tanh(u)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (GELU_A + 3.0 * GELU_B * x * x)
    if code == RELIE:
        return 1.0 if x > 0.0 else 0.01
    if code == RAMP:
        return (1.0 if x > 0.0 else 0.0) + 0.1
    if code == PLSE:
        return 0.01 if (x < -4.0 or x > 4.0) else 0.125
    if code == STAIR:
        # flat on [2k, 2k+1), slope 1 on [2k+1, 2k+2)
        return 0.0 if math.floor(x) % 2 == 0 else 1.0
    if code == HARDTAN:
        return 1.0 if (x > -1.0 and x < 1.0) else 0.0
    if code == LHTAN:
        return 1.0 if (x > 0.0 and x < 1.0) else 0.001
    return 1.0


# ----------------------------------------------------------------------------------------------------------------
# helpers for vectorisable numba loops


def typed(arr, value):
    """`value` as arr's element type, so float32 arithmetic stays float32 (a Python float literal would promote
    every expression it touches to float64 and halve the SIMD width)."""
    return arr.dtype.type(value)


@overload(typed, inline="always")
def _typed_overload(arr, value):
    element = arr.dtype

    def impl(arr, value):
        return element(value)

    return impl


# ----------------------------------------------------------------------------------------------------------------
# row kernels: y[start:stop] = act(y[start:stop] + bias). One dispatch per row, then a tight loop over a slice
# (indices from range(0, n) let LLVM drop numba's negative-index wraparound and vectorise), so the common
# activations run at memory speed; conv/connected use these as their fused epilogue.


@njit(cache=True, nogil=True)
def bias_act_row(y, start, stop, bias, code):
    seg = y[start:stop]
    n = seg.size
    bv = typed(seg, bias)
    if code == LINEAR:
        if bias != 0.0:
            for i in range(n):
                seg[i] = seg[i] + bv
    elif code == LEAKY:
        slope = typed(seg, 0.1)
        for i in range(n):
            v = seg[i] + bv
            seg[i] = v if v > 0 else slope * v
    elif code == RELU:
        zero = typed(seg, 0.0)
        for i in range(n):
            v = seg[i] + bv
            seg[i] = v if v > 0 else zero
    elif code == RELU6:
        zero = typed(seg, 0.0)
        six = typed(seg, 6.0)
        for i in range(n):
            seg[i] = min(max(seg[i] + bv, zero), six)
    elif code == HARD_MISH:
        zero = typed(seg, 0.0)
        half = typed(seg, 0.5)
        for i in range(n):
            v = seg[i] + bv
            if v > 0:
                seg[i] = v
            elif v > -2:
                seg[i] = v * v * half + v
            else:
                seg[i] = zero
    elif code == LOGISTIC:
        for i in range(n):
            seg[i] = _sigmoid(seg[i] + bias)
    elif code == SWISH:
        for i in range(n):
            v = seg[i] + bias
            seg[i] = v * _sigmoid(v)
    elif code == MISH:
        for i in range(n):
            v = seg[i] + bias
            seg[i] = v * _darknet_tanh(_softplus_thresholded(v))
    else:
        for i in range(n):
            seg[i] = act_scalar(seg[i] + bias, code)


@njit(cache=True, parallel=True, nogil=True)
def _activate_flat(flat, code):
    n = flat.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for k in prange(nchunks):
        start = k * _CHUNK
        bias_act_row(flat, start, min(start + _CHUNK, n), 0.0, code)


@njit(cache=True, parallel=True, nogil=True)
def _grad_flat(x, y, g, out, code):
    n = x.size
    nchunks = (n + _CHUNK - 1) // _CHUNK
    for k in prange(nchunks):
        start = k * _CHUNK
        stop = min(start + _CHUNK, n)
        xs = x[start:stop]
        ys = y[start:stop]
        gs = g[start:stop]
        os_ = out[start:stop]
        m = stop - start
        if code == LINEAR:
            for i in range(m):
                os_[i] = gs[i]
        elif code == LEAKY:
            slope = typed(gs, 0.1)
            for i in range(m):
                os_[i] = gs[i] if xs[i] > 0 else slope * gs[i]
        elif code == RELU:
            zero = typed(gs, 0.0)
            for i in range(m):
                os_[i] = gs[i] if xs[i] > 0 else zero
        elif code == LOGISTIC:
            one = typed(ys, 1.0)
            for i in range(m):
                os_[i] = gs[i] * ys[i] * (one - ys[i])
        else:
            for i in range(m):
                os_[i] = gs[i] * grad_scalar(xs[i], ys[i], code)


# ----------------------------------------------------------------------------------------------------------------
# normalize_channels family: per (image, position), across the C channels of axis 1.


@njit(cache=True, inline="always")
def channel_argmax(x, b, s):
    """The first channel c with the largest x[b, c, s] (x viewed as (N, C, S))."""
    arg = 0
    for c in range(1, x.shape[1]):
        if x[b, c, s] > x[b, arg, s]:
            arg = c
    return arg


@njit(cache=True, inline="always")
def _chunk_bounds(job, nchunks, ns):
    """(image, first position, past the last position) of one job: positions go in chunks of 256 per image."""
    s0 = (job % nchunks) * 256
    return job // nchunks, s0, min(s0 + 256, ns)


@njit(cache=True, parallel=True, nogil=True)
def _norm_chan_forward(x, code):
    """x viewed as (N, C, S); in place."""
    nb, nc, ns = x.shape
    nchunks = (ns + 255) // 256
    for job in prange(nb * nchunks):
        b, s0, s1 = _chunk_bounds(job, nchunks, ns)
        for s in range(s0, s1):
            if code == NORM_CHAN:
                total = NORM_CHAN_EPS
                for c in range(nc):
                    v = x[b, c, s]
                    if v > 0.0:
                        total += v
                for c in range(nc):
                    v = x[b, c, s]
                    x[b, c, s] = v / total if v > 0.0 else 0.0
            else:
                m = 0.0
                if code == NORM_CHAN_SOFTMAX_MAXVAL:
                    m = x[b, channel_argmax(x, b, s), s]
                total = NORM_CHAN_EPS
                for c in range(nc):
                    total += math.exp(x[b, c, s] - m)
                for c in range(nc):
                    x[b, c, s] = math.exp(x[b, c, s] - m) / total


@njit(cache=True, parallel=True, nogil=True)
def _norm_chan_backward(x, y, g, out, code):
    """Exact backward of _norm_chan_forward; all arrays viewed as (N, C, S)."""
    nb, nc, ns = x.shape
    nchunks = (ns + 255) // 256
    for job in prange(nb * nchunks):
        b, s0, s1 = _chunk_bounds(job, nchunks, ns)
        for s in range(s0, s1):
            # sum_k g_k y_k is shared by every channel's gradient
            gy = 0.0
            for c in range(nc):
                gy += g[b, c, s] * y[b, c, s]
            if code == NORM_CHAN:
                # y_k = relu(x_k) / (eps + sum_j relu(x_j))
                total = NORM_CHAN_EPS
                for c in range(nc):
                    if x[b, c, s] > 0.0:
                        total += x[b, c, s]
                for c in range(nc):
                    if x[b, c, s] > 0.0:
                        out[b, c, s] = (g[b, c, s] - gy) / total
                    else:
                        out[b, c, s] = 0.0
            else:
                # y_k = e_k / (eps + sum_j e_j), e_k = exp(x_k - m)
                for c in range(nc):
                    out[b, c, s] = y[b, c, s] * (g[b, c, s] - gy)
                if code == NORM_CHAN_SOFTMAX_MAXVAL:
                    # m = max_k x_k; eps breaks shift invariance, so m carries a (tiny) gradient to the argmax
                    arg = channel_argmax(x, b, s)
                    m = x[b, arg, s]
                    total = NORM_CHAN_EPS
                    for c in range(nc):
                        total += math.exp(x[b, c, s] - m)
                    out[b, arg, s] += -gy * NORM_CHAN_EPS / total


def channel_view(a: np.ndarray) -> np.ndarray | None:
    """a viewed as (N, C, S): S = H*W for (N, C, H, W), 1 for (N, C); None for any other rank."""
    if a.ndim == 4:
        return a.reshape(a.shape[0], a.shape[1], a.shape[2] * a.shape[3])
    if a.ndim == 2:
        return a.reshape(a.shape[0], a.shape[1], 1)
    return None


def _as_channel_view(a: np.ndarray) -> np.ndarray:
    view = channel_view(a)
    if view is None:
        raise DarkpruneError(f"normalize_channels activations need an (N, C, H, W) or (N, C) array, got shape "
                             f"{a.shape}")
    return view


def _check(a: np.ndarray, what: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous:
        raise TypeError(f"{what} must be a C-contiguous float32/float64 numpy array")


# ----------------------------------------------------------------------------------------------------------------
# public API


def activate_(x: np.ndarray, name) -> np.ndarray:
    """Apply Darknet activation `name` (cfg name, or its code) to x in place; returns x."""
    code = _code_of(name)
    _check(x, "x")
    if code == LINEAR or x.size == 0:
        return x
    # exp-based activations cost ~20 ns per element, the others are memory-bound
    flops = x.size * (20.0 if code in (LOGISTIC, MISH, SWISH, TANH, LOGGY, ELU, SELU, GELU) else 1.0) * 60.0
    with limit_threads(threads_for(flops, 2.0 * x.nbytes)):
        if code in CROSS_CHANNEL_CODES:
            _norm_chan_forward(_as_channel_view(x), code)
        else:
            _activate_flat(x.reshape(-1), code)
    return x


def activation_backward(x_in: np.ndarray, y_out: np.ndarray, grad_out: np.ndarray, name, out=None) -> np.ndarray:
    """Gradient w.r.t. the activation's input: grad_out * act'(x_in) (y_out = act(x_in) saves recomputation).

    For the normalize_channels* family the full Jacobian across channels is applied. `out` may alias grad_out.
    """
    code = _code_of(name)
    for a, what in ((x_in, "x_in"), (y_out, "y_out"), (grad_out, "grad_out")):
        _check(a, what)
    if not (x_in.shape == y_out.shape == grad_out.shape):
        raise ValueError(f"shape mismatch: x_in {x_in.shape}, y_out {y_out.shape}, grad_out {grad_out.shape}")
    if out is None:
        out = np.empty_like(grad_out)
    with limit_threads(threads_for(x_in.size * 600.0, 4.0 * x_in.nbytes)):
        if code in CROSS_CHANNEL_CODES:
            if out is grad_out or np.shares_memory(out, grad_out):
                g = grad_out.copy()
            else:
                g = grad_out
            _norm_chan_backward(_as_channel_view(x_in), _as_channel_view(y_out), _as_channel_view(g),
                                _as_channel_view(out), code)
        elif x_in.size:
            _grad_flat(x_in.reshape(-1), y_out.reshape(-1), grad_out.reshape(-1), out.reshape(-1), code)
    return out


def activate_array(x: np.ndarray, name) -> np.ndarray:
    """Out-of-place convenience: a new array act(x)."""
    return activate_(np.array(x, copy=True, order="C"), name)
