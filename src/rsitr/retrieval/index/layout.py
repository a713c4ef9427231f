"""The files of an index folder, its manifest, and the writer's lock.

An index folder holds::

    index.json            the manifest: format, generation, checkpoint identity, root, vectors
    meta.sqlite           metadata rows, vectors and failures (see rsitr.retrieval.index.store)
    vectors-<gen>.faiss   the published FAISS file of generation <gen>
    build_report.json     what the last build did, unreadable files included
    .lock                 held (flock) by the process writing the index

The manifest is the commit point: it is replaced atomically (temporary file, fsync, rename)
after everything it refers to is on disk, so readers always see a complete generation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rsitr import __version__
from rsitr.errors import ConfigError, DataError
from rsitr.retrieval.index.vectors import fsync_dir

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "IndexLock",
    "Manifest",
    "read_manifest",
    "vectors_file",
    "write_json_atomic",
    "write_manifest",
]

FORMAT = "rsitr-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "index.json"
REPORT_FILE = "build_report.json"
LOCK_FILE = ".lock"


def vectors_file(generation: int) -> str:
    """The FAISS file name of a generation."""
    return f"vectors-{generation:06d}.faiss"


@dataclass
class Manifest:
    """The published state of an index.

    Attributes:
        generation: the published generation (1 after the first build).
        identity: the checkpoint identity (see :func:`checkpoint_identity`).
        root: absolute path of the archive root the relative paths refer to.
        dim: embedding dimension.
        count: vectors in the published FAISS file.
        vectors: the FAISS file name and its description (``kind``, ``factory``, ``params``).
        vector_config: the :class:`VectorIndexConfig` it was built with (as a dict).
        failures: unreadable files at the last build.
        updated: ISO time of publication.
        format: always ``"rsitr-index"``.
        version: manifest format version.
        rsitr_version: the rsitr version that wrote it.
    """

    generation: int
    identity: dict[str, Any]
    root: str
    dim: int
    count: int
    vectors: dict[str, Any] = field(default_factory=dict)
    vector_config: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    updated: str = ""
    format: str = FORMAT
    version: int = FORMAT_VERSION
    rsitr_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Publish ``manifest`` (atomically) in ``directory``."""
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(directory / MANIFEST_FILE, manifest.to_dict())


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of an index folder, or ``None`` when nothing was published yet.

    Raises:
        DataError: if the manifest exists but is not an rsitr index manifest of a known version.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"unreadable index manifest: {e}", path=path) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError("not an rsitr index manifest", path=path, field="format")
    if data.get("version") != FORMAT_VERSION:
        raise DataError(
            f"index format version {data.get('version')}; this rsitr reads {FORMAT_VERSION}",
            path=path,
            field="version",
        )
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


class IndexLock:
    """An exclusive, non-blocking lock on an index folder for the process writing it.

    It is an ``flock`` on ``.lock``, so the operating system releases it when the process
    dies: an interrupted build never leaves a stale lock behind.

    Args:
        directory: the index folder (must exist).

    Raises:
        ConfigError: on enter, if another process holds the lock.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> IndexLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
            pass
        except OSError as e:
            os.close(self._fd)
            self._fd = None
            raise ConfigError(
                f"{self.path.parent}: another process is writing this index; wait for it to finish"
            ) from e
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
