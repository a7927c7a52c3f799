"""The `.dcz` compressed model file: a Darknet model after Deep Compression (pruning, weight sharing, Huffman coding).

File layout (little-endian):
    0   4 bytes   magic b"DCZ1"
    4   u16       format version (FORMAT_VERSION)
    6   u16       flags (0)
    8   u64       payload length P
    16  P bytes   payload
    16+P 32 bytes SHA-256 of bytes [0, 16 + P)
The checksum is verified before anything is decoded, so a corrupted or truncated file is refused as a whole.

Payload (varint = unsigned LEB128; "blob" = varint length + bytes):
    bytes-blob cfg text (UTF-8)
    varint major, minor, revision, seen       the Darknet .weights header
    varint layer count, then per layer:
        varint index, blob name, varint array count, then per array:
            blob name, u8 kind (0 raw, 1 quantized), varint ndim, ndim varints (shape)
            raw:       float-blob of the float32 values
            quantized: u8 index_bits, varint k, k float32 (the codebook, only the clusters in use),
                       blob Huffman(gaps), blob Huffman(cluster indices, the filler entries carrying index k)
    bytes-blob: u8 mode (0 stored, 1 Huffman over the bytes) + data
    float-blob: u8 mode (0 stored, 1 the four byte planes of the float32s, each Huffman-coded as a blob)
The gaps and fillers are the relative-index format of darkprune.compress.sparse. Decoding restores every quantised
array as dense float32 with pruned positions exactly 0 and the others exactly their codebook value.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from collections import namedtuple
from pathlib import Path

import numpy as np

from darkprune.compress.binary import ByteReader, ByteWriter, CorruptData
from darkprune.compress.huffman import huffman_decode, huffman_encode
from darkprune.compress.sparse import MAX_INDEX_BITS, decode_relative_index, encode_relative_index
from darkprune.errors import DarkpruneError

MAGIC = b"DCZ1"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHQ")
_DIGEST_SIZE = 32
_KIND_RAW = 0
_KIND_QUANTIZED = 1
_MODE_STORED = 0
_MODE_HUFFMAN = 1
_MAX_ELEMENTS = 1 << 36

WeightsHeader = namedtuple("WeightsHeader", ["major", "minor", "revision", "seen"])


def _as_header(header) -> WeightsHeader:
    if isinstance(header, dict):
        values = [header[key] for key in WeightsHeader._fields]
    elif all(hasattr(header, key) for key in WeightsHeader._fields):
        values = [getattr(header, key) for key in WeightsHeader._fields]
    else:
        values = list(header)
        if len(values) != 4:
            raise ValueError("the weights header is (major, minor, revision, seen)")
    values = [int(value) for value in values]
    if min(values) < 0:
        raise ValueError(f"negative field in the weights header {values}")
    return WeightsHeader(*values)


# ------------------------------------------------------------------------------------------------ array encodings

def _encode_bytes_blob(data: bytes) -> bytes:
    coded = huffman_encode(np.frombuffer(data, dtype=np.uint8)) if data else b""
    if data and len(coded) < len(data):
        return bytes([_MODE_HUFFMAN]) + coded
    return bytes([_MODE_STORED]) + data


def _decode_bytes_blob(view) -> bytes:
    reader = ByteReader(view)
    mode = reader.u8()
    if mode == _MODE_STORED:
        return bytes(reader.raw(reader.remaining()))
    if mode == _MODE_HUFFMAN:
        symbols = _huffman(reader.raw(reader.remaining()))
        if symbols.size and (symbols.min() < 0 or symbols.max() > 255):
            raise CorruptData("byte stream holds a symbol beyond 255")
        return symbols.astype(np.uint8).tobytes()
    raise CorruptData(f"unknown byte-blob mode {mode}")


def _encode_float_blob(values: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    if not raw:
        return bytes([_MODE_STORED])
    # Sign/exponent bytes of trained weights cluster tightly; the low mantissa bytes stay near-uniform. Coding each
    # byte plane separately lets Huffman exploit the former without being diluted by the latter.
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 4).T
    writer = ByteWriter()
    writer.u8(_MODE_HUFFMAN)
    for plane in planes:
        writer.blob(huffman_encode(plane))
    coded = writer.getvalue()
    return coded if len(coded) < len(raw) + 1 else bytes([_MODE_STORED]) + raw


def _decode_float_blob(reader: ByteReader, count: int) -> np.ndarray:
    mode = reader.u8()
    if mode == _MODE_STORED:
        return np.frombuffer(bytes(reader.raw(4 * count)), dtype="<f4").astype(np.float32)
    if mode == _MODE_HUFFMAN:
        planes = np.empty((4, count), dtype=np.uint8)
        for plane in range(4):
            symbols = _huffman(reader.blob(), count)
            if symbols.size != count or (count and (symbols.min() < 0 or symbols.max() > 255)):
                raise CorruptData("a float byte plane does not match the array size")
            planes[plane] = symbols
        return np.frombuffer(planes.T.tobytes(), dtype="<f4").astype(np.float32)
    raise CorruptData(f"unknown float-blob mode {mode}")


def _huffman(view, max_count: int = _MAX_ELEMENTS) -> np.ndarray:
    try:
        return huffman_decode(view, max_count)
    except DarkpruneError as exc:
        raise CorruptData(str(exc)) from None


# --------------------------------------------------------------------------------------------- quantized arrays

def _check_spec(layer_name: str, array_name: str, array, spec: dict):
    where = f"layer {layer_name!r} array {array_name!r}"
    try:
        codebook = np.asarray(spec["codebook"], dtype=np.float32).ravel()
        mask = np.asarray(spec["mask"], dtype=bool)
        labels = np.asarray(spec["labels"]).ravel()
        index_bits = int(spec["index_bits"])
    except KeyError as exc:
        raise ValueError(f"{where}: the quantized spec lacks {exc}") from None
    if array is not None and np.shape(array) != mask.shape:
        raise ValueError(f"{where}: mask shape {mask.shape} differs from the array's {np.shape(array)}")
    if labels.size != int(mask.sum()):
        raise ValueError(f"{where}: {labels.size} labels for {int(mask.sum())} surviving weights")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= codebook.size):
        raise ValueError(f"{where}: a label is outside the codebook of {codebook.size}")
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"{where}: index bits {index_bits} outside [1, {MAX_INDEX_BITS}]")
    return codebook, labels.astype(np.int64), mask, index_bits


def _write_quantized(writer: ByteWriter, codebook, labels, mask, index_bits) -> dict:
    used, compact_labels = np.unique(labels, return_inverse=True)  # empty clusters cost nothing on disk
    compact_codebook = codebook[used]
    gaps, is_filler = encode_relative_index(mask.ravel(), index_bits)
    entry_labels = np.full(gaps.size, used.size, dtype=np.int64)  # the reserved index marks fillers
    entry_labels[~is_filler] = compact_labels.ravel()
    gap_blob = huffman_encode(gaps)
    label_blob = huffman_encode(entry_labels)
    writer.u8(index_bits)
    writer.uvar(used.size)
    writer.raw(compact_codebook.astype("<f4").tobytes())
    writer.blob(gap_blob)
    writer.blob(label_blob)
    return {"entries": int(gaps.size), "fillers": int(is_filler.sum()), "clusters_used": int(used.size),
            "gap_blob_bytes": len(gap_blob), "label_blob_bytes": len(label_blob)}


def _read_quantized(reader: ByteReader, shape: tuple) -> tuple:
    index_bits = reader.u8()
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise CorruptData(f"index bits {index_bits}")
    k = reader.uvar(limit=reader.remaining() // 4)
    codebook = np.frombuffer(bytes(reader.raw(4 * k)), dtype="<f4").astype(np.float32)
    size = int(np.prod(shape, dtype=np.int64))
    gaps = _huffman(reader.blob(), size)  # never more entries than positions
    entry_labels = _huffman(reader.blob(), size)
    if gaps.size != entry_labels.size:
        raise CorruptData("gap and cluster-index streams differ in length")
    if entry_labels.size and (entry_labels.min() < 0 or entry_labels.max() > k):
        raise CorruptData("a cluster index is outside the codebook")
    is_filler = entry_labels == k
    try:
        positions = decode_relative_index(gaps, is_filler, index_bits, size)
    except DarkpruneError as exc:
        raise CorruptData(str(exc)) from None
    labels = entry_labels[~is_filler].astype(np.int32)
    dense = np.zeros(size, dtype=np.float32)
    dense[positions] = codebook[labels]
    mask = np.zeros(size, dtype=bool)
    mask[positions] = True
    spec = {"codebook": codebook, "labels": labels, "mask": mask.reshape(shape), "index_bits": int(index_bits)}
    return dense.reshape(shape), spec


# ------------------------------------------------------------------------------------------------------- payload

def _encode_payload(cfg_text: str, header, layers) -> tuple[bytes, list]:
    header = _as_header(header)
    writer = ByteWriter()
    writer.blob(_encode_bytes_blob(cfg_text.encode("utf-8")))
    for value in header:
        writer.uvar(value)
    writer.uvar(len(layers))
    stats = []
    for layer in layers:
        index = int(layer["index"])
        if index < 0:
            raise ValueError(f"layer index {index} is negative")
        name = str(layer.get("name", ""))
        start = writer.size
        writer.uvar(index)
        writer.text(name)
        arrays = list(layer.get("arrays", []))
        writer.uvar(len(arrays))
        array_stats = []
        for array_name, array, spec in arrays:
            writer.text(str(array_name))
            if spec is None:
                values = np.ascontiguousarray(array, dtype=np.float32)
                shape = values.shape
            else:
                codebook, labels, mask, index_bits = _check_spec(name, array_name, array, spec)
                shape = mask.shape
            writer.u8(_KIND_RAW if spec is None else _KIND_QUANTIZED)
            writer.uvar(len(shape))
            for dim in shape:
                writer.uvar(int(dim))
            array_start = writer.size
            if spec is None:
                writer.raw(_encode_float_blob(values))
                detail = {"kind": "raw"}
            else:
                detail = {"kind": "quantized", "kept": int(labels.size), "clusters": int(codebook.size),
                          "index_bits": index_bits,
                          **_write_quantized(writer, codebook, labels, mask, index_bits)}
            detail.update(name=str(array_name), params=int(np.prod(shape, dtype=np.int64)),
                          bytes=writer.size - array_start)
            array_stats.append(detail)
        stats.append({"index": index, "name": name, "bytes": writer.size - start, "arrays": array_stats})
    return writer.getvalue(), stats


def _frame(payload: bytes) -> bytes:
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(payload))
    digest = hashlib.sha256(prefix)
    digest.update(payload)
    return prefix + payload + digest.digest()


def write_dcz(path, cfg_text: str, header, layers) -> dict:
    """Writes a .dcz file atomically (temp file in the same folder, then os.replace) and returns its size report.

    `header`: (major, minor, revision, seen), a dict or an object with those fields. `layers`: list of
    {"index": int, "name": str, "arrays": [(array_name, array, spec)]}; spec None stores `array` as raw float32;
    otherwise spec = {"codebook": float32[k], "labels": cluster index per surviving weight (C order),
    "mask": bool array of the array's shape, "index_bits": int} and what is stored is the quantised array
    (codebook[labels] at the mask, 0 elsewhere), whatever `array` holds (it may be None).
    """
    path = Path(path)
    payload, stats = _encode_payload(cfg_text, header, layers)
    data = _frame(payload)
    _atomic_write(path, data)
    report = _report(layers, stats, len(data))
    report["path"] = str(path)
    return report


def _atomic_write(path: Path, data: bytes) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    except OSError as exc:
        raise DarkpruneError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except OSError as exc:
        try:
            os.unlink(handle.name)
        except OSError:
            pass
        raise DarkpruneError(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        try:
            os.unlink(handle.name)
        except OSError:
            pass
        raise


def read_dcz(path):
    """-> (cfg_text, WeightsHeader, layers) with layers as written: {"index", "name", "arrays": [(name, dense
    float32, spec)]}, spec None for raw arrays, else {"codebook" (the clusters in use), "labels", "mask",
    "index_bits"}. A file that is not a .dcz, truncated or corrupted raises DarkpruneError before any decoding."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DarkpruneError(f"{path}: cannot read ({exc.strerror})") from None
    payload = _unframe(path, data)
    try:
        return _decode_payload(payload)
    except CorruptData as exc:
        # Unreachable unless the writer itself is broken: the checksum already matched.
        raise DarkpruneError(f"{path}: corrupt .dcz payload ({exc})") from None


def _unframe(path: Path, data: bytes) -> memoryview:
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise DarkpruneError(f"{path}: truncated .dcz file ({len(data)} bytes)")
        raise DarkpruneError(f"{path}: not a .dcz file, or its header is corrupt (bad magic {bytes(data[:4])!r})")
    if len(data) < _PREFIX.size + _DIGEST_SIZE:
        raise DarkpruneError(f"{path}: truncated .dcz file ({len(data)} bytes, the header alone needs "
                             f"{_PREFIX.size + _DIGEST_SIZE})")
    _, version, flags, payload_size = _PREFIX.unpack_from(data)
    expected = _PREFIX.size + payload_size + _DIGEST_SIZE
    if expected != len(data):
        state = "truncated" if expected > len(data) else "corrupt"
        raise DarkpruneError(f"{path}: {state} .dcz file (its header announces {expected} bytes, the file has "
                             f"{len(data)}; truncated or corrupt)")
    body_end = _PREFIX.size + payload_size
    if hashlib.sha256(memoryview(data)[:body_end]).digest() != data[body_end:]:
        raise DarkpruneError(f"{path}: corrupt .dcz file (checksum mismatch: the file was damaged or truncated)")
    if version != FORMAT_VERSION or flags != 0:
        raise DarkpruneError(f"{path}: .dcz format version {version} (flags {flags}) is not supported by this "
                             f"darkprune (it reads version {FORMAT_VERSION})")
    return memoryview(data)[_PREFIX.size:body_end]


def _decode_payload(payload: memoryview):
    reader = ByteReader(payload)
    try:
        cfg_text = _decode_bytes_blob(reader.blob()).decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptData("the cfg text is not UTF-8") from None
    header = WeightsHeader(*(reader.uvar() for _ in WeightsHeader._fields))
    layers = []
    for _ in range(reader.uvar(limit=reader.remaining())):
        index = reader.uvar()
        name = reader.text()
        arrays = []
        for _ in range(reader.uvar(limit=reader.remaining())):
            array_name = reader.text()
            kind = reader.u8()
            ndim = reader.uvar(limit=32)
            shape = tuple(reader.uvar(limit=_MAX_ELEMENTS) for _ in range(ndim))
            if math.prod(shape) > _MAX_ELEMENTS:
                raise CorruptData(f"array {array_name!r} of shape {shape} is implausibly large")
            if kind == _KIND_RAW:
                values = _decode_float_blob(reader, math.prod(shape)).reshape(shape)
                arrays.append((array_name, values, None))
            elif kind == _KIND_QUANTIZED:
                dense, spec = _read_quantized(reader, shape)
                arrays.append((array_name, dense, spec))
            else:
                raise CorruptData(f"unknown array kind {kind}")
        layers.append({"index": index, "name": name, "arrays": arrays})
    if reader.remaining():
        raise CorruptData(f"{reader.remaining()} unread bytes after the last layer")
    return cfg_text, header, layers


# ---------------------------------------------------------------------------------------------------- size report

def size_report(layers, cfg_text: str = "", header=(0, 2, 5, 0)) -> dict:
    """What `write_dcz` would write, measured without writing: see `_report` for the fields."""
    payload, stats = _encode_payload(cfg_text, header, layers)
    return _report(layers, stats, len(_frame(payload)))


def _report(layers, stats, file_bytes: int) -> dict:
    """Per layer and in total: bytes as dense float32, after each Deep Compression stage, and the real file.

    Stages (the paper's Table 1 columns), per quantised array with E relative-index entries (fillers included),
    K the codebook size as given and b its index bits; raw arrays count as dense float32 in every stage:
        pruned:    E * (32 + b) bits                  float32 values on relative indices
        quantized: E * (b + ceil(log2 K)) bits + 32 K  fixed-width cluster indices plus the codebook
        huffman:   the bytes the layer's record really takes in the file
    `weight_bits` / `index_bits_huffman` are the Huffman-coded cluster-index / gap bits per kept weight; the totals'
    `bytes_after` is the whole file (header, cfg text and checksum included).
    """
    rows = []
    totals = {"params": 0, "kept": 0, "quantized_params": 0, "quantized_kept": 0, "bytes_dense": 0, "bytes_pruned": 0.0, "bytes_quantized": 0.0,
              "bytes_huffman": 0}
    for layer, stat in zip(layers, stats):
        params = kept = quantized_params = 0
        dense_bytes = 0
        pruned_bits = quantized_bits = 0.0
        label_bits = gap_bits = 0
        clusters = []
        index_bits = []
        for detail in stat["arrays"]:
            count = detail["params"]
            params += count
            dense_bytes += 4 * count
            if detail["kind"] == "raw":
                kept += count
                pruned_bits += 32 * count
                quantized_bits += 32 * count
                continue
            quantized_params += count
            kept += detail["kept"]
            bits = detail["index_bits"]
            width = max(1, math.ceil(math.log2(max(detail["clusters"], 1))))
            pruned_bits += detail["entries"] * (32 + bits)
            quantized_bits += detail["entries"] * (bits + width) + 32 * detail["clusters"]
            label_bits += 8 * detail["label_blob_bytes"]
            gap_bits += 8 * detail["gap_blob_bytes"]
            clusters.append(detail["clusters"])
            index_bits.append(bits)
        quantized_kept = kept - (params - quantized_params)
        row = {
            "index": stat["index"], "name": stat["name"], "params": params, "kept": kept,
            "sparsity": 1.0 - kept / params if params else 0.0,
            "quantized_params": quantized_params, "quantized_kept": quantized_kept,
            "weights_kept_share": quantized_kept / quantized_params if quantized_params else None,
            "clusters": clusters[0] if len(clusters) == 1 else clusters,
            "index_bits": index_bits[0] if len(index_bits) == 1 else index_bits,
            "weight_bits": label_bits / quantized_kept if quantized_kept else None,
            "index_bits_huffman": gap_bits / quantized_kept if quantized_kept else None,
            "bytes_dense": dense_bytes, "bytes_pruned": pruned_bits / 8, "bytes_quantized": quantized_bits / 8,
            "bytes_after": stat["bytes"],
            "bits_per_weight": 8 * stat["bytes"] / params if params else 0.0,
            "ratio": dense_bytes / stat["bytes"] if stat["bytes"] else math.inf,
        }
        rows.append(row)
        totals["params"] += params
        totals["kept"] += kept
        totals["quantized_params"] += quantized_params
        totals["quantized_kept"] += quantized_kept
        totals["bytes_dense"] += dense_bytes
        totals["bytes_pruned"] += row["bytes_pruned"]
        totals["bytes_quantized"] += row["bytes_quantized"]
        totals["bytes_huffman"] += stat["bytes"]
    dense = totals["bytes_dense"]
    totals.update(
        bytes_after=file_bytes, overhead_bytes=file_bytes - totals["bytes_huffman"],
        kept_share=totals["kept"] / totals["params"] if totals["params"] else 0.0,
        weights_kept_share=(totals["quantized_kept"] / totals["quantized_params"]
                            if totals["quantized_params"] else None),
        bits_per_weight=8 * file_bytes / totals["params"] if totals["params"] else 0.0,
        # The paper's "pruning: 12x" counts weights (params / kept), no index overhead.
        ratio_weight_count=(totals["quantized_params"] / totals["quantized_kept"]
                            if totals["quantized_kept"] else math.inf),
        ratio_pruned=dense / totals["bytes_pruned"] if totals["bytes_pruned"] else math.inf,
        ratio_quantized=dense / totals["bytes_quantized"] if totals["bytes_quantized"] else math.inf,
        ratio=dense / file_bytes if file_bytes else math.inf)
    return {"layers": rows, "total": totals}


def format_size_report(report: dict) -> str:
    """The report as an aligned text table (one row per layer, then the totals)."""
    # kept% is over the quantised (pruned) weights, as in the paper's tables; raw arrays are always kept.
    lines = [f"{'layer':>5} {'name':<16} {'params':>10} {'kept%':>6} {'k':>5} {'idx':>3} {'w-bits':>6} "
             f"{'i-bits':>6} {'dense B':>10} {'after B':>9} {'bits/w':>6} {'ratio':>7}"]

    def number(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) and value is not None else "-"

    def kept_percent(entry):
        share = entry.get("weights_kept_share")
        return 100 * (share if share is not None else entry.get("kept_share", 1 - entry.get("sparsity", 0.0)))

    for row in report["layers"]:
        clusters = row["clusters"] if isinstance(row["clusters"], int) else "-"
        bits = row["index_bits"] if isinstance(row["index_bits"], int) else "-"
        lines.append(
            f"{row['index']:>5} {row['name'][:16]:<16} {row['params']:>10} {kept_percent(row):>6.1f} "
            f"{clusters:>5} {bits:>3} {number(row['weight_bits'], '.2f'):>6} "
            f"{number(row['index_bits_huffman'], '.2f'):>6} {row['bytes_dense']:>10} {row['bytes_after']:>9} "
            f"{row['bits_per_weight']:>6.2f} {row['ratio']:>6.1f}x")
    total = report["total"]
    lines.append(
        f"{'total':>5} {'(file)':<16} {total['params']:>10} {kept_percent(total):>6.1f} {'':>5} {'':>3} "
        f"{'':>6} {'':>6} {total['bytes_dense']:>10} {total['bytes_after']:>9} {total['bits_per_weight']:>6.2f} "
        f"{total['ratio']:>6.1f}x")
    lines.append(f"stages: weights {total['ratio_weight_count']:.1f}x fewer, pruned {total['ratio_pruned']:.1f}x, +quantized {total['ratio_quantized']:.1f}x, "
                 f"+huffman {total['ratio']:.1f}x (file overhead {total['overhead_bytes']} bytes)")
    return "\n".join(lines)


__all__ = ["MAGIC", "FORMAT_VERSION", "WeightsHeader", "write_dcz", "read_dcz", "size_report", "format_size_report"]
