"""Darknet's [dropout] layer (dropout_layer.c).

Inference: identity (the input array itself is returned, no copy). Training: each value is dropped with
`probability` (Darknet: r = uniform(0, 1), r < p -> 0) and kept ones are multiplied by scale = 1 / (1 - p). The mask
(0 or scale per value) is returned so the backward pass drops the same values. Darknet's CPU build ignores
dropblock=1 (its DropBlock exists only on the GPU); so do we.
"""
import numpy as np


def dropout_scale(probability: float) -> float:
    """Darknet's l.scale = 1./(1.0 - probability), stored as a float."""
    return float(np.float32(1.0 / (1.0 - probability)))


def dropout_forward(x: np.ndarray, probability: float, train: bool = False, rng: np.random.Generator | None = None,
                    seed: int | None = None):
    """Returns (out, mask). At inference (train=False): (x, None). Training: a mask from rng (or a new Generator
    seeded with `seed`), out = x * mask."""
    if not train:
        return x, None
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"dropout: probability must be in [0, 1), got {probability}")
    if rng is None:
        rng = np.random.default_rng(seed)
    r = rng.random(x.shape, dtype=np.float32)
    mask = np.where(r < np.float32(probability), 0.0, dropout_scale(probability)).astype(x.dtype)
    return x * mask, mask


def dropout_backward(grad_out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """dL/dx = dL/dout * mask (identity when the forward pass was at inference)."""
    if mask is None:
        return grad_out
    return grad_out * mask
