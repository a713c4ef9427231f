"""Helpers shared by the readers: text lines, JSON, split names from file names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsitr.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


def read_bytes(path: Path) -> bytes:
    """Read a file, turning OS errors into a :class:`DataError` naming the file."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=path) from e


def read_text(path: Path) -> str:
    """Read a UTF-8 text file (a byte-order mark is ignored).

    Raises:
        DataError: naming the file and line of the first byte that is not UTF-8.
    """
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text ({e.reason})", path=path, line=line) from e


def read_lines(path: Path) -> list[str]:
    r"""Return the lines of a text file without their terminators.

    ``\n`` and ``\r\n`` endings are both accepted. The newline that ends the last line does not
    start another (empty) line; any further blank lines at the end of the file are returned, so
    that the caller decides whether they are captions (see :func:`trailing_blank_count`).
    """
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def trailing_blank_count(lines: list[str]) -> int:
    """Number of blank (whitespace-only) lines at the end of ``lines``."""
    n = 0
    for ln in reversed(lines):
        if ln.strip():
            break
        n += 1
    return n


def read_json(path: Path) -> Any:
    """Parse a JSON file.

    Raises:
        DataError: naming the file and line of a syntax error.
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", path=path, line=e.lineno) from e


def first_char(path: Path) -> str:
    """The first non-whitespace character of a file ('' when empty or unreadable)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return chr(head[0]) if head else ""


def split_from_stem(path: Path) -> str | None:
    """The split named by a file name such as ``rsitmd_test.json`` (``None`` if none)."""
    last = path.stem.rsplit("_", 1)[-1].lower()
    return last if last in SPLIT_NAMES else None


def sibling_split_files(path: Path, suffix: str) -> list[tuple[str, Path]]:
    """Files beside ``path`` that differ only in the split suffix (``x_train.json``, ...).

    Returns ``[(split, file), ...]``; just ``path`` itself when its name names no split.
    """
    own = split_from_stem(path)
    if own is None:
        return []
    prefix = path.stem[: -len(own)]
    out = []
    for name in SPLIT_NAMES:
        p = path.with_name(f"{prefix}{name}{suffix}")
        if p.is_file():
            out.append((name, p))
    return out
