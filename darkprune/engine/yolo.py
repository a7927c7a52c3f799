"""The inference activations of Darknet's detection heads: what AlexeyAB's forward_yolo_layer and a [region] layer
leave in l.output, in the input's NCHW layout, for darkprune.engine.decode to turn into boxes.

[yolo]: input (N, num_masks*(4+1+classes), H, W); per anchor n the channels n*(5+classes) + (x, y, w, h, obj,
classes...). Logistic on x, y, objectness and classes (w, h untouched), then x, y = x*scale_x_y - 0.5*(scale_x_y-1).
With new_coords=1 no logistic at all (the previous conv already applied one), the scale_x_y step still applies.

[region]: input (N, num*(coords+1+classes), H, W); per anchor n the channels n*(coords+1+classes) + (x, y, w, h, ...,
obj at `coords`, classes from coords+1). Logistic on x, y and objectness; softmax over the classes of each anchor at
each cell when softmax=1 (else the class values stay raw, as AlexeyAB's region layer leaves them). The layout is the
input's (pjreddie's entry_index order); AlexeyAB's CPU region layer instead transposes to (H*W*num, 5+classes) and
applies the x, y logistic when it decodes; the values are the same. softmax_tree (YOLO9000) is not supported.

The backward functions give the exact Jacobian-vector product of these activations (dL/dinput from dL/doutput), for
losses written against the activated outputs.
"""
import numpy as np
from numba import njit, prange

# values per call above which the forward kernels run in parallel over (sample, anchor); below it a parallel
# region's start-up costs more than it saves
PARALLEL_MIN_SIZE = 1 << 20


@njit(cache=True, nogil=True)
def _logistic(v, one):
    # `one` typed like v: Darknet computes 1.f/(1.f + expf(-x)) in float
    return one / (one + np.exp(-v))


@njit(cache=True, nogil=True)
def _yolo_backward_kernel(grad_out, out, num, entries, scale, beta, new_coords, grad_in):
    n_batch, _, h, w = out.shape
    for bn in range(n_batch * num):
        b = bn // num
        a = bn % num
        base = a * entries
        for e in range(entries):
            ch = base + e
            act = (not new_coords) and e != 2 and e != 3
            for y in range(h):
                for xx in range(w):
                    g = grad_out[b, ch, y, xx]
                    v = out[b, ch, y, xx]
                    if e < 2:
                        g = g * scale
                        v = (v - beta) / scale  # the logistic's output before the scale_x_y step
                    if act:
                        g = g * v * (1 - v)
                    grad_in[b, ch, y, xx] = g


@njit(cache=True, nogil=True)
def _region_anchor(x, b, a, coords, classes, do_softmax, zero, one, out):
    h, w = x.shape[2], x.shape[3]
    entries = coords + 1 + classes
    base = a * entries
    for e in range(entries):
        ch = base + e
        if e < 2 or e == coords:
            for y in range(h):
                for xx in range(w):
                    out[b, ch, y, xx] = _logistic(x[b, ch, y, xx], one)
        elif e <= coords or not do_softmax:
            for y in range(h):
                for xx in range(w):
                    out[b, ch, y, xx] = x[b, ch, y, xx]
    if do_softmax and classes > 0:
        c0 = base + coords + 1
        for y in range(h):
            for xx in range(w):
                largest = x[b, c0, y, xx]
                for k in range(1, classes):
                    if x[b, c0 + k, y, xx] > largest:
                        largest = x[b, c0 + k, y, xx]
                total = zero
                for k in range(classes):
                    e_k = np.exp(x[b, c0 + k, y, xx] - largest)
                    out[b, c0 + k, y, xx] = e_k
                    total += e_k
                for k in range(classes):
                    out[b, c0 + k, y, xx] = out[b, c0 + k, y, xx] / total


