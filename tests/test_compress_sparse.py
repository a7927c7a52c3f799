"""Deep Compression's relative-index format with padding fillers (Han et al. 2015, Figure 2)."""

import numpy as np
import pytest

from darkprune.compress.sparse import (decode_relative_index, encode_relative_index, entry_positions,
                                       interleave_fillers, mask_from_relative_index)
from darkprune.errors import DarkpruneError


def reference_encode(positions, bits):
    """The paper's rule written as a plain loop: walk the layer, emit a filler whenever the gap would overflow."""
    limit = (1 << bits) - 1
    gaps, fillers = [], []
    previous = -1
    for position in positions:
        skip = position - previous - 1
        while skip > limit:
            gaps.append(limit)
            fillers.append(True)
            skip -= limit + 1  # the filler itself occupies one more (zero) position
        gaps.append(skip)
        fillers.append(False)
        previous = position
    return gaps, fillers


def test_paper_figure_2_example():
    # 16 weights, non-zero at 1, 4 and 15, 3-bit indices: the diff 11 exceeds 8, so a filler zero lands at 12.
    mask = np.zeros(16, dtype=bool)
    mask[[1, 4, 15]] = True
    gaps, is_filler = encode_relative_index(mask, 3)
    assert gaps.tolist() == [1, 2, 7, 2]
    assert is_filler.tolist() == [False, False, True, False]
    positions = entry_positions(gaps)
    assert positions.tolist() == [1, 4, 12, 15]
    assert [1] + np.diff(positions).tolist() == [1, 3, 8, 3]  # the figure's "diff" row
    values = interleave_fillers(np.array([3.4, 0.9, 1.7]), is_filler, 0.0)
    assert values.tolist() == [3.4, 0.9, 0.0, 1.7]  # the figure's "value" row
    assert decode_relative_index(gaps, is_filler, 3, 16).tolist() == [1, 4, 15]


def test_empty_layer_and_all_zeros():
    for length in (0, 1, 100):
        gaps, is_filler = encode_relative_index(np.zeros(length, dtype=bool), 5)
        assert gaps.size == 0 and is_filler.size == 0
        assert decode_relative_index(gaps, is_filler, 5, length).size == 0


def test_all_non_zero():
    gaps, is_filler = encode_relative_index(np.ones(1000, dtype=bool), 5)
    assert (gaps == 0).all() and not is_filler.any() and gaps.size == 1000
    np.testing.assert_array_equal(decode_relative_index(gaps, is_filler, 5, 1000), np.arange(1000))


def test_first_element_at_position_zero_and_boundaries():
    mask = np.zeros(10, dtype=bool)
    mask[0] = True
    gaps, is_filler = encode_relative_index(mask, 2)
    assert gaps.tolist() == [0] and is_filler.tolist() == [False]
    # 2 bits: up to 3 zeros fit in one gap; 4 zeros need one filler (at position 3), then a gap of 0.
    mask = np.zeros(10, dtype=bool)
    mask[3] = True
    assert encode_relative_index(mask, 2)[0].tolist() == [3]
    mask = np.zeros(10, dtype=bool)
    mask[4] = True
    gaps, is_filler = encode_relative_index(mask, 2)
    assert gaps.tolist() == [3, 0] and is_filler.tolist() == [True, False]
    assert entry_positions(gaps).tolist() == [3, 4]


def test_gaps_many_times_the_index_range():
    mask = np.zeros(5000, dtype=bool)
    mask[[0, 100, 4999]] = True
    gaps, is_filler = encode_relative_index(mask, 2)
    ref_gaps, ref_fillers = reference_encode([0, 100, 4999], 2)
    assert gaps.tolist() == ref_gaps and is_filler.tolist() == ref_fillers
    assert is_filler.sum() == 99 // 4 + 4898 // 4
    assert gaps.max() <= 3
    np.testing.assert_array_equal(decode_relative_index(gaps, is_filler, 2, 5000), [0, 100, 4999])


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 16])
def test_random_masks_match_the_reference(bits):
    rng = np.random.default_rng(bits)
    for density in (0.005, 0.08, 0.5):
        mask = rng.random(20_000) < density
        gaps, is_filler = encode_relative_index(mask, bits)
        ref_gaps, ref_fillers = reference_encode(np.flatnonzero(mask), bits)
        assert gaps.tolist() == ref_gaps and is_filler.tolist() == ref_fillers
        np.testing.assert_array_equal(decode_relative_index(gaps, is_filler, bits, mask.size), np.flatnonzero(mask))


def test_mask_round_trip_keeps_shape():
    rng = np.random.default_rng(7)
    mask = rng.random((20, 1, 5, 5)) < 0.3
    gaps, is_filler = encode_relative_index(mask.ravel(), 3)
    np.testing.assert_array_equal(mask_from_relative_index(gaps, is_filler, 3, mask.shape), mask)


def test_invalid_streams_and_bits_raise():
    with pytest.raises(DarkpruneError, match="does not fit"):
        decode_relative_index(np.array([9]), np.array([False]), 3, 100)
    with pytest.raises(DarkpruneError, match="beyond the layer size"):
        decode_relative_index(np.array([7, 7]), np.array([False, False]), 3, 10)
    with pytest.raises(DarkpruneError, match="index bits"):
        encode_relative_index(np.ones(3, dtype=bool), 0)
    with pytest.raises(DarkpruneError, match="index bits"):
        encode_relative_index(np.ones(3, dtype=bool), 17)
