"""Canonical Huffman coding: optimality against a textbook reference, prefix property, round trips, edge cases."""

import heapq

import numpy as np
import pytest

from darkprune.compress.huffman import (MAX_CODE_LENGTH, canonical_codes, code_lengths, huffman_decode,
                                        huffman_encode, huffman_payload_bits)
from darkprune.errors import DarkpruneError


def reference_huffman_cost(freqs):
    """Total coded bits of an optimal prefix code: the sum of all merge weights (independent textbook heap build)."""
    heap = [int(f) for f in freqs if f > 0]
    if len(heap) <= 1:
        return 0
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def entropy_bits(stream):
    counts = np.unique(stream, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_textbook_example_lengths_and_canonical_codes():
    # CLRS 16.3: a..f with frequencies 45, 13, 12, 16, 9, 5 -> lengths 1, 3, 3, 3, 4, 4, 224 bits in total.
    freqs = np.array([45, 13, 12, 16, 9, 5])
    lengths = code_lengths(freqs)
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    assert int(np.dot(lengths, freqs)) == 224 == reference_huffman_cost(freqs)
    codes = canonical_codes(lengths)
    as_strings = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths)]
    assert as_strings == ["0", "100", "101", "110", "1110", "1111"]


@pytest.mark.parametrize("seed", range(6))
def test_lengths_are_optimal_and_prefix_free(seed):
    rng = np.random.default_rng(seed)
    freqs = rng.integers(0, 1000, size=int(rng.integers(2, 400)))
    if seed % 2:
        freqs[rng.random(freqs.size) < 0.7] = 0  # many absent symbols
    freqs[:2] += 1  # at least two present symbols
    lengths = code_lengths(freqs)
    assert (lengths[freqs == 0] == 0).all() and (lengths[freqs > 0] > 0).all()
    assert int(np.dot(lengths.astype(np.int64), freqs)) == reference_huffman_cost(freqs)
    present = np.flatnonzero(lengths)
    assert sum(2.0 ** -int(lengths[s]) for s in present) == 1.0  # Kraft, with equality: a full tree
    codes = canonical_codes(lengths)
    words = sorted(format(int(codes[s]), f"0{int(lengths[s])}b") for s in present)
    for shorter, longer in zip(words, words[1:]):  # sorted strings: a prefix would sit right before its extension
        assert not longer.startswith(shorter)


def test_deterministic_tie_breaking():
    # Seven equal frequencies: merges go (0,1), (2,3), (4,5), then leaf 6 with the first pair, so symbol 6 alone
    # gets a 2-bit code. Ties break by symbol value, never by chance or by stream order.
    freqs = np.full(7, 5)
    assert code_lengths(freqs).tolist() == [3, 3, 3, 3, 3, 3, 2]
    rng = np.random.default_rng(0)
    stream = np.repeat(np.arange(7), 5)
    shuffled = rng.permutation(stream)
    blob = huffman_encode(shuffled)
    assert blob == huffman_encode(shuffled.copy())
    # The table depends only on the frequencies, so only the payload differs between orderings.
    assert len(blob) == len(huffman_encode(stream))


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random_streams(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 5000))
    kind = seed % 5
    if kind == 0:
        stream = rng.integers(0, 256, size)
    elif kind == 1:
        stream = rng.integers(-1000, 1000, size)
    elif kind == 2:
        stream = rng.geometric(0.2, size)
    elif kind == 3:
        stream = rng.integers(-(1 << 40), 1 << 40, size)  # sparse, wide alphabet
    else:
        stream = rng.choice([3, 1 << 20, -7], size)
    decoded = huffman_decode(huffman_encode(stream))
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, stream)


def test_empty_stream():
    blob = huffman_encode(np.zeros(0, dtype=np.int32))
    assert blob == b"\x00"
    assert huffman_decode(blob).size == 0


def test_single_symbol_costs_no_payload_bits():
    for count in (1, 7, 1_000_000):
        blob = huffman_encode(np.full(count, 42, dtype=np.int64))
        assert len(blob) <= 6  # stream length + one table entry, no payload
        decoded = huffman_decode(blob)
        assert decoded.size == count and (decoded == 42).all()
    assert huffman_payload_bits(np.full(10, 3)) == 0


def test_two_symbols_cost_one_bit_each():
    stream = np.array([0, 1] * 400 + [1] * 200)
    assert huffman_payload_bits(stream) == stream.size
    np.testing.assert_array_equal(huffman_decode(huffman_encode(stream)), stream)


def test_skewed_distributions_reach_close_to_entropy():
    rng = np.random.default_rng(1)
    # A broad geometric-like distribution (like relative-index gaps): Huffman is within a few % of the entropy.
    stream = rng.geometric(0.08, 200_000) % 32
    entropy = entropy_bits(stream)
    average = huffman_payload_bits(stream) / stream.size
    assert entropy <= average <= entropy * 1.02
    blob_bits = 8 * len(huffman_encode(stream)) / stream.size
    assert blob_bits <= average + 0.01  # the table is negligible on a long stream
    # A dyadic distribution is coded exactly at its entropy.
    dyadic = np.repeat([0, 1, 2, 3], [50_000, 25_000, 12_500, 12_500])
    assert huffman_payload_bits(dyadic) / dyadic.size == pytest.approx(entropy_bits(dyadic), abs=1e-12) == 1.75
    # Very skewed: within the Huffman bound H <= L < H + 1.
    skewed = (rng.random(100_000) < 0.03).astype(np.int64)
    assert entropy_bits(skewed) <= huffman_payload_bits(skewed) / skewed.size < entropy_bits(skewed) + 1


def test_large_alphabet_and_long_stream():
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 1 << 16, 300_000)
    np.testing.assert_array_equal(huffman_decode(huffman_encode(wide)), wide)
    assert len(np.unique(wide)) > 60_000
    long_stream = rng.geometric(0.1, 2_000_000)
    blob = huffman_encode(long_stream)
    np.testing.assert_array_equal(huffman_decode(blob), long_stream)
    assert 8 * len(blob) / long_stream.size < entropy_bits(long_stream) + 0.05


def test_code_lengths_are_limited():
    # Fibonacci frequencies give an optimal tree as deep as the alphabet is large; the coder caps it.
    fib = [1, 1]
    while len(fib) < 45:
        fib.append(fib[-1] + fib[-2])
    lengths = code_lengths(np.array(fib, dtype=np.int64))
    assert lengths.max() <= MAX_CODE_LENGTH
    assert sum(2.0 ** -int(n) for n in lengths) <= 1.0
    stream = np.repeat(np.arange(30), fib[:30])
    np.testing.assert_array_equal(huffman_decode(huffman_encode(stream)), stream)


def test_bool_and_unsigned_inputs():
    flags = np.array([True, False, False, True])
    np.testing.assert_array_equal(huffman_decode(huffman_encode(flags)), flags.astype(np.int64))
    gaps = np.array([0, 65535, 3], dtype=np.uint16)
    np.testing.assert_array_equal(huffman_decode(huffman_encode(gaps)), gaps)
    with pytest.raises(TypeError):
        huffman_encode(np.array([0.5, 1.0]))


def test_malformed_blobs_raise():
    rng = np.random.default_rng(3)
    blob = huffman_encode(rng.integers(0, 50, 2000))
    with pytest.raises(DarkpruneError, match="corrupt Huffman stream"):
        huffman_decode(blob[:-5])
    with pytest.raises(DarkpruneError, match="corrupt Huffman stream"):
        huffman_decode(blob + b"\x00")
    with pytest.raises(DarkpruneError, match="corrupt Huffman stream"):
        huffman_decode(b"\x05")
