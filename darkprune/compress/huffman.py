"""Canonical Huffman coding of integer symbol streams (Deep Compression's last stage).

`huffman_encode(symbols) -> bytes` gives a self-contained blob: the stream length, a compact canonical code table and
the bit payload; `huffman_decode(blob) -> int64 array` restores the stream exactly.

Blob layout (varints are unsigned LEB128, "svar" is a zigzag varint):
    varint n                          number of symbols; n == 0 ends the blob
    varint d                          number of distinct symbols (1 <= d <= n)
    d == 1: svar symbol               a constant stream costs no payload bits at all
    d >= 2: u8 table_mode, table, varint payload_bytes, payload
        table_mode 0 (sparse list):   varint L, L varints (count of codes of length 1..L),
                                      d svars: the symbols in canonical order, each as the delta from the previous one
        table_mode 1 (dense range):   svar min_symbol, varint range, u8 L,
                                      `range` code lengths (0 = absent) packed MSB-first with bit_length(L) bits each
    payload: the codes, MSB-first, zero-padded to a whole byte.
The encoder writes whichever table is smaller. Codes are canonical (ordered by length, then symbol value), so the table
needs only the code lengths; ties in the tree construction break by (frequency, symbol value), so the output is a pure
function of the input stream. Code lengths are limited to MAX_CODE_LENGTH bits (frequencies are halved until the tree
fits, which only happens for pathological, Fibonacci-like frequency sets).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from darkprune.compress.binary import ByteReader, ByteWriter, CorruptData, varint_array
from darkprune.errors import DarkpruneError

MAX_CODE_LENGTH = 32
_TABLE_SPARSE = 0
_TABLE_DENSE = 1
# The direct bincount path handles symbol ranges up to this size; wider or sparser alphabets go through np.unique.
_DIRECT_RANGE_LIMIT = 1 << 20


# ----------------------------------------------------------------------------------------------------- code lengths

@njit(cache=True)
def _tree_depths(sorted_freqs):
    """Depth of every leaf in the Huffman tree of `sorted_freqs` (ascending, n >= 2), by the two-queue method.

    Leaves and internal nodes are both consumed in nondecreasing weight order; on equal weights a leaf goes first,
    which keeps the construction deterministic and the tree shallow.
    """
    n = sorted_freqs.shape[0]
    weight = np.empty(2 * n - 1, dtype=np.int64)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    weight[:n] = sorted_freqs
    next_leaf = 0
    next_internal = n
    created = n
    for _ in range(n - 1):
        picked0 = 0
        picked1 = 0
        for pick in range(2):
            if next_leaf < n and (next_internal >= created or weight[next_leaf] <= weight[next_internal]):
                chosen = next_leaf
                next_leaf += 1
            else:
                chosen = next_internal
                next_internal += 1
            if pick == 0:
                picked0 = chosen
            else:
                picked1 = chosen
        weight[created] = weight[picked0] + weight[picked1]
        parent[picked0] = created
        parent[picked1] = created
        created += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    # Every node is created after its children, so walking back from the root fills depths parent-first.
    for node in range(2 * n - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    return depth[:n]


def code_lengths(freqs, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of every symbol 0..len(freqs)-1 (0 for symbols of frequency 0).

    A single present symbol gets length 1 (the conventional one-bit code; `huffman_encode` spends no bits on it).
    """
    freqs = np.asarray(freqs)
    if freqs.ndim != 1:
        raise ValueError("code_lengths expects a 1-D frequency array")
    if freqs.size and freqs.min() < 0:
        raise ValueError("frequencies must be non-negative")
    freqs = freqs.astype(np.int64)
    lengths = np.zeros(freqs.shape[0], dtype=np.uint8)
    present = np.flatnonzero(freqs)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present] = 1
        return lengths
    if present.size > (1 << max_length):
        raise ValueError(f"{present.size} symbols cannot have codes of at most {max_length} bits")
    work = freqs[present]
    while True:
        order = np.lexsort((present, work))  # by frequency, then symbol value
        depths = _tree_depths(work[order])
        if depths.max() <= max_length:
            break
        work = np.maximum(work >> 1, 1)
    lengths[present[order]] = depths.astype(np.uint8)
    return lengths


@njit(cache=True)
def _assign_canonical(sorted_lengths):
    codes = np.empty(sorted_lengths.shape[0], dtype=np.uint64)
    code = np.uint64(0)
    previous = sorted_lengths[0]
    for i in range(sorted_lengths.shape[0]):
        length = sorted_lengths[i]
        if i > 0:
            code = (code + np.uint64(1)) << np.uint64(length - previous)
        codes[i] = code
        previous = length
    return codes


def canonical_codes(lengths) -> np.ndarray:
    """Canonical code values (uint64, read MSB-first over `lengths[s]` bits) for code lengths indexed by symbol."""
    lengths = np.asarray(lengths).astype(np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.uint64)
    present = np.flatnonzero(lengths)
    if present.size:
        order = present[np.lexsort((present, lengths[present]))]
        codes[order] = _assign_canonical(lengths[order])
    return codes


