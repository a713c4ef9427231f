"""Checkpoint identity: what an index remembers about the model that embedded it.

Vectors from two different checkpoints live in different spaces, so an index records the
identity of the checkpoint it was built with (the model file's metadata and its SHA-256) and
refuses to be searched or extended with any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsitr.errors import ConfigError, DataError
from rsitr.hashing import file_sha256
from rsitr.models.checkpoint import MODEL_FILE, read_metadata

__all__ = ["IDENTITY_KEYS", "IndexMismatchError", "check_identity", "checkpoint_identity"]

#: Metadata keys of a checkpoint that, with its SHA-256, identify the embedding space.
IDENTITY_KEYS = ("method", "config", "image_encoder", "text_encoder")


class IndexMismatchError(ConfigError):
    """The checkpoint does not match the one an index was built with."""


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """The identity of a checkpoint.

    Args:
        path: ``model.safetensors`` or the checkpoint folder holding it.

    Returns:
        ``{"method", "config", "image_encoder", "text_encoder", "sha256", "path"}``: the
        checkpoint's metadata values (as stored, JSON strings decoded), the SHA-256 of the model
        file and its resolved path (informative only; never compared).

    Raises:
        DataError: if the checkpoint file is missing.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_FILE
    if not file.is_file():
        raise DataError("no such checkpoint (expected a model.safetensors file or its folder)", path=file)
    meta = read_metadata(file)
    ident: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        value = meta.get(key)
        try:
            ident[key] = json.loads(value) if key != "method" and value is not None else value
        except json.JSONDecodeError:
            ident[key] = value
    ident["sha256"] = file_sha256(file)
    ident["path"] = str(file.resolve())
    return ident


def describe(identity: dict[str, Any]) -> str:
    """A short human description: ``dual (tiny-cnn + tiny-text, sha256 1a2b3c4d5e6f)``."""

    def enc(key: str) -> str:
        value = identity.get(key)
        return str(value.get("name", "?")) if isinstance(value, dict) else "?"

    sha = str(identity.get("sha256", ""))[:12] or "?"
    return f"{identity.get('method', '?')} ({enc('image_encoder')} + {enc('text_encoder')}, sha256 {sha})"


def same_identity(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two identities denote the same embedding space (path is ignored)."""
    return all(a.get(k) == b.get(k) for k in (*IDENTITY_KEYS, "sha256"))


def check_identity(stored: dict[str, Any], actual: dict[str, Any], index_dir: str | Path) -> None:
    """Refuse a checkpoint that differs from the one the index was built with.

    Args:
        stored: the identity recorded in the index.
        actual: the identity of the checkpoint offered now.
        index_dir: the index folder (for the message).

    Raises:
        IndexMismatchError: with a one-line message naming both checkpoints and the fix.
    """
    if same_identity(stored, actual):
        return
    raise IndexMismatchError(
        f"{index_dir}: checkpoint mismatch: the index was built with {describe(stored)} "
        f"from {stored.get('path', '?')}, but {actual.get('path', '?')} is {describe(actual)}; "
        "use the checkpoint the index was built with, or build a new index with this one"
    )
