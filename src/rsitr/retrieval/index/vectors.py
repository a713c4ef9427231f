"""The FAISS side of an index: an inner-product index over L2-normalised vectors.

Ids stored in FAISS are the SQLite row ids (``IndexIDMap2``), so a hit maps straight to its
metadata row. Small archives get an exact ``Flat`` index; past ``ann_threshold`` vectors,
``kind="auto"`` switches to an approximate index:

* ``ivfpq`` (the default ANN): an inverted file with ``nlist`` k-means cells whose codes are
  4-bit product-quantised (FAISS "fast scan", ``pq_m`` sub-quantisers), searched in ``nprobe``
  cells, then the best ``k * refine_factor`` candidates re-scored exactly against the full
  vectors (``IndexRefineFlat``);
* ``hnsw``: a Hierarchical Navigable Small World graph over the full vectors (``hnsw_m``
  links per node, ``ef_construction`` at build, ``ef_search`` at query time).

Files are written with FAISS's own binary serialisation (no pickle), to a temporary name that
is fsynced and then renamed over the target.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from rsitr.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "VectorIndexConfig",
    "apply_search_params",
    "build_vector_index",
    "fsync_dir",
    "load_vector_index",
    "resolve_kind",
    "save_vector_index",
    "search_vectors",
]

Kind = Literal["auto", "flat", "ivfpq", "hnsw"]
KINDS = ("auto", "flat", "ivfpq", "hnsw")


@dataclass(frozen=True)
class VectorIndexConfig:
    """How the vectors of an index are searched.

    Attributes:
        kind: ``"flat"`` (exact), ``"ivfpq"`` or ``"hnsw"`` (approximate), or ``"auto"``: flat
            up to ``ann_threshold`` vectors, ``ann_kind`` beyond.
        ann_threshold: the size past which ``auto`` switches to an approximate index.
        ann_kind: the approximate index ``auto`` uses: ``"ivfpq"`` or ``"hnsw"``.
        nlist: IVF cells; ``None``: about ``sqrt(N)``, rounded to a power of two (64..65536).
        nprobe: IVF cells visited per query.
        pq_m: 4-bit sub-quantisers per vector; ``None``: ``dim // 4`` (one per 4 dimensions).
        refine_factor: exact re-scoring of the best ``k * refine_factor`` IVF-PQ candidates
            (0: none, scores stay approximate).
        hnsw_m: HNSW links per node.
        ef_construction: HNSW beam width while building.
        ef_search: HNSW beam width while searching.
        train_size: vectors sampled to train the IVF-PQ quantisers.
        seed: seed of that sample and of k-means.

    Raises:
        ConfigError: for an unknown kind or a non-positive size.
    """

    kind: Kind = "auto"
    ann_threshold: int = 200_000
    ann_kind: Literal["ivfpq", "hnsw"] = "ivfpq"
    nlist: int | None = None
    nprobe: int = 64
    pq_m: int | None = None
    refine_factor: int = 20
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256
    train_size: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.ann_kind not in ("ivfpq", "hnsw"):
            raise ConfigError(f"ann_kind {self.ann_kind!r}: expected ivfpq or hnsw")
        for f in ("ann_threshold", "nprobe", "hnsw_m", "ef_construction", "ef_search", "train_size"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f}={getattr(self, f)}: expected a positive integer")
        if self.refine_factor < 0:
            raise ConfigError(f"refine_factor={self.refine_factor}: expected >= 0")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VectorIndexConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys raise).

        Raises:
            ConfigError: for an unknown key.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown vector index option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def resolve_kind(cfg: VectorIndexConfig, n: int) -> str:
    """The concrete kind for ``n`` vectors (``auto`` resolved)."""
    if cfg.kind != "auto":
        return cfg.kind
    return "flat" if n <= cfg.ann_threshold else cfg.ann_kind


def _nlist(cfg: VectorIndexConfig, n: int) -> int:
    if cfg.nlist is not None:
        return cfg.nlist
    return int(min(65536, max(64, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def _pq_m(cfg: VectorIndexConfig, dim: int) -> int:
    m = cfg.pq_m or max(1, dim // 4)
    if dim % m:
        raise ConfigError(f"pq_m={m}: must divide the embedding dimension {dim}")
    return m


def build_vector_index(
    vectors: np.ndarray, ids: np.ndarray, cfg: VectorIndexConfig | None = None
) -> tuple[faiss.Index, dict[str, Any]]:
    """Build a FAISS inner-product index over L2-normalised vectors.

    Args:
        vectors: (N, D) float32, L2-normalised.
        ids: (N,) int64 ids (SQLite row ids).
        cfg: the configuration; default :class:`VectorIndexConfig`.

    Returns:
        ``(index, info)``: the FAISS index (ids mapped) and a JSON-ready description
        (``kind``, ``factory``, search parameters) to store in the manifest.

    Raises:
        ConfigError: if the configuration does not fit the data (e.g. ``pq_m``).
    """
    cfg = cfg or VectorIndexConfig()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    kind = resolve_kind(cfg, n)
    params: dict[str, Any] = {}
    if kind == "flat" or n == 0:
        kind, factory = "flat", "Flat"
        base: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        factory = f"HNSW{cfg.hnsw_m},Flat"
        base = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = cfg.ef_construction
        params = {"ef_search": cfg.ef_search}
    else:
        nlist = min(_nlist(cfg, n), max(1, n // 39))  # k-means wants >= 39 points per cell
        # One cell: no inverted file, every code is scanned (the fast-scan kernels make that
        # cheap), which is what unclustered data needs for high recall.
        coarse = f"IVF{nlist}," if nlist > 1 else ""
        factory = f"{coarse}PQ{_pq_m(cfg, dim)}x4fs" + (",RFlat" if cfg.refine_factor else "")
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(cfg.seed)
        sample = x if n <= cfg.train_size else x[np.sort(rng.choice(n, cfg.train_size, replace=False))]
        if nlist > 1:
            faiss.extract_index_ivf(base).cp.seed = cfg.seed
        base.train(sample)
        params = {"refine_factor": cfg.refine_factor}
        if nlist > 1:
            params["nprobe"] = min(cfg.nprobe, nlist)
    index = faiss.IndexIDMap2(base)
    for s in range(0, n, 65536):  # batches keep the temporaries small
        index.add_with_ids(x[s : s + 65536], ids[s : s + 65536])
    apply_search_params(index, params)
    info = {"kind": kind, "factory": factory, "params": params, "count": int(n), "dim": int(dim)}
    logger.info("built a %s index (%s) of %d vectors", kind, factory, n)
    return index, info


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set query-time parameters (``nprobe``, ``refine_factor``, ``ef_search``) in place.

    Raises:
        ConfigError: for a parameter the index does not have.
    """
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    inner = faiss.downcast_index(base.base_index) if isinstance(base, faiss.IndexRefine) else base
    for key, value in params.items():
        if key == "nprobe" and isinstance(inner, faiss.IndexIVF):
            inner.nprobe = int(value)
        elif key == "refine_factor" and isinstance(base, faiss.IndexRefine):
            base.k_factor = float(max(1, int(value)))
        elif key == "ef_search" and isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = int(value)
        else:
            raise ConfigError(
                f"search parameter {key!r} does not apply to this {type(inner).__name__} index "
                "(nprobe: IVF, refine_factor: refined IVF-PQ, ef_search: HNSW)"
            )


def search_vectors(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products: ``(scores (Q, k) float32, ids (Q, k) int64)``, -1 for no hit."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), max(1, index.ntotal)))
    return index.search(q, k)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) where the OS supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_vector_index(index: faiss.Index, path: str | Path) -> Path:
    """Write ``index`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def load_vector_index(path: str | Path, params: dict[str, Any] | None = None) -> faiss.Index:
    """Read a FAISS index written by :func:`save_vector_index` and set its search parameters.

    Raises:
        DataError: if the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("vector index file not found", path=path)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise DataError(f"cannot read the vector index: {str(e).splitlines()[0]}", path=path) from e
    apply_search_params(index, params or {})
    return index


def merge_params(info: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The stored search parameters of an index, updated with ``overrides``."""
    return {**info.get("params", {}), **(overrides or {})}