# ------------------------------------------------------------------------------------------------------ bit packing

@njit(cache=True)
def _pack_codes(indices, codes, lengths, out):
    acc = np.uint64(0)
    pending = 0
    pos = 0
    for i in range(indices.shape[0]):
        s = indices[i]
        length = lengths[s]
        acc = (acc << np.uint64(length)) | codes[s]
        pending += length
        while pending >= 8:
            pending -= 8
            out[pos] = np.uint8((acc >> np.uint64(pending)) & np.uint64(0xFF))
            pos += 1
        acc &= (np.uint64(1) << np.uint64(pending)) - np.uint64(1)
    if pending > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - pending)) & np.uint64(0xFF))
        pos += 1
    return pos


@njit(cache=True)
def _unpack_codes(buf, count, first_code, code_count, offset, max_length, out):
    """Decodes `count` codes; returns the number of bits read, or -1 on an invalid code or a short buffer."""
    total_bits = buf.shape[0] * 8
    bitpos = 0
    for i in range(count):
        code = 0
        length = 0
        while True:
            if length == max_length or bitpos >= total_bits:
                return -1
            bit = (buf[bitpos >> 3] >> (7 - (bitpos & 7))) & 1
            bitpos += 1
            length += 1
            code = (code << 1) | bit
            delta = code - first_code[length]
            if delta >= 0 and delta < code_count[length]:
                out[i] = offset[length] + delta
                break
    return bitpos


# ---------------------------------------------------------------------------------------------------------- encoder

