"""Darknet `.cfg` reading and writing.

A cfg is a list of sections (`[net]`, `[convolutional]`, ...) each holding `key=value` options. We keep every line we
read (comments, blank lines, spacing) so that an unmodified cfg is written back byte for byte; an option that was
changed, or a section that was created, is written in Darknet's plain `key=value` form.

Darknet's own reader removes every space and tab from a line before it looks at it, so `size = 3` and `size=3` are
the same; its option lookup returns the *first* occurrence of a repeated key. We follow both rules. Unlike Darknet we
refuse lines that are neither a section, an option nor a comment, naming the file and line, because Darknet's warning
is easy to miss and the layer is then built with a default value.

What we write is plain ASCII with LF line ends: Darknet on Linux chokes on CR characters, and cfgs edited on Windows
have broken other pruners' outputs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DarkpruneError
from ..util.files import atomic_write_bytes
from ..util.textio import read_input_bytes

# Section names Darknet accepts, mapped to our canonical type names (parser.c: string_to_layer_type).
SECTION_ALIASES = {
    "net": "net", "network": "net",
    "conv": "convolutional", "convolutional": "convolutional",
    "conn": "connected", "connected": "connected",
    "max": "maxpool", "maxpool": "maxpool",
    "avg": "avgpool", "avgpool": "avgpool",
    "local_avg": "local_avgpool", "local_avgpool": "local_avgpool",
    "soft": "softmax", "softmax": "softmax",
    "lrn": "normalization", "normalization": "normalization",
    "empty": "empty", "silence": "empty",
    "shortcut": "shortcut", "scale_channels": "scale_channels", "sam": "sam", "crop": "crop", "cost": "cost",
    "detection": "detection", "region": "region", "yolo": "yolo", "Gaussian_yolo": "gaussian_yolo",
    "local": "local", "activation": "activation", "crnn": "crnn", "gru": "gru", "lstm": "lstm",
    "conv_lstm": "conv_lstm", "history": "history", "rnn": "rnn", "reorg3d": "reorg3d", "reorg": "reorg",
    "dropout": "dropout", "batchnorm": "batchnorm", "contrastive": "contrastive", "route": "route",
    "upsample": "upsample", "implicit": "implicit",
}

_WHITESPACE = re.compile(r"[ \t\r\n\f\v]")


def _squeeze(text: str) -> str:
    """Darknet's strip(): every whitespace character removed, wherever it is."""
    return _WHITESPACE.sub("", text)


@dataclass
class Option:
    key: str
    value: str
    line: int = 0                 # 1-based line in the file it came from (0 = created in memory)
    raw: str | None = None        # the original text of the line (with its end), None once changed


@dataclass
class Section:
    """One `[type]` block. `entries` holds Options and raw comment/blank lines in file order."""
    type: str                                     # canonical type ("convolutional", "net", ...)
    header: str = ""                              # the name as written ("conv", "Gaussian_yolo", ...)
    line: int = 0
    header_raw: str | None = None
    entries: list = field(default_factory=list)   # Option | str (raw comment/blank line)
    path: str = ""

    # -- lookup with Darknet's rules -------------------------------------------------------------------------
    @property
    def options(self) -> list[Option]:
        return [e for e in self.entries if isinstance(e, Option)]

    def find(self, key: str) -> Option | None:
        for e in self.entries:
            if isinstance(e, Option) and e.key == key:
                return e
        return None

    def __contains__(self, key: str) -> bool:
        return self.find(key) is not None

    def where(self, key: str | None = None) -> str:
        opt = self.find(key) if key else None
        line = opt.line if opt is not None and opt.line else self.line
        return f"{self.path}:{line}" if self.path else f"line {line}"

    def get_str(self, key: str, default: str | None = None) -> str | None:
        opt = self.find(key)
        return opt.value if opt is not None else default

    def get_int(self, key: str, default: int | None = None) -> int | None:
        opt = self.find(key)
        if opt is None:
            return default
        value = opt.value.split("#")[0]
        try:
            return int(value)
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise DarkpruneError(
                    f"{self.where(key)}: [{self.header}] {key}={opt.value}: expected an integer") from None
            return int(as_float)        # Darknet's atoi("1.5") == 1

    def get_float(self, key: str, default: float | None = None) -> float | None:
        opt = self.find(key)
        if opt is None:
            return default
        try:
            return float(opt.value.split("#")[0])
        except ValueError:
            raise DarkpruneError(f"{self.where(key)}: [{self.header}] {key}={opt.value}: expected a number") from None

    def get_list(self, key: str, kind=float) -> list | None:
        """A comma list (anchors, mask, layers, steps, scales); Darknet stops counting at '#'."""
        opt = self.find(key)
        if opt is None:
            return None
        text = opt.value.split("#")[0].strip(",")
        if not text:
            return []
        out = []
        for item in text.split(","):
            try:
                out.append(kind(float(item)) if kind is int else kind(item))
            except ValueError:
                raise DarkpruneError(
                    f"{self.where(key)}: [{self.header}] {key}={opt.value}: '{item}' is not a number") from None
        return out

    # -- editing ----------------------------------------------------------------------------------------------
    def set(self, key: str, value) -> None:
        if isinstance(value, (list, tuple)):
            value = ",".join(_format_number(v) for v in value)
        else:
            value = _format_number(value)
        opt = self.find(key)
        if opt is None:
            last = max((i for i, e in enumerate(self.entries) if isinstance(e, Option)), default=-1)
            self.entries.insert(last + 1, Option(key, value))
        elif opt.value != value:
            opt.value = value
            opt.raw = None

    def remove(self, key: str) -> None:
        self.entries = [e for e in self.entries if not (isinstance(e, Option) and e.key == key)]

    def copy(self) -> "Section":
        return Section(self.type, self.header, self.line, self.header_raw,
                       [Option(e.key, e.value, e.line, e.raw) if isinstance(e, Option) else e for e in self.entries],
                       self.path)