@njit(cache=True, nogil=True)
def _region_serial(x, num, coords, classes, do_softmax, zero, one, out):
    for bn in range(x.shape[0] * num):
        _region_anchor(x, bn // num, bn % num, coords, classes, do_softmax, zero, one, out)


@njit(cache=True, parallel=True, nogil=True)
def _region_parallel(x, num, coords, classes, do_softmax, zero, one, out):
    for bn in prange(x.shape[0] * num):
        _region_anchor(x, bn // num, bn % num, coords, classes, do_softmax, zero, one, out)


@njit(cache=True, nogil=True)
def _region_backward_kernel(grad_out, out, num, coords, classes, do_softmax, grad_in):
    n_batch, _, h, w = out.shape
    entries = coords + 1 + classes
    for bn in range(n_batch * num):
        b = bn // num
        a = bn % num
        base = a * entries
        for e in range(entries):
            ch = base + e
            if e < 2 or e == coords:
                for y in range(h):
                    for xx in range(w):
                        v = out[b, ch, y, xx]
                        grad_in[b, ch, y, xx] = grad_out[b, ch, y, xx] * v * (1 - v)
            elif e <= coords or not do_softmax:
                for y in range(h):
                    for xx in range(w):
                        grad_in[b, ch, y, xx] = grad_out[b, ch, y, xx]
        if do_softmax and classes > 0:
            c0 = base + coords + 1
            for y in range(h):
                for xx in range(w):
                    dot = 0.0
                    for k in range(classes):
                        dot += grad_out[b, c0 + k, y, xx] * out[b, c0 + k, y, xx]
                    for k in range(classes):
                        p = out[b, c0 + k, y, xx]
                        grad_in[b, c0 + k, y, xx] = p * (grad_out[b, c0 + k, y, xx] - dot)


def _check(x, channels, what):
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{what}: expected a float32/float64 NCHW array, got {x.dtype} {x.shape}")
    if x.shape[1] != channels:
        raise ValueError(f"{what}: input has {x.shape[1]} channels, the head needs {channels}")


def _out(out, x, what):
    if out is None:
        return np.empty(x.shape, x.dtype)
    if out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"{what}: out must be C-contiguous with the input's shape and dtype")
    return out


def _xy_affine(scale_x_y: float, dtype):
    # Darknet keeps scale_x_y as a float and calls scal_add_cpu(..., ALPHA=scale_x_y, BETA=-0.5*(scale_x_y - 1)),
    # BETA computed in double from that float and passed as a float
    s32 = np.float32(scale_x_y)
    return dtype.type(s32), dtype.type(np.float32(-0.5 * (float(s32) - 1.0)))


def yolo_forward(x: np.ndarray, num_masks: int, classes: int, scale_x_y: float = 1.0, new_coords: bool = False,
                 out: np.ndarray | None = None) -> np.ndarray:
    """[yolo] inference activations; x (N, num_masks*(5+classes), H, W) -> same shape."""
    _check(x, num_masks * (5 + classes), "yolo")
    out = _out(out, x, "yolo")
    scale, beta = _xy_affine(scale_x_y, x.dtype)
    n, _, h, w = x.shape
    entries = 5 + classes
    view = out.reshape(n, num_masks, entries, h * w)
    np.copyto(view, np.ascontiguousarray(x).reshape(view.shape))
    if not new_coords:
        # numpy's vectorised exp: a head is 255 channels at the output resolution, and elementwise libm calls made
        # this layer cost as much as the convolution before it (the values agree with expf to an ulp)
        one = x.dtype.type(1)
        with np.errstate(over="ignore"):                     # exp(-x) = inf for very negative x: 1/(1+inf) = 0
            for part in (view[:, :, :2], view[:, :, 4:]):   # x, y; objectness and classes (not w, h)
                np.negative(part, out=part)
                np.exp(part, out=part)
                np.add(part, one, out=part)
                np.divide(one, part, out=part)
    xy = view[:, :, :2]
    np.multiply(xy, scale, out=xy)
    np.add(xy, beta, out=xy)
    return out


def yolo_backward(grad_out: np.ndarray, out: np.ndarray, num_masks: int, classes: int, scale_x_y: float = 1.0,
                  new_coords: bool = False) -> np.ndarray:
    """dL/dx of yolo_forward, from dL/dout and the forward output."""
    _check(out, num_masks * (5 + classes), "yolo_backward")
    scale, beta = _xy_affine(scale_x_y, out.dtype)
    grad_in = np.empty_like(out)
    _yolo_backward_kernel(np.ascontiguousarray(grad_out, dtype=out.dtype), np.ascontiguousarray(out), num_masks,
                          5 + classes, scale, beta, bool(new_coords), grad_in)
    return grad_in


def region_forward(x: np.ndarray, num: int, classes: int, coords: int = 4, softmax: bool = True,
                   out: np.ndarray | None = None) -> np.ndarray:
    """[region] inference activations; x (N, num*(coords+1+classes), H, W) -> same shape."""
    if coords < 2:
        raise ValueError(f"region: coords={coords} must be at least 2")
    _check(x, num * (coords + 1 + classes), "region")
    out = _out(out, x, "region")
    kernel = _region_parallel if x.size >= PARALLEL_MIN_SIZE and x.shape[0] * num > 1 else _region_serial
    kernel(np.ascontiguousarray(x), num, coords, classes, bool(softmax), x.dtype.type(0), x.dtype.type(1), out)
    return out


def region_backward(grad_out: np.ndarray, out: np.ndarray, num: int, classes: int, coords: int = 4,
                    softmax: bool = True) -> np.ndarray:
    """dL/dx of region_forward, from dL/dout and the forward output."""
    _check(out, num * (coords + 1 + classes), "region_backward")
    grad_in = np.empty_like(out)
    _region_backward_kernel(np.ascontiguousarray(grad_out, dtype=out.dtype), np.ascontiguousarray(out), num, coords,
                            classes, bool(softmax), grad_in)
    return grad_in