def _symbol_table(symbols: np.ndarray):
    """-> (alphabet int64 ascending, frequencies, index of every stream element into the alphabet)."""
    low = int(symbols.min())
    high = int(symbols.max())
    span = high - low + 1
    if span <= max(_DIRECT_RANGE_LIMIT // 8, min(_DIRECT_RANGE_LIMIT, 4 * symbols.size)):
        offsets = (symbols - low) if low != 0 else symbols
        counts = np.bincount(offsets, minlength=span)
        present = np.flatnonzero(counts)
        if present.size == span:
            return present + low, counts, offsets
        position = np.full(span, -1, dtype=np.int64)
        position[present] = np.arange(present.size)
        return present + low, counts[present], position[offsets]
    alphabet, inverse, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    return alphabet.astype(np.int64), counts, inverse.ravel()


def _as_symbol_array(symbols) -> np.ndarray:
    array = np.asarray(symbols)
    if array.dtype == np.bool_:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"Huffman symbols must be integers, got {array.dtype}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError("Huffman symbols must fit in int64")
    return np.ascontiguousarray(array.ravel()).astype(np.int64, copy=False)


def _sparse_table(alphabet_sorted: np.ndarray, lengths_sorted: np.ndarray) -> bytes:
    writer = ByteWriter()
    max_length = int(lengths_sorted[-1])
    writer.uvar(max_length)
    per_length = np.bincount(lengths_sorted, minlength=max_length + 1)[1:]
    writer.raw(varint_array(per_length.astype(np.uint64)))
    deltas = np.diff(alphabet_sorted, prepend=0)
    zigzags = np.where(deltas >= 0, deltas << 1, ((-deltas) << 1) - 1).astype(np.uint64)
    writer.raw(varint_array(zigzags))
    return writer.getvalue()


def _dense_table(alphabet: np.ndarray, lengths: np.ndarray) -> bytes:
    low = int(alphabet[0])
    span = int(alphabet[-1]) - low + 1
    full = np.zeros(span, dtype=np.uint8)
    full[alphabet - low] = lengths
    max_length = int(lengths.max())
    width = max_length.bit_length()
    bits = np.unpackbits(full[:, None], axis=1)[:, 8 - width:]
    writer = ByteWriter()
    writer.svar(low)
    writer.uvar(span)
    writer.u8(max_length)
    writer.raw(np.packbits(bits.ravel()).tobytes())
    return writer.getvalue()


def huffman_encode(symbols) -> bytes:
    """Canonical-Huffman-codes an integer stream (any shape, flattened in C order) into a self-contained blob."""
    stream = _as_symbol_array(symbols)
    writer = ByteWriter()
    writer.uvar(stream.size)
    if stream.size == 0:
        return writer.getvalue()
    alphabet, freqs, indices = _symbol_table(stream)
    writer.uvar(alphabet.size)
    if alphabet.size == 1:
        writer.svar(int(alphabet[0]))
        return writer.getvalue()
    lengths = code_lengths(freqs)
    codes = canonical_codes(lengths)
    order = np.lexsort((alphabet, lengths))
    sparse = _sparse_table(alphabet[order], lengths[order])
    span = int(alphabet[-1]) - int(alphabet[0]) + 1
    dense = _dense_table(alphabet, lengths) if span <= 4 * alphabet.size + 64 else None
    if dense is not None and len(dense) < len(sparse):
        writer.u8(_TABLE_DENSE)
        writer.raw(dense)
    else:
        writer.u8(_TABLE_SPARSE)
        writer.raw(sparse)
    total_bits = int(np.dot(freqs.astype(np.int64), lengths.astype(np.int64)))
    payload = np.empty((total_bits + 7) // 8, dtype=np.uint8)
    used = _pack_codes(indices, codes, lengths.astype(np.int64), payload)
    assert used == payload.size
    writer.uvar(payload.size)
    writer.raw(payload.tobytes())
    return writer.getvalue()


# ---------------------------------------------------------------------------------------------------------- decoder

def _read_table(reader: ByteReader, distinct: int):
    """-> (symbols in canonical order, code length of each), validated."""
    mode = reader.u8()
    if mode == _TABLE_SPARSE:
        max_length = reader.uvar(limit=MAX_CODE_LENGTH)
        per_length = reader.uvar_array(max_length).astype(np.int64)
        if max_length == 0 or int(per_length.sum()) != distinct:
            raise CorruptData("Huffman table counts do not add up")
        lengths = np.repeat(np.arange(1, max_length + 1), per_length)
        zigzags = reader.uvar_array(distinct)
        if zigzags.size and int(zigzags.max()) >= (1 << 63):
            raise CorruptData("Huffman table symbol out of range")
        zigzags = zigzags.astype(np.int64)
        deltas = np.where(zigzags & 1, -((zigzags + 1) >> 1), zigzags >> 1)
        symbols = np.cumsum(deltas)
    elif mode == _TABLE_DENSE:
        low = reader.svar()
        span = reader.uvar(limit=1 << 40)
        max_length = reader.u8()
        if not 1 <= max_length <= MAX_CODE_LENGTH:
            raise CorruptData("Huffman table code length out of range")
        width = max_length.bit_length()
        packed = reader.raw((span * width + 7) // 8)
        bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:span * width].reshape(span, width)
        full = (bits.astype(np.int64) << np.arange(width - 1, -1, -1)).sum(axis=1)
        present = np.flatnonzero(full)
        if present.size != distinct or int(full.max()) > max_length:
            raise CorruptData("Huffman table lengths do not match the symbol count")
        order = present[np.lexsort((present, full[present]))]
        symbols = order.astype(np.int64) + low
        lengths = full[order]
    else:
        raise CorruptData(f"unknown Huffman table mode {mode}")
    return symbols, lengths


def huffman_decode(data, max_count: int = 1 << 40) -> np.ndarray:
    """Inverse of `huffman_encode`: the symbol stream as int64. Raises DarkpruneError on a malformed blob, or when it
    announces more than `max_count` symbols (so a damaged length cannot trigger a huge allocation)."""
    try:
        reader = ByteReader(data)
        stream = _decode_from(reader, max_count)
        if reader.remaining():
            raise CorruptData(f"{reader.remaining()} bytes left over after the Huffman stream")
        return stream
    except CorruptData as exc:
        raise DarkpruneError(f"corrupt Huffman stream: {exc}") from None


def _decode_from(reader: ByteReader, max_count: int) -> np.ndarray:
    count = reader.uvar(limit=max_count)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    distinct = reader.uvar(limit=count)
    if distinct == 0:
        raise CorruptData("a non-empty stream with no symbols")
    if distinct == 1:
        return np.full(count, reader.svar(), dtype=np.int64)
    symbols, lengths = _read_table(reader, distinct)
    max_length = int(lengths[-1])
    code_count = np.bincount(lengths, minlength=max_length + 1).astype(np.int64)
    first_code = np.zeros(max_length + 1, dtype=np.int64)
    offset = np.zeros(max_length + 1, dtype=np.int64)
    code = 0
    for length in range(1, max_length + 1):
        code = (code + (int(code_count[length - 1]) if length > 1 else 0)) << (1 if length > 1 else 0)
        first_code[length] = code
        offset[length] = offset[length - 1] + (code_count[length - 1] if length > 1 else 0)
        if code + int(code_count[length]) > (1 << length):
            raise CorruptData("Huffman code lengths violate the Kraft inequality")
    payload_size = reader.uvar(limit=reader.remaining())
    payload = np.frombuffer(reader.raw(payload_size), dtype=np.uint8)
    if payload_size * 8 < count:  # every code is at least one bit
        raise CorruptData("Huffman payload too short for the stream length")
    indices = np.empty(count, dtype=np.int64)
    used_bits = _unpack_codes(payload, count, first_code, code_count, offset, max_length, indices)
    if used_bits < 0 or (used_bits + 7) // 8 != payload_size:
        raise CorruptData("Huffman payload does not decode to the stated stream length")
    return symbols[indices]


def huffman_payload_bits(symbols) -> int:
    """Bits the codes alone take for this stream (no table), e.g. to report bits per symbol."""
    stream = _as_symbol_array(symbols)
    if stream.size == 0:
        return 0
    _, freqs, _ = _symbol_table(stream)
    if freqs.size == 1:
        return 0
    return int(np.dot(freqs.astype(np.int64), code_lengths(freqs).astype(np.int64)))


__all__ = ["MAX_CODE_LENGTH", "code_lengths", "canonical_codes", "huffman_encode", "huffman_decode",
           "huffman_payload_bits"]
