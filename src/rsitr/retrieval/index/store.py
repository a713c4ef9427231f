"""The SQLite side of an index: one row per image file, its vector, and the failed files.

Rows carry the generation that added them (``added_gen``) and, once the file is gone or has
changed, the generation that removed them (``removed_gen``). A published FAISS file of
generation ``G`` holds exactly the rows with ``added_gen <= G`` and ``removed_gen`` NULL or
``> G``, so a build in progress (generation ``G + 1``) never disturbs what searches see: rows are
only deleted after the new generation is published. Vectors are kept here as float32 blobs,
the source from which the FAISS file is (re)built; they are written in the same transaction as
their row, which makes a build resumable batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsitr.errors import DataError

__all__ = ["DB_FILE", "ImageMetadata", "LiveRow", "MetadataStore", "image_id"]

DB_FILE = "meta.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    crs TEXT,
    min_x REAL, min_y REAL, max_x REAL, max_y REAL,
    transform TEXT,
    lon_min REAL, lat_min REAL, lon_max REAL, lat_max REAL,
    footprint TEXT,
    acquired TEXT,
    added_gen INTEGER NOT NULL,
    removed_gen INTEGER
);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
CREATE INDEX IF NOT EXISTS images_removed ON images(removed_gen);
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, vec BLOB NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS footprint_boxes USING rtree(id, lon_min, lon_max, lat_min, lat_max);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    error TEXT NOT NULL
);
"""

_META_COLS = (
    "id, path, size, mtime_ns, sha256, width, height, crs, min_x, min_y, max_x, max_y, transform, "
    "lon_min, lat_min, lon_max, lat_max, footprint, acquired"
)
#: Columns added after the first schema: an older database gets them on its next write-open.
_ADDED_COLS = {
    "lon_min": "REAL", "lat_min": "REAL", "lon_max": "REAL", "lat_max": "REAL",
    "footprint": "TEXT", "acquired": "TEXT",
}  # fmt: skip


