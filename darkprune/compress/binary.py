"""Byte-level building blocks shared by the compressed formats: LEB128 varints, zigzag, a bounded reader.

A reader never reads past its buffer: any overrun or impossible value raises `CorruptData`, which the file-level
readers turn into a one-line `DarkpruneError` naming the file.
"""

from __future__ import annotations

import numpy as np
from numba import njit


class CorruptData(ValueError):
    """Raised while parsing a compressed structure that is malformed or cut short."""


def zigzag(value: int) -> int:
    """Maps signed to unsigned so small magnitudes of either sign get short varints: 0,-1,1,-2 -> 0,1,2,3."""
    return (value << 1) if value >= 0 else ((-value) << 1) - 1


def unzigzag(value: int) -> int:
    return (value >> 1) if not (value & 1) else -((value + 1) >> 1)


def varint(value: int) -> bytes:
    """Unsigned LEB128."""
    if value < 0:
        raise ValueError(f"varint of a negative value {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@njit(cache=True)
def _varint_array_kernel(values, out):
    pos = 0
    for i in range(values.shape[0]):
        v = values[i]
        while True:
            byte = v & np.uint64(0x7F)
            v = v >> np.uint64(7)
            if v != 0:
                out[pos] = np.uint8(byte | np.uint64(0x80))
                pos += 1
            else:
                out[pos] = np.uint8(byte)
                pos += 1
                break
    return pos


def varint_array(values: np.ndarray) -> bytes:
    """Concatenated unsigned LEB128 varints of a uint64 array (vectorised for long tables)."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    out = np.empty(values.shape[0] * 10, dtype=np.uint8)
    used = _varint_array_kernel(values, out)
    return out[:used].tobytes()


@njit(cache=True)
def _read_varint_array_kernel(buf, pos, count, out):
    """Returns the position after `count` varints, or -1 if the buffer ends early / a varint is too long."""
    n = buf.shape[0]
    for i in range(count):
        value = np.uint64(0)
        shift = 0
        while True:
            if pos >= n or shift > 63:
                return -1
            byte = buf[pos]
            pos += 1
            value |= np.uint64(byte & 0x7F) << np.uint64(shift)
            if byte < 0x80:
                break
            shift += 7
        out[i] = value
    return pos


class ByteWriter:
    """Accumulates bytes; varints and length-prefixed blobs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def raw(self, data: bytes) -> None:
        data = bytes(data)
        self._parts.append(data)
        self.size += len(data)

    def u8(self, value: int) -> None:
        self.raw(bytes([value]))

    def uvar(self, value: int) -> None:
        self.raw(varint(value))

    def svar(self, value: int) -> None:
        self.raw(varint(zigzag(value)))

    def blob(self, data: bytes) -> None:
        self.uvar(len(data))
        self.raw(data)

    def text(self, value: str) -> None:
        self.blob(value.encode("utf-8"))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class ByteReader:
    """Reads from a bytes-like buffer, raising CorruptData instead of running past its end."""

    def __init__(self, data, pos: int = 0, end: int | None = None) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        self.pos = pos
        self.end = len(self.data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def raw(self, count: int) -> memoryview:
        if count < 0 or self.pos + count > self.end:
            raise CorruptData(f"needs {count} bytes at offset {self.pos}, only {self.end - self.pos} left")
        view = self.data[self.pos:self.pos + count]
        self.pos += count
        return view

    def u8(self) -> int:
        return self.raw(1)[0]

    def uvar(self, limit: int = 1 << 63) -> int:
        value = 0
        shift = 0
        while True:
            if self.pos >= self.end:
                raise CorruptData(f"varint runs past the end at offset {self.pos}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise CorruptData(f"varint too long at offset {self.pos}")
        if value > limit:
            raise CorruptData(f"value {value} exceeds the limit {limit} at offset {self.pos}")
        return value

    def svar(self) -> int:
        return unzigzag(self.uvar())

    def uvar_array(self, count: int) -> np.ndarray:
        if count < 0 or count > self.remaining():  # each varint takes at least one byte
            raise CorruptData(f"{count} varints cannot fit in {self.remaining()} bytes")
        out = np.empty(count, dtype=np.uint64)
        buf = np.frombuffer(self.data, dtype=np.uint8, count=self.end)
        new_pos = _read_varint_array_kernel(buf, self.pos, count, out)
        if new_pos < 0:
            raise CorruptData(f"varint table runs past the end at offset {self.pos}")
        self.pos = int(new_pos)
        return out

    def blob(self) -> memoryview:
        return self.raw(self.uvar(limit=self.remaining()))

    def text(self) -> str:
        try:
            return bytes(self.blob()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptData(f"text is not UTF-8 ({exc.reason})") from None