def _format_number(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v) if v != int(v) else str(int(v)) if abs(v) < 1e15 else repr(v)
    return str(v)


@dataclass
class Cfg:
    sections: list[Section]
    preamble: list[str] = field(default_factory=list)   # comment lines before the first section
    path: str = ""

    @property
    def net(self) -> Section:
        return self.sections[0]

    @property
    def layers(self) -> list[Section]:
        return self.sections[1:]

    def copy(self) -> "Cfg":
        return Cfg([s.copy() for s in self.sections], list(self.preamble), self.path)

    def text(self) -> str:
        lines = list(_render(self))
        # A line kept without its end (the file's last line) gets one when something follows it.
        return "".join(line if line.endswith("\n") or i == len(lines) - 1 else line + "\n"
                       for i, line in enumerate(lines))


def _ascii_line(raw: str) -> str:
    """A kept line, re-ended with LF (a last line without an end stays without one) and made ASCII."""
    line = raw.rstrip("\r\n")
    ending = "\n" if len(line) != len(raw) else ""
    return line.encode("ascii", "replace").decode("ascii") + ending


def _render(cfg: Cfg) -> Iterator[str]:
    for raw in cfg.preamble:
        yield _ascii_line(raw)
    for sec in cfg.sections:
        yield _ascii_line(sec.header_raw) if sec.header_raw is not None else f"[{sec.header or sec.type}]\n"
        for e in sec.entries:
            if isinstance(e, Option):
                yield _ascii_line(e.raw) if e.raw is not None else f"{e.key}={e.value}\n"
            else:
                yield _ascii_line(e)


def parse_cfg_text(text: str, path: str = "<cfg>") -> Cfg:
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.splitlines(keepends=True)
    preamble: list[str] = []
    sections: list[Section] = []
    current: Section | None = None
    for number, raw in enumerate(lines, start=1):
        squeezed = _squeeze(raw)
        if not squeezed or squeezed[0] in "#;":
            (current.entries if current is not None else preamble).append(raw)
            continue
        if squeezed[0] == "[":
            end = squeezed.find("]")
            if end < 0:
                raise DarkpruneError(f"{path}:{number}: section header '{raw.strip()}' has no closing ']'")
            name = squeezed[1:end]
            if name not in SECTION_ALIASES:
                known = ", ".join(sorted({k for k in SECTION_ALIASES if k == SECTION_ALIASES[k]}))
                raise DarkpruneError(f"{path}:{number}: unknown section [{name}] (Darknet knows: {known})")
            current = Section(SECTION_ALIASES[name], name, number, raw, [], path)
            sections.append(current)
            continue
        if "=" not in squeezed:
            raise DarkpruneError(f"{path}:{number}: expected 'key=value' or a [section], got '{raw.strip()}'")
        if current is None:
            raise DarkpruneError(f"{path}:{number}: option '{raw.strip()}' appears before the first [section]")
        key, value = squeezed.split("=", 1)
        if not key:
            raise DarkpruneError(f"{path}:{number}: option '{raw.strip()}' has no key before '='")
        current.entries.append(Option(key, value, number, raw))
    if not sections:
        raise DarkpruneError(f"{path}: no [net] section and no layers: not a Darknet cfg")
    if sections[0].type != "net":
        raise DarkpruneError(f"{path}:{sections[0].line}: the first section must be [net] or [network], "
                             f"got [{sections[0].header}]")
    return Cfg(sections, preamble, path)


def read_cfg(path: str | os.PathLike) -> Cfg:
    path = str(path)
    data = read_input_bytes(path, "cfg", "expected a Darknet .cfg file")
    if b"\0" in data[:4096]:
        raise DarkpruneError(f"{path}: binary data, expected a Darknet .cfg text file (weights given as cfg?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return parse_cfg_text(text, path)


def write_cfg(cfg: Cfg, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    atomic_write_bytes(path, cfg.text().encode("ascii"), inputs)
