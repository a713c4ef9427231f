"""Listing an image archive: which files exist, and their stat."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rsitr.data.formats.folder import iter_image_files
from rsitr.errors import DataError

__all__ = ["FileStat", "scan_files"]


@dataclass(frozen=True)
class FileStat:
    """An image file of the archive as listed by a scan.

    Attributes:
        relpath: POSIX path relative to the archive root (the key in the index).
        size: size in bytes.
        mtime_ns: modification time in nanoseconds.
    """

    relpath: str
    size: int
    mtime_ns: int


def _stat(root: Path, path: Path) -> FileStat | None:
    try:
        st = path.stat()
    except OSError:  # vanished between listing and stat
        return None
    return FileStat(path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)


def scan_files(root: str | Path, files: Iterable[str | Path] | None = None) -> list[FileStat]:
    """List the image files of an archive, sorted by relative path.

    Args:
        root: the archive folder (scanned recursively; hidden entries skipped).
        files: index exactly these files instead of scanning (paths as usual: absolute or
            relative to the working directory); each must lie inside ``root``.

    Returns:
        One :class:`FileStat` per file (files that vanish during the scan are left out).

    Raises:
        DataError: if ``root`` is not a folder, or a listed file is missing or outside it.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError("not a folder of images", path=root)
    if files is None:
        paths = iter_image_files(root)
    else:
        paths = []
        for f in files:
            p = Path(f).resolve()
            if not p.is_relative_to(root):
                raise DataError(f"file is outside the archive root {root}", path=p)
            if not p.is_file():
                raise DataError("no such image file", path=p)
            paths.append(p)
    out = []
    for p in paths:
        if (st := _stat(root, p)) is not None:
            out.append(st)
    out.sort(key=lambda s: s.relpath)
    return out


def resolve_in_root(root: Path, relpath: str) -> Path:
    """The file of ``relpath`` under ``root``; never a path outside it.

    Raises:
        DataError: if ``relpath`` escapes ``root`` (an absolute path or ``..``).
    """
    p = (root / relpath).resolve()
    if not p.is_relative_to(root.resolve()) or os.path.isabs(relpath):
        raise DataError("path escapes the archive root", path=relpath)
    return p
