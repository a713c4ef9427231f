"""Content hashes of files: the one place the toolkit reads a whole file to hash it.

``file_sha256`` streams a file once (index ids, feature-cache keys); ``file_sha256_memo`` memoises
that on (path, size, mtime) for files hashed again and again in one process (weights files).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["file_sha256", "file_sha256_memo"]

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=32)
def _memo(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def file_sha256_memo(path: str | Path) -> str:
    """``file_sha256``, memoised on the resolved path, size and mtime (a rewritten file is re-read)."""
    st = os.stat(path)
    return _memo(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
