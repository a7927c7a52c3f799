"""Darknet dataset files: ``.data``, ``.names``, image lists and labels, read the way Darknet reads them.

Public API
----------
``load_data(data_path, split="valid", limit=None, kind=None) -> Dataset``
    Read a Darknet ``.data`` file and everything it points to: the image list of ``split`` ("valid" or "train"),
    the class names and, per image, the ground truth (detection boxes or a classification label).
``Dataset``
    ``image_paths`` (absolute paths), ``kind`` ("detection" | "classification"), ``names``, ``classes``,
    ``boxes`` (detection: per image a float32 array (k, 5) of rows ``class, cx, cy, w, h``, normalised to 0..1),
    ``labels`` (classification: int64 array (N,), -1 where no label name matched the path), ``source`` (the
    ``.data`` path), ``split``, ``label_paths``, ``missing_labels``, ``bad_rows``, ``top``, ``config``.
``read_data_config(path) -> dict``            key=value pairs of a ``.data`` file (first occurrence of a key wins).
``read_names(path) -> list[str]``             one name a line (``.names`` / ``labels`` files).
``read_image_list(list_path, bases) -> list`` image paths resolved as Darknet would, with fallbacks.
``label_path_candidates(image_path)``         where Darknet's rule looks for an image's ``.txt`` label file.
``read_detection_labels(path, classes)``      rows ``class cx cy w h``; bad rows warned (``FILE:LINE: what``), skipped.
``classification_label(path, labels)``        Darknet's rule: the label name that occurs in the image path.

Path resolution: Darknet opens every relative path relative to the current directory. We try that first, then the
folder of the ``.data`` file and, for the entries of an image list, the folder of the list file (so a dataset folder
can be used from anywhere).

Label files follow Darknet's rule: in the image path ``/images/`` -> ``/labels/`` (first occurrence, as Darknet's
``find_replace`` does; the last occurrence is tried next), ``/JPEGImages/`` -> ``/labels/``, the image extension ->
``.txt``; then, as AlexeyAB's custom-dataset layout has it, the ``.txt`` beside the image. A missing label file means
an image without objects (counted in ``Dataset.missing_labels`` and summarised in one warning).

Problems with single rows or files are reported as ``DataWarning`` (a ``UserWarning``) with messages
``FILE:LINE: what``; problems that make the dataset unusable raise ``DarkpruneError`` naming the file.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from darkprune.errors import DarkpruneError
from darkprune.util.textio import read_input_bytes

__all__ = [
    "DataWarning",
    "Dataset",
    "load_data",
    "read_data_config",
    "read_names",
    "read_image_list",
    "resolve_path",
    "label_path_candidates",
    "find_label_file",
    "read_detection_labels",
    "classification_label",
]

# Beyond this many row-level warnings per load, the rest are only counted in the summary warning.
MAX_ROW_WARNINGS = 50


class DataWarning(UserWarning):
    """A dataset problem that is skipped, not fatal: a bad label row, a missing image or label file."""


class _WarningBudget:
    """Emits at most ``limit`` row-level warnings, counting the rest for one closing summary."""

    def __init__(self, limit: int = MAX_ROW_WARNINGS, stacklevel: int = 3):
        self.limit = limit
        self.stacklevel = stacklevel  # 3: the warning names the caller of the function that holds the budget
        self.emitted = 0
        self.suppressed = 0

    def warn(self, message: str) -> None:
        if self.emitted < self.limit:
            warnings.warn(message, DataWarning, stacklevel=self.stacklevel)
            self.emitted += 1
        else:
            self.suppressed += 1

    def finish(self, what: str) -> None:
        if self.suppressed:
            warnings.warn(f"{self.suppressed} more {what} not shown", DataWarning, stacklevel=self.stacklevel)


@dataclass
class Dataset:
    """Images and their ground truth, as one split of a Darknet ``.data`` file describes them.

    Detection: ``boxes[i]`` is a float32 array (k, 5) of ``class, cx, cy, w, h`` (normalised, Darknet's label rows).
    Classification: ``labels[i]`` is the class index (-1 if no label name occurs in the path).
    """

    image_paths: list[str]
    kind: str
    names: list[str]
    classes: int
    boxes: list[np.ndarray] | None = None
    labels: np.ndarray | None = None
    source: str | None = None
    split: str = "valid"
    label_paths: list[str | None] = field(default_factory=list)
    missing_labels: int = 0
    bad_rows: int = 0
    top: int = 5
    config: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_boxes(self) -> int:
        """Total ground-truth boxes (detection datasets; 0 otherwise)."""
        return sum(len(b) for b in self.boxes) if self.boxes is not None else 0

    def subset(self, indices: Iterable[int]) -> "Dataset":
        """A new Dataset holding only the images at ``indices`` (in that order)."""
        idx = list(indices)
        label_paths = [self.label_paths[i] for i in idx] if self.label_paths else []
        return Dataset(
            image_paths=[self.image_paths[i] for i in idx],
            kind=self.kind,
            names=list(self.names),
            classes=self.classes,
            boxes=[self.boxes[i] for i in idx] if self.boxes is not None else None,
            labels=self.labels[idx] if self.labels is not None else None,
            source=self.source,
            split=self.split,
            label_paths=label_paths,
            missing_labels=sum(1 for p in label_paths if p is None),
            bad_rows=self.bad_rows,
            top=self.top,
            config=dict(self.config),
        )


# ----------------------------------------------------------------------------------------------------------------
# .data / .names / lists


def _read_text_lines(path: Path) -> list[str]:
    """The file's lines without line endings; UTF-8 (BOM tolerated), falling back to Latin-1 for odd bytes."""
    raw = read_input_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.splitlines()


def _strip_inline_comment(value: str) -> str:
    """``key = value  # note`` -> ``value``: only a ``#`` after whitespace starts a comment (paths may hold ``#``)."""
    for i, ch in enumerate(value):
        if ch == "#" and i > 0 and value[i - 1] in " \t":
            return value[:i].rstrip()
    return value


def read_data_config(path: str | os.PathLike) -> dict[str, str]:
    """Key/value pairs of a Darknet ``.data`` file.

    Lines are ``key=value``; blank lines and lines starting with ``#`` or ``;`` are skipped, spaces around keys and
    values are ignored, a `` #`` starts a trailing comment. As in Darknet's ``option_find`` the first occurrence of a
    key wins (later ones are warned about). A line without ``=`` is warned about and skipped.
    """
    path = Path(path)
    options: dict[str, str] = {}
    for number, line in enumerate(_read_text_lines(path), start=1):
        text = line.strip()
        if not text or text[0] in "#;":
            continue
        if "=" not in text:
            warnings.warn(f"{path}:{number}: not a key=value line, skipped: {text!r}", DataWarning, stacklevel=2)
            continue
        key, value = text.split("=", 1)
        key = key.strip()
        value = _strip_inline_comment(value.strip())
        if not key:
            warnings.warn(f"{path}:{number}: empty key, skipped", DataWarning, stacklevel=2)
            continue
        if key in options:
            warnings.warn(f"{path}:{number}: duplicate key {key!r} ignored (Darknet uses the first)", DataWarning,
                          stacklevel=2)
            continue
        options[key] = value
    return options


def read_names(path: str | os.PathLike) -> list[str]:
    """Class names, one a line (Darknet's ``get_labels``); trailing blank lines are dropped, inner ones kept."""
    path = Path(path)
    names = [line.strip() for line in _read_text_lines(path)]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DarkpruneError(f"{path}: no names in the file")
    return names


def resolve_path(raw: str, bases: Sequence[Path]) -> Path | None:
    """``raw`` as an existing absolute path: as given (relative to the current folder), else relative to each base."""
    candidate = Path(raw).expanduser()
    if candidate.exists():
        return _absolute(candidate)
    if candidate.is_absolute():
        return None
    for base in bases:
        joined = base / candidate
        if joined.exists():
            return _absolute(joined)
    return None


def _absolute(path: Path) -> Path:
    """Absolute and normalised, without resolving symlinks (labels/ may sit beside a symlinked images/)."""
    return Path(os.path.abspath(path))


def read_image_list(list_path: str | os.PathLike, bases: Sequence[Path] = (),
                    limit: int | None = None) -> tuple[list[str], int]:
    """Image paths listed in ``list_path``, one a line, resolved by :func:`resolve_path`.

    Bases tried after the current directory: ``bases`` and then the list file's own folder. Blank lines and lines
    starting with ``#`` are skipped. Entries that exist nowhere are warned about (``LIST:LINE``) and skipped.
    Returns ``(paths, missing_count)``; at most ``limit`` entries are read (``None`` = all).
    Raises DarkpruneError when the list names no image at all.
    """
    paths, _, missing = _read_image_list(list_path, bases, limit)
    return paths, missing


def _read_image_list(list_path: str | os.PathLike, bases: Sequence[Path] = (),
                     limit: int | None = None) -> tuple[list[str], list[str], int]:
    list_path = Path(list_path)
    search = list(bases) + [_absolute(list_path).parent]
    paths: list[str] = []
    entries: list[str] = []
    missing = 0
    budget = _WarningBudget()
    for number, line in enumerate(_read_text_lines(list_path), start=1):
        if limit is not None and len(paths) >= limit:
            break
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        found = resolve_path(entry, search)
        if found is None or not found.is_file():
            missing += 1
            budget.warn(f"{list_path}:{number}: image not found: {entry}")
            continue
        paths.append(str(found))
        entries.append(entry)
    budget.finish("missing images")
    if not paths:
        if missing:
            raise DarkpruneError(f"{list_path}: none of the {missing} listed images exists")
        raise DarkpruneError(f"{list_path}: the image list is empty")
    return paths, entries, missing


# ----------------------------------------------------------------------------------------------------------------
# labels


def _replace_segment(path: str, old: str, new: str, last: bool = False) -> str:
    index = path.rfind(old) if last else path.find(old)
    if index < 0:
        return path
    return path[:index] + new + path[index + len(old):]


def _with_txt_extension(path: str) -> str:
    slash = path.rfind("/")
    dot = path.rfind(".")
    if dot > slash + 1:  # an extension, not a dot-file
        return path[:dot] + ".txt"
    return path + ".txt"


def label_path_candidates(image_path: str) -> list[str]:
    """Where Darknet's rule (and its common variants) look for the label file of ``image_path``, in order."""
    posix = str(image_path).replace("\\", "/")
    candidates = []
    first = _replace_segment(_replace_segment(posix, "/images/", "/labels/"), "/JPEGImages/", "/labels/")
    candidates.append(_with_txt_extension(first))
    last = _replace_segment(_replace_segment(posix, "/images/", "/labels/", last=True),
                            "/JPEGImages/", "/labels/", last=True)
    candidates.append(_with_txt_extension(last))
    candidates.append(_with_txt_extension(posix))  # AlexeyAB's layout: the .txt beside the image
    unique: list[str] = []
    for c in candidates:
        if c != posix and c not in unique:
            unique.append(c)
    return unique


def find_label_file(image_path: str) -> str | None:
    """The first existing label file among :func:`label_path_candidates`, or None."""
    for candidate in label_path_candidates(image_path):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_detection_labels(path: str | os.PathLike, classes: int | None = None,
                          budget: _WarningBudget | None = None) -> tuple[np.ndarray, int]:
    """Rows ``class cx cy w h`` of a Darknet label file as a float32 array (k, 5), and the count of rows skipped.

    A row is skipped, with a warning ``FILE:LINE: what``, when it has not exactly 5 columns, a value is not a number
    or not finite, the class is not an integer in ``0..classes-1``, the centre lies outside the image (0..1), or the
    width or height is not in (0, 1]. Blank lines are ignored.
    """
    path = Path(path)
    budget = budget or _WarningBudget()
    rows: list[tuple[float, float, float, float, float]] = []
    bad = 0
    for number, line in enumerate(_read_text_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = _check_label_row(fields, classes)
        if problem:
            bad += 1
            budget.warn(f"{path}:{number}: {problem}, row skipped")
            continue
        rows.append(tuple(float(v) for v in fields))  # type: ignore[arg-type]
    if not rows:
        return np.zeros((0, 5), np.float32), bad
    return np.asarray(rows, np.float32), bad


def _check_label_row(fields: list[str], classes: int | None) -> str | None:
    if len(fields) != 5:
        return f"expected 5 columns (class cx cy w h), found {len(fields)}"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return f"not a number in {' '.join(fields)!r}"
    if not all(math.isfinite(v) for v in values):
        return f"non-finite value in {' '.join(fields)!r}"
    cls, cx, cy, w, h = values
    if not cls.is_integer() or cls < 0 or (classes is not None and cls >= classes):
        limit = f"0..{classes - 1}" if classes is not None else "a non-negative integer"
        return f"class {fields[0]} out of range (expected {limit})"
    if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
        return f"box centre ({cx:g}, {cy:g}) outside the image"
    if not (0.0 < w <= 1.0 and 0.0 < h <= 1.0):
        return f"box size ({w:g} x {h:g}) not in (0, 1]"
    return None


def classification_label(path: str, labels: Sequence[str]) -> tuple[int, list[int]]:
    """Darknet's classifier rule: the index of the label name that occurs in ``path``.

    Darknet takes the first label (in the labels file's order) that is a substring of the path. When several match,
    one that occurs in the file name alone decides if it is unique (a folder name such as ``/home/cat/`` then does
    not outvote ``dog_12.png``). Returns ``(index or -1, all matching indices)``.
    """
    matches = [i for i, name in enumerate(labels) if name and name in path]
    if len(matches) == 1:
        return matches[0], matches
    if len(matches) > 1:
        basename = os.path.basename(path)
        in_name = [i for i in matches if labels[i] in basename]
        if len(in_name) == 1:
            return in_name[0], matches
        return matches[0], matches
    return -1, matches


# ----------------------------------------------------------------------------------------------------------------
# the whole dataset


def _config_path(options: dict[str, str], key: str, data_path: Path) -> Path:
    """Resolve a file named by ``key`` in the .data file (current directory first, then the .data folder)."""
    raw = options[key]
    found = resolve_path(raw, [_absolute(data_path).parent])
    if found is None:
        raise DarkpruneError(f"{data_path}: {key}={raw}: no such file")
    return found


def load_data(data_path: str | os.PathLike, split: str = "valid", limit: int | None = None,
              kind: str | None = None) -> Dataset:
    """Load one split of a Darknet dataset described by a ``.data`` file.

    ``split``: "valid" (falls back to ``train`` with a warning when the file has no ``valid`` key, as Darknet does)
    or "train". ``limit``: read only the first N images of the list. ``kind``: "detection" or "classification";
    by default classification when the file has a ``labels`` key, detection otherwise.
    Raises DarkpruneError (naming the file) for a missing ``.data``/list/names/labels file or an empty list.
    """
    data_path = Path(data_path)
    if split not in ("valid", "train"):
        raise DarkpruneError(f"split must be 'valid' or 'train', not {split!r}")
    if limit is not None and limit <= 0:
        raise DarkpruneError(f"limit must be a positive number of images, not {limit}")
    if not data_path.exists():
        raise DarkpruneError(f"{data_path}: no such file")
    options = read_data_config(data_path)
    data_dir = _absolute(data_path).parent
    list_path = _config_path(options, _list_key(options, split, data_path), data_path)

    if kind is None:
        kind = "classification" if "labels" in options else "detection"
    if kind not in ("detection", "classification"):
        raise DarkpruneError(f"kind must be 'detection' or 'classification', not {kind!r}")
    names, classes, label_names = _class_names(options, kind, data_path)

    image_paths, entries, _ = _read_image_list(list_path, bases=[data_dir], limit=limit)
    top = _parse_int(options.get("top", "5"), 5)
    if kind == "classification":
        labels = _classification_labels(image_paths, entries, label_names, list_path)
        return Dataset(image_paths=image_paths, kind=kind, names=names, classes=classes, labels=labels,
                       source=str(data_path), split=split, top=top, config=options)
    boxes, label_paths, missing, bad_rows = _detection_labels(image_paths, classes, list_path)
    return Dataset(image_paths=image_paths, kind=kind, names=names, classes=classes, boxes=boxes,
                   source=str(data_path), split=split, label_paths=label_paths, missing_labels=missing,
                   bad_rows=bad_rows, top=top, config=options)


# The helpers below warn with stacklevel=3 (their budgets with 4): the warnings point where they did when this code
# was inline in load_data.

def _list_key(options: dict[str, str], split: str, data_path: Path) -> str:
    """The .data key naming the split's image list ("valid" falls back to "train", as in Darknet)."""
    if split in options:
        return split
    if split == "valid" and "train" in options:
        warnings.warn(f"{data_path}: no 'valid' key, evaluating on the 'train' list", DataWarning, stacklevel=3)
        return "train"
    raise DarkpruneError(f"{data_path}: no '{split}' key naming an image list")


def _class_names(options: dict[str, str], kind: str,
                 data_path: Path) -> tuple[list[str], int, list[str] | None]:
    """(names, classes, label names of a classification set or None) from the names/labels/classes keys."""
    classes = _parse_classes(options, data_path)
    label_names: list[str] | None = None
    if kind == "classification":
        if "labels" not in options:
            raise DarkpruneError(f"{data_path}: a classification dataset needs a 'labels' key")
        label_names = read_names(_config_path(options, "labels", data_path))
    if "names" in options:
        names = read_names(_config_path(options, "names", data_path))
    elif label_names is not None:
        names = list(label_names)
    elif classes is not None:
        names = [str(i) for i in range(classes)]
    else:
        raise DarkpruneError(f"{data_path}: needs 'classes' or 'names'")
    if classes is None:
        classes = len(label_names) if label_names is not None else len(names)
    if len(names) != classes:
        warnings.warn(f"{data_path}: classes={classes} but {len(names)} names", DataWarning, stacklevel=3)
        names = (names + [str(i) for i in range(len(names), classes)])[:classes]
    return names, classes, label_names


def _classification_labels(image_paths: list[str], entries: list[str], label_names: list[str],
                           list_path: Path) -> np.ndarray:
    """Each image's class index (-1 when no label name occurs in its path), warning about unlabelled/ambiguous."""
    labels = np.empty(len(image_paths), np.int64)
    budget = _WarningBudget(stacklevel=4)
    unlabelled = 0
    for i, (path, entry) in enumerate(zip(image_paths, entries)):
        # Darknet matches the path as the list gives it (not our absolute path, with more folder names in it).
        index, matches = classification_label(entry, label_names)
        labels[i] = index
        if index < 0:
            unlabelled += 1
            budget.warn(f"{path}: no label name from the labels file occurs in the path")
        elif len(matches) > 1:
            budget.warn(f"{path}: several label names occur in the path "
                        f"({', '.join(label_names[m] for m in matches)}); using {label_names[index]}")
    budget.finish("label warnings")
    if unlabelled:
        warnings.warn(f"{list_path}: {unlabelled} of {len(image_paths)} images have no label", DataWarning,
                      stacklevel=3)
    return labels


def _detection_labels(image_paths: list[str], classes: int,
                      list_path: Path) -> tuple[list[np.ndarray], list[str | None], int, int]:
    """(boxes per image, label file per image or None, images without a label file, bad label rows)."""
    boxes: list[np.ndarray] = []
    label_paths: list[str | None] = []
    missing = 0
    bad_rows = 0
    budget = _WarningBudget(stacklevel=4)
    for path in image_paths:
        label_file = find_label_file(path)
        label_paths.append(label_file)
        if label_file is None:
            missing += 1
            boxes.append(np.zeros((0, 5), np.float32))
            continue
        rows, bad = read_detection_labels(label_file, classes, budget)
        bad_rows += bad
        boxes.append(rows)
    budget.finish("bad label rows")
    if missing:
        warnings.warn(f"{list_path}: {missing} of {len(image_paths)} images have no label file "
                      f"(counted as images without objects)", DataWarning, stacklevel=3)
    return boxes, label_paths, missing, bad_rows


def _parse_int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _parse_classes(options: dict[str, str], data_path: Path) -> int | None:
    if "classes" not in options:
        return None
    try:
        classes = int(options["classes"])
    except ValueError:
        raise DarkpruneError(f"{data_path}: classes={options['classes']} is not a whole number") from None
    if classes <= 0:
        raise DarkpruneError(f"{data_path}: classes={classes} must be positive")
    return classes
