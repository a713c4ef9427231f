"""The toolkit's one whole-file hash: streamed, and memoised only while the file is unchanged."""

from __future__ import annotations

import hashlib
import os

from rsitr.hashing import file_sha256, file_sha256_memo


def test_file_sha256_streams_past_one_chunk(tmp_path) -> None:
    data = os.urandom((1 << 20) + 123)  # one full 1 MiB chunk and a partial one
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_memoised_hash_follows_a_rewritten_file(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    assert file_sha256_memo(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")  # a new size (and mtime) invalidates the memo
    assert file_sha256_memo(path) == hashlib.sha256(b"second, longer").hexdigest()