def image_id(relpath: str, sha256: str) -> int:
    """The id of an image in every index: 63 bits of BLAKE2b over its path and content hash.

    It depends on nothing but the file, so every worker of a distributed build assigns the same
    id without coordination, builds in any order agree, and an id stays valid until the file's
    content changes. (JSON clients in JavaScript should treat it as a string: it can exceed 2^53.)
    """
    digest = hashlib.blake2b(f"{relpath}\0{sha256}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1 or 1


@dataclass(frozen=True)
class ImageMetadata:
    """What the index knows about one image file.

    Attributes:
        relpath: POSIX path relative to the archive root.
        size: file size in bytes.
        mtime_ns: modification time (ns) when it was indexed.
        sha256: hex SHA-256 of the file content.
        width: stored width in pixels (``None`` if unknown).
        height: stored height in pixels.
        crs: ``"EPSG:<code>"`` of a GeoTIFF, else ``None``.
        bounds: ``(min_x, min_y, max_x, max_y)`` in CRS units for a GeoTIFF, else ``None``.
        transform: affine ``(a, b, c, d, e, f)`` of a GeoTIFF (rasterio convention), else ``None``.
        lonlat_bounds: ``(west, south, east, north)`` of the footprint in EPSG:4326 (``west >
            east`` across the antimeridian), else ``None``.
        footprint: the footprint ring in EPSG:4326 (unwrapped; see
            :mod:`rsitr.data.footprints`), else ``None``.
        acquired: acquisition time (ISO 8601) from the file's date tag, else ``None``.
    """

    relpath: str
    size: int
    mtime_ns: int
    sha256: str
    width: int | None = None
    height: int | None = None
    crs: str | None = None
    bounds: tuple[float, float, float, float] | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    lonlat_bounds: tuple[float, float, float, float] | None = None
    footprint: tuple[tuple[float, float], ...] | None = None
    acquired: str | None = None

    @property
    def id(self) -> int:
        """The image's id (see :func:`image_id`)."""
        return image_id(self.relpath, self.sha256)

    @property
    def georeferenced(self) -> bool:
        """Whether the image has a footprint on the map."""
        return self.footprint is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        for k in ("bounds", "transform", "lonlat_bounds"):
            if d[k] is not None:
                d[k] = list(d[k])
        if d["footprint"] is not None:
            d["footprint"] = [list(p) for p in d["footprint"]]
        return d


@dataclass(frozen=True)
class LiveRow:
    """A row not (yet) removed: what an incremental build compares the archive with.

    Attributes:
        id: row id (the FAISS id).
        size: size in bytes when indexed.
        mtime_ns: modification time when indexed.
        sha256: content hash when indexed.
        added_gen: the generation that added it.
    """

    id: int
    size: int
    mtime_ns: int
    sha256: str
    added_gen: int


def ring_to_json(ring: Sequence[Sequence[float]] | None) -> str | None:
    """A footprint ring as stored: JSON ``[[lon, lat], …]`` (9 decimals, about 0.1 mm)."""
    return None if ring is None else json.dumps([[round(x, 9), round(y, 9)] for x, y in ring])


def ring_from_json(text: str | None) -> tuple[tuple[float, float], ...] | None:
    """The ring stored by :func:`ring_to_json`."""
    return None if text is None else tuple((float(x), float(y)) for x, y in json.loads(text))


def _meta_from_row(r: Sequence[Any]) -> ImageMetadata:
    bounds = None if r[8] is None else (float(r[8]), float(r[9]), float(r[10]), float(r[11]))
    transform = None if r[12] is None else tuple(json.loads(r[12]))
    lonlat = None if r[13] is None else (float(r[13]), float(r[14]), float(r[15]), float(r[16]))
    footprint = ring_from_json(r[17])
    return ImageMetadata(
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        r[7],
        bounds,
        transform,
        lonlat,
        footprint,
        r[18],  # type: ignore[arg-type]
    )


def _row_values(m: ImageMetadata) -> tuple[Any, ...]:
    b = m.bounds or (None, None, None, None)
    ll = m.lonlat_bounds or (None, None, None, None)
    return (
        m.relpath, m.size, m.mtime_ns, m.sha256, m.width, m.height, m.crs, *b,
        None if m.transform is None else json.dumps(list(m.transform)), *ll,
        ring_to_json(m.footprint),
        m.acquired,
    )  # fmt: skip


class MetadataStore:
    """An index's SQLite database (WAL journal, full sync: a crash loses at most the batch
    being written and never corrupts the file).

    Every method takes an internal lock, so one store can serve several threads.

    Args:
        path: the database file.
        readonly: open for reading only (search, service); the file must exist.

    Raises:
        DataError: if ``readonly`` and the file is missing, or the file is not an index database
            of a known schema version.
    """

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.path.is_file():
                raise DataError("index database not found", path=self.path)
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(images)")}
            for col, kind in _ADDED_COLS.items():
                if col not in have:
                    self._db.execute(f"ALTER TABLE images ADD COLUMN {col} {kind}")
                    self.set_info("needs_footprints", True)  # rows indexed before the columns
            if self._db.execute("SELECT COUNT(*) FROM footprint_boxes").fetchone()[0] == 0:
                self._db.execute(  # an index written before the R*Tree: fill it from its rows
                    "INSERT INTO footprint_boxes SELECT id, lon_min, "
                    "CASE WHEN lon_min > lon_max THEN lon_max + 360 ELSE lon_max END, lat_min, lat_max "
                    "FROM images WHERE lon_min IS NOT NULL"
                )
            if self.get_info("schema_version") is None:
                self.set_info("schema_version", SCHEMA_VERSION)
        try:
            version = self.get_info("schema_version")
        except sqlite3.DatabaseError as e:
            raise DataError(f"not an index database: {e}", path=self.path) from e
        if version != SCHEMA_VERSION:
            raise DataError(
                f"index schema version {version}; this rsitr reads {SCHEMA_VERSION}", path=self.path
            )
        if readonly:
            with self._lock:
                have = {r[1] for r in self._db.execute("PRAGMA table_info(images)")}
                have |= {
                    r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
            if not {*_ADDED_COLS, "footprint_boxes"} <= have:
                raise DataError(
                    "index written by an older rsitr (no footprint columns): run 'rsitr index build' "
                    "on it once to upgrade it",
                    path=self.path,
                )

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: all of them are committed, or none (on an exception or a crash)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- key/value info -----------------------------------------------------------------------
    def get_info(self, key: str, default: Any = None) -> Any:
        """A JSON value stored under ``key`` (``default`` when absent)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_info(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    # -- rows ---------------------------------------------------------------------------------
    def live_rows(self) -> dict[str, LiveRow]:
        """Rows not removed (published or pending), keyed by relative path."""
        with self._lock:
            cur = self._db.execute(
                "SELECT path, id, size, mtime_ns, sha256, added_gen FROM images WHERE removed_gen IS NULL"
            )
            return {r[0]: LiveRow(*r[1:]) for r in cur}

    def add_images(self, items: Sequence[ImageMetadata], vectors: np.ndarray, gen: int) -> list[int]:
        """Insert rows and their (N, D) float32 vectors under their :func:`image_id`; returns the ids.

        A row with the same id (the same path and content) left by an unpublished generation is
        replaced. Call inside :meth:`transaction` so that a batch is written whole.

        Raises:
            DataError: if two different files share an id (a 63-bit hash collision).
        """
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} rows but {len(vectors)} vectors")
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        ids = []
        cols = _META_COLS.replace(" ", "")
        marks = ",".join("?" * (cols.count(",") + 3))  # the columns, added_gen, removed_gen
        with self._lock:
            for m, v in zip(items, vecs, strict=True):
                row_id = m.id
                old = self._db.execute("SELECT path, sha256 FROM images WHERE id = ?", (row_id,)).fetchone()
                if old is not None and tuple(old) != (m.relpath, m.sha256):
                    raise DataError(f"image id collision with {old[0]}", path=m.relpath)
                self._db.execute(
                    f"INSERT OR REPLACE INTO images({cols}, added_gen, removed_gen) VALUES ({marks})",
                    (row_id, *_row_values(m), gen, None),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO vectors(id, vec) VALUES (?, ?)", (row_id, v.tobytes())
                )
                if m.lonlat_bounds is not None:
                    self._put_box(row_id, m.lonlat_bounds)
                ids.append(row_id)
        return ids

    def ids_in_box(
        self, west: float, south: float, east: float, north: float
    ) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """The rows whose footprint bounding box meets the box, from an R*Tree: ``(ids whose box
        lies inside it, [(id, footprint JSON)] of those on its edge)``. Boxes across ±180 are
        stored unwrapped (east + 360), so the box is also tried 360° east; they are always
        edge rows."""
        within = "b.lon_min >= ? AND b.lon_max <= ? AND b.lat_min >= ? AND b.lat_max <= ?"
        inside_args = (west, east, south, north)
        with self._lock:
            rows = self._db.execute(f"SELECT b.id FROM footprint_boxes b WHERE {within}", inside_args)
            inside = [r[0] for r in rows]
            edge: dict[int, str] = {}
            for shift in (0.0, 360.0):
                for r in self._db.execute(
                    "SELECT b.id, i.footprint FROM footprint_boxes b JOIN images i ON i.id = b.id "
                    "WHERE b.lon_min <= ? AND b.lon_max >= ? AND b.lat_min <= ? AND b.lat_max >= ? "
                    f"AND NOT ({within})",
                    (east + shift, west + shift, north, south, *inside_args),
                ):
                    edge.setdefault(int(r[0]), r[1])
        return np.asarray(inside, dtype=np.int64), list(edge.items())

    def vectors(self, ids: Sequence[int], dim: int, generation: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, (N, dim) float32 vectors)`` of those of ``ids`` in published ``generation``."""
        out_ids: list[int] = []
        blobs: list[bytes] = []
        ids = [int(i) for i in ids]
        with self._lock:
            for s in range(0, len(ids), 500):
                chunk = ids[s : s + 500]
                q = (
                    "SELECT v.id, v.vec FROM vectors v JOIN images i ON i.id = v.id WHERE v.id IN "
                    f"({','.join('?' * len(chunk))}) AND i.added_gen <= ? "
                    "AND (i.removed_gen IS NULL OR i.removed_gen > ?)"
                )
                for r in self._db.execute(q, (*chunk, generation, generation)):
                    out_ids.append(int(r[0]))
                    blobs.append(r[1])
        vecs = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(out_ids), dim)
        return np.asarray(out_ids, dtype=np.int64), vecs.astype(np.float32)

    def remove(self, ids: Sequence[int], gen: int) -> None:
        """Remove rows in generation ``gen``: rows that ``gen`` itself added (never published)
        are deleted now; published rows are marked and deleted by :meth:`collect_garbage`."""
        with self._lock:
            for i in ids:
                row = self._db.execute("SELECT added_gen FROM images WHERE id = ?", (i,)).fetchone()
                if row is None:
                    continue
                if row[0] >= gen:
                    self._db.execute("DELETE FROM images WHERE id = ?", (i,))
                    self._db.execute("DELETE FROM vectors WHERE id = ?", (i,))
                    self._db.execute("DELETE FROM footprint_boxes WHERE id = ?", (i,))
                else:
                    self._db.execute("UPDATE images SET removed_gen = ? WHERE id = ?", (gen, i))

    def touch(self, row_id: int, size: int, mtime_ns: int) -> None:
        """Record a new stat for a row whose content did not change."""
        with self._lock:
            self._db.execute(
                "UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, row_id)
            )

    def collect_garbage(self, published_gen: int) -> int:
        """Delete rows removed at or before ``published_gen``; returns how many."""
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute("SELECT id FROM images WHERE removed_gen <= ?", (published_gen,))
            ]
            with self.transaction():
                for table in ("vectors", "footprint_boxes"):
                    self._db.execute(
                        f"DELETE FROM {table} WHERE id IN (SELECT id FROM images WHERE removed_gen <= ?)",
                        (published_gen,),
                    )
                self._db.execute("DELETE FROM images WHERE removed_gen <= ?", (published_gen,))
        return len(ids)

    def pending_changes(self, gen: int) -> tuple[int, int]:
        """``(added, removed)`` row counts of generation ``gen`` (not yet published)."""
        with self._lock:
            added = self._db.execute("SELECT COUNT(*) FROM images WHERE added_gen = ?", (gen,)).fetchone()[0]
            removed = self._db.execute(
                "SELECT COUNT(*) FROM images WHERE removed_gen = ?", (gen,)
            ).fetchone()[0]
        return int(added), int(removed)

    def rows_without_footprint(self) -> list[tuple[int, str]]:
        """``(id, relpath)`` of rows with a CRS but no footprint (indexed before footprints)."""
        with self._lock:
            return [
                (int(r[0]), r[1])
                for r in self._db.execute(
                    "SELECT id, path FROM images WHERE crs IS NOT NULL AND footprint IS NULL"
                )
            ]

    def set_footprint(
        self, row_id: int, bbox: tuple[float, float, float, float], ring: Sequence[Any]
    ) -> None:
        """Record a row's EPSG:4326 footprint (bounding box, ring) and its R*Tree box."""
        with self._lock:
            self._db.execute(
                "UPDATE images SET lon_min = ?, lat_min = ?, lon_max = ?, lat_max = ?, footprint = ? "
                "WHERE id = ?",
                (*bbox, ring_to_json(ring), row_id),
            )
            self._put_box(row_id, bbox)

    def _put_box(self, row_id: int, bbox: tuple[float, float, float, float]) -> None:
        """A row's footprint box in the R*Tree; a box across ±180 is stored unwrapped (east + 360)."""
        w, s, e, n = bbox
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO footprint_boxes VALUES (?, ?, ?, ?, ?)",
                (row_id, w, e + 360 if w > e else e, s, n),
            )

    def count_georeferenced(self) -> int:
        """Live rows with a footprint."""
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM images WHERE removed_gen IS NULL AND footprint IS NOT NULL"
                ).fetchone()[0]
            )

    def count_live(self) -> int:
        """Rows not removed."""
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM images WHERE removed_gen IS NULL").fetchone()[0]
            )

    def live_vectors(self, dim: int, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids (B,) int64, vectors (B, dim) float32)`` of the live rows, by id."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT v.id, v.vec FROM vectors v JOIN images i ON i.id = v.id "
                    "WHERE i.removed_gen IS NULL AND v.id > ? ORDER BY v.id LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
            last = int(ids[-1])
            yield ids, vecs.astype(np.float32, copy=False)

    def metadata(self, ids: Sequence[int]) -> dict[int, ImageMetadata]:
        """Metadata of the given row ids (ids that no longer exist are left out)."""
        out: dict[int, ImageMetadata] = {}
        ids = [int(i) for i in ids]
        with self._lock:
            for s in range(0, len(ids), 500):
                chunk = ids[s : s + 500]
                marks = ",".join("?" * len(chunk))
                for r in self._db.execute(f"SELECT {_META_COLS} FROM images WHERE id IN ({marks})", chunk):
                    out[int(r[0])] = _meta_from_row(r)
        return out

    def iter_metadata(self, generation: int) -> Iterator[tuple[int, ImageMetadata, bytes]]:
        """Yield ``(id, metadata, vector bytes)`` of every row of published ``generation``, by id."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {', '.join('i.' + c.strip() for c in _META_COLS.split(','))}, v.vec "
                    "FROM images i JOIN vectors v ON v.id = i.id WHERE i.added_gen <= ? "
                    "AND (i.removed_gen IS NULL OR i.removed_gen > ?) AND i.id > ? ORDER BY i.id LIMIT 4096",
                    (generation, generation, last),
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield int(r[0]), _meta_from_row(r), r[-1]
            last = int(rows[-1][0])

    # -- failures -----------------------------------------------------------------------------
    def failures(self) -> dict[str, tuple[int, int, str]]:
        """Files that could not be read: relpath → ``(size, mtime_ns, error)``."""
        with self._lock:
            return {
                r[0]: (r[1], r[2], r[3])
                for r in self._db.execute("SELECT path, size, mtime_ns, error FROM failures")
            }

    def set_failure(self, relpath: str, size: int, mtime_ns: int, error: str) -> None:
        """Record (or update) an unreadable file."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO failures(path, size, mtime_ns, error) VALUES (?,?,?,?)",
                (relpath, size, mtime_ns, error),
            )

    def clear_failures(self, relpaths: Sequence[str]) -> None:
        """Forget failures (the file was read after all, changed, or is gone)."""
        with self._lock:
            self._db.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in relpaths])
