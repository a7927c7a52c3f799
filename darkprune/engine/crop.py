"""Darknet's [crop] layer (crop_layer.c, CPU path), used in front of some classifiers.

Inference: a centre crop (offsets (H - crop_h) // 2, (W - crop_w) // 2) that also maps values to x*2 - 1, unless
noadjust=1. Training: a random offset in each dimension (and a random horizontal flip when flip=1), drawn once for
the whole batch as Darknet does. Darknet's GPU build additionally jitters angle/saturation/exposure in training;
that augmentation is not reproduced here. Darknet has no backward for [crop]; crop_backward gives the exact one.
"""
import numpy as np


def crop_forward(x: np.ndarray, crop_height: int, crop_width: int, noadjust: bool = False, flip: bool = False,
                 train: bool = False, rng: np.random.Generator | None = None):
    """Returns (out, params): out (N, C, crop_height, crop_width) and the (dh, dw, flipped) used, for the backward."""
    h, w = x.shape[2], x.shape[3]
    if not (1 <= crop_height <= h and 1 <= crop_width <= w):
        raise ValueError(f"crop: a {crop_width}x{crop_height} crop does not fit a {w}x{h} input")
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        flipped = bool(flip) and bool(rng.integers(0, 2))
        dh = int(rng.integers(0, h - crop_height + 1))
        dw = int(rng.integers(0, w - crop_width + 1))
    else:
        flipped = False
        dh = (h - crop_height) // 2
        dw = (w - crop_width) // 2
    region = x[:, :, dh:dh + crop_height, dw:dw + crop_width]
    if flipped:
        # Darknet's flipped column j reads column w - dw - j - 1
        region = x[:, :, dh:dh + crop_height, w - dw - crop_width:w - dw][..., ::-1]
    if noadjust:
        out = np.ascontiguousarray(region)
    else:
        out = np.ascontiguousarray(region * x.dtype.type(2) - x.dtype.type(1))
    return out, (dh, dw, flipped)


def crop_backward(grad_out: np.ndarray, x_shape: tuple, params: tuple, noadjust: bool = False) -> np.ndarray:
    """dL/dx of crop_forward with the (dh, dw, flipped) it returned: the crop's gradient (times 2 unless
    noadjust) put back in place, zero elsewhere."""
    dh, dw, flipped = params
    w = x_shape[3]
    ch, cw = grad_out.shape[2], grad_out.shape[3]
    grad = np.zeros(x_shape, grad_out.dtype)
    g = grad_out if noadjust else grad_out * grad_out.dtype.type(2)
    if flipped:
        grad[:, :, dh:dh + ch, w - dw - cw:w - dw] = g[..., ::-1]
    else:
        grad[:, :, dh:dh + ch, dw:dw + cw] = g
    return grad
