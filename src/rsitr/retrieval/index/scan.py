"""Listing an image archive: which files exist, their stat, and which shard owns them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rsitr.data.formats.folder import iter_image_files
from rsitr.errors import ConfigError, DataError

__all__ = ["FileStat", "ShardSpec", "scan_files"]


@dataclass(frozen=True)
class ShardSpec:
    """One part of a sharded build: the files whose path hashes to ``index`` modulo ``count``.

    The assignment depends only on the file's relative path, so machines that list the same
    archive agree on it without talking to each other, and a file keeps its shard when others
    are added or removed.

    Attributes:
        index: this shard, ``0 <= index < count``.
        count: the number of shards.

    Raises:
        ConfigError: if ``count < 1`` or ``index`` is out of range.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"--shard {self.index}/{self.count}: expected i/n with n >= 1 and 0 <= i < n")

    @classmethod
    def parse(cls, text: str | None) -> ShardSpec:
        """Parse ``"i/n"`` (``None`` or ``""``: the whole archive, ``0/1``).

        Raises:
            ConfigError: if the text is not ``i/n`` with integers in range.
        """
        if not text:
            return cls()
        parts = text.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4 (0-based shard i of n)")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def whole(self) -> bool:
        """True for the unsharded archive (``0/1``)."""
        return self.count == 1

    def owns(self, relpath: str) -> bool:
        """Whether this shard owns the file at POSIX ``relpath``."""
        if self.count == 1:
            return True
        digest = hashlib.blake2b(relpath.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


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


def scan_files(
    root: str | Path, shard: ShardSpec | None = None, files: Iterable[str | Path] | None = None
) -> list[FileStat]:
    """List the image files of an archive that a shard owns, sorted by relative path.

    Args:
        root: the archive folder (scanned recursively; hidden entries skipped).
        shard: keep only this shard's files; default the whole archive.
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
    shard = shard or ShardSpec()
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
        rel = p.relative_to(root).as_posix()
        if shard.owns(rel) and (st := _stat(root, p)) is not None:
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
