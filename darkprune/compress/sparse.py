"""Deep Compression's relative-index sparse format (Han, Mao, Dally 2015, section 3 and Figure 2).

A flattened layer is stored as a list of entries. Each entry carries a gap: the number of zero positions skipped since
the previous entry (the first entry counts from position -1), so entry j sits at position
    p_j = p_{j-1} + gap_j + 1,  p_{-1} = -1   (i.e. positions = cumsum(gaps + 1) - 1, as the paper's decode.py does).
A gap must fit in `index_bits` bits. When more than 2**index_bits - 1 zeros separate two surviving weights, a filler
entry is inserted after skipping exactly 2**index_bits - 1 zeros: it sits on a zero position and its value is a zero
(in the .dcz file: a reserved cluster index), as in the paper's Figure 2 where a filler lands at position 12 between
the weights at 4 and 15 with 3-bit indices. Positions after the last surviving weight need no entries: the decoder
knows the layer size.

The filler flags travel in the value stream (a filler's value is the reserved one), so the index stream itself is
just the gaps.
"""

from __future__ import annotations

import numpy as np

from darkprune.errors import DarkpruneError

MAX_INDEX_BITS = 16


def _check_bits(index_bits: int) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)):
        raise DarkpruneError(f"index bits must be an integer, got {index_bits!r}")
    if not 1 <= int(index_bits) <= MAX_INDEX_BITS:
        raise DarkpruneError(f"index bits must be between 1 and {MAX_INDEX_BITS}, got {index_bits}")
    return int(index_bits)


def encode_relative_index(flat_mask, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative indices of the True positions of a mask (flattened in C order).

    Returns (gaps, is_filler): gaps uint16 (each < 2**index_bits), one per entry; is_filler marks the padding entries.
    The surviving weights are the non-filler entries, in position order.
    """
    bits = _check_bits(index_bits)
    positions = np.flatnonzero(np.asarray(flat_mask, dtype=bool).ravel())
    span = 1 << bits  # a filler advances the position by exactly this much (span - 1 zeros skipped, then itself)
    skips = np.diff(positions, prepend=-1) - 1
    fillers_before = skips // span
    total = positions.size + int(fillers_before.sum())
    gaps = np.full(total, span - 1, dtype=np.uint16)
    is_filler = np.ones(total, dtype=bool)
    slot = np.arange(positions.size) + np.cumsum(fillers_before)
    gaps[slot] = skips % span
    is_filler[slot] = False
    return gaps, is_filler


def entry_positions(gaps) -> np.ndarray:
    """Absolute position of every entry, fillers included."""
    gaps = np.asarray(gaps).astype(np.int64)
    return np.cumsum(gaps + 1) - 1


def decode_relative_index(gaps, is_filler, index_bits: int, length: int) -> np.ndarray:
    """Positions (int64, ascending) of the surviving weights; raises DarkpruneError if the entries do not fit the
    layer (a gap wider than the index bits, or an entry past the end)."""
    bits = _check_bits(index_bits)
    gaps = np.asarray(gaps)
    is_filler = np.asarray(is_filler, dtype=bool)
    if gaps.shape != is_filler.shape or gaps.ndim != 1:
        raise DarkpruneError("relative index: gaps and filler flags differ in shape")
    if gaps.size and (int(gaps.min()) < 0 or int(gaps.max()) >= (1 << bits)):
        raise DarkpruneError(f"relative index: a gap does not fit in {bits} bits")
    positions = entry_positions(gaps)
    if positions.size and positions[-1] >= length:
        raise DarkpruneError(f"relative index: entry at position {positions[-1]} beyond the layer size {length}")
    return positions[~is_filler]


def mask_from_relative_index(gaps, is_filler, index_bits: int, shape) -> np.ndarray:
    """The boolean mask of the given shape that the entries describe."""
    length = int(np.prod(shape, dtype=np.int64))
    mask = np.zeros(length, dtype=bool)
    mask[decode_relative_index(gaps, is_filler, index_bits, length)] = True
    return mask.reshape(shape)


def interleave_fillers(values, is_filler, filler_value) -> np.ndarray:
    """The per-entry value stream: the surviving weights' values in order, `filler_value` at each filler."""
    values = np.asarray(values)
    is_filler = np.asarray(is_filler, dtype=bool)
    if int((~is_filler).sum()) != values.size:
        raise ValueError(f"{values.size} values for {int((~is_filler).sum())} non-filler entries")
    out = np.full(is_filler.shape, filler_value, dtype=np.result_type(values.dtype, np.min_scalar_type(filler_value)))
    out[~is_filler] = values
    return out


__all__ = ["MAX_INDEX_BITS", "encode_relative_index", "decode_relative_index", "entry_positions",
           "mask_from_relative_index", "interleave_fillers"]
