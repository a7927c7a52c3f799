"""Darknet's [route] layer (route_layer.c): concatenation along channels of several inputs, each reduced to its
group_id-th of `groups` equal parts.

As Darknet, the parts are cut from each sample's flattened C*H*W values (part = C*H*W / groups, taken at offset
part*group_id); with C divisible by groups that is channels [group_id*C/groups, (group_id+1)*C/groups). All inputs
must share H x W. Plain copies: numpy slicing already runs at memory speed, so no numba here.
"""
import numpy as np


def _parts(shapes, groups: int, group_id: int):
    if groups < 1 or not 0 <= group_id < groups:
        raise ValueError(f"route: group_id={group_id} must be in 0..groups-1 (groups={groups})")
    n, _, h, w = shapes[0]
    total = 0
    parts = []
    for s in shapes:
        if len(s) != 4 or s[0] != n or s[2:] != (h, w):
            raise ValueError(f"route: inputs must share N, H and W; got {[tuple(x) for x in shapes]}")
        size = s[1] * s[2] * s[3]
        part = size // groups
        parts.append((size, part))
        total += part
    if total % (h * w):
        raise ValueError(f"route: the parts ({total} values) do not fill whole {w}x{h} channels")
    return parts, (n, total // (h * w), h, w)


def route_output_shape(input_shapes, groups: int = 1, group_id: int = 0) -> tuple:
    """(N, C_out, H, W) of route_forward for these (N, C, H, W) input shapes."""
    return _parts([tuple(s) for s in input_shapes], groups, group_id)[1]


def route_forward(inputs, groups: int = 1, group_id: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Darknet [route]: inputs is a sequence of (N, C_i, H, W) arrays (the `layers=` outputs, in cfg order)."""
    inputs = list(inputs)
    if not inputs:
        raise ValueError("route: needs at least one input")
    dtype = inputs[0].dtype
    parts, out_shape = _parts([x.shape for x in inputs], groups, group_id)
    if out is None:
        out = np.empty(out_shape, dtype)
    elif out.shape != out_shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"route: out must be a C-contiguous {dtype} array of shape {out_shape}")
    n = out_shape[0]
    out_flat = out.reshape(n, -1)
    offset = 0
    for x, (size, part) in zip(inputs, parts):
        out_flat[:, offset:offset + part] = x.reshape(n, size)[:, part * group_id:part * (group_id + 1)]
        offset += part
    return out


def route_backward(grad_out: np.ndarray, input_shapes, groups: int = 1, group_id: int = 0) -> list:
    """Splits dL/dout back to each input: a list of arrays with the inputs' shapes, zero outside the taken group."""
    shapes = [tuple(s) for s in input_shapes]
    parts, out_shape = _parts(shapes, groups, group_id)
    if grad_out.shape != out_shape:
        raise ValueError(f"route_backward: grad_out has shape {grad_out.shape}, expected {out_shape}")
    n = out_shape[0]
    g_flat = np.ascontiguousarray(grad_out).reshape(n, -1)
    grads = []
    offset = 0
    for s, (size, part) in zip(shapes, parts):
        if groups == 1:
            g = g_flat[:, offset:offset + part].reshape(s).copy()
        else:
            g = np.zeros(s, grad_out.dtype)
            g.reshape(n, size)[:, part * group_id:part * (group_id + 1)] = g_flat[:, offset:offset + part]
        grads.append(g)
        offset += part
    return grads
