"""Filtered search: the top k among the images whose footprint meets a box.

The filter runs *before* ranking, so a query returns the best k images inside the box (as many
as there are, up to k), never the global top k cut down to the few inside it:

1. an SQLite R*Tree selects the rows whose lon/lat bounding box meets the query box
   (antimeridian-aware), and an exact polygon test (shapely) keeps those of the footprints on
   the box's edge that really intersect it;
2. the selected ids restrict the FAISS search: up to ``EXACT_LIMIT`` candidates are scored
   exactly against their full vectors, read in place from the index's flat storage; beyond
   that, FAISS searches with an id selector (``IDSelectorBatch``) passed in its search
   parameters (IVF ``nprobe`` and HNSW ``efSearch`` kept).
"""

from __future__ import annotations

import json
from typing import Any

import faiss
import numpy as np

from rsitr.data.footprints import BBox, footprint_intersects
from rsitr.retrieval.index.store import MetadataStore

__all__ = ["EXACT_LIMIT", "SubsetSearcher", "ids_in_bbox"]

#: Up to this many candidates, a filtered query is scored exactly (a (n, D) matrix product).
EXACT_LIMIT = 200_000


def ids_in_bbox(store: MetadataStore, bbox: BBox) -> np.ndarray:
    """Sorted ids of the images whose footprint intersects ``bbox`` (int64).

    A footprint whose bounding box lies inside the box intersects it; only the others (on the
    box's edge) get the exact polygon test.
    """
    inside, edge = store.ids_in_box(*bbox.as_tuple())
    keep = [i for i, ring in edge if footprint_intersects(json.loads(ring), bbox)]
    return np.unique(np.concatenate([inside, np.asarray(keep, dtype=np.int64)]))


def _flat_storage(index: Any) -> np.ndarray | None:
    """The (ntotal, D) float32 vectors a FAISS index keeps in full, as a view (or ``None``)."""
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.refine_index)
    elif isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    if not isinstance(index, faiss.IndexFlat):
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


class SubsetSearcher:
    """Search an ``IndexIDMap2`` restricted to a set of ids.

    Args:
        index: the loaded FAISS index (an ``IndexIDMap2`` over flat, IVF-PQ+refine or HNSW).
    """

    def __init__(self, index: Any) -> None:
        self.index = index
        self.inner = faiss.downcast_index(index.index)
        self.id_map = faiss.vector_to_array(index.id_map).astype(np.int64)
        self._order = np.argsort(self.id_map, kind="stable")
        self._sorted = self.id_map[self._order]
        self.storage = _flat_storage(self.inner)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Internal FAISS positions of the ids the index holds (others are dropped)."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(self._sorted, ids).clip(0, max(0, len(self._sorted) - 1))
        found = self._sorted[at] == ids if len(self._sorted) else np.zeros(len(ids), bool)
        return self._order[at[found]]

    def search(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products among ``ids``: ``(scores (Q, k), ids (Q, k))``, -1 past the end."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        pos = self.positions(ids)
        k = max(1, int(k))
        if len(pos) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if self.storage is not None and len(pos) <= EXACT_LIMIT:
            return self._exact(q, k, pos)
        return self._selector(q, k, pos)

    def _exact(self, q: np.ndarray, k: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.storage is not None
        scores = q @ self.storage[pos].T  # (Q, n)
        n = scores.shape[1]
        kk = min(k, n)
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        part = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        out_s[:, :kk] = np.take_along_axis(scores, top, axis=1)
        out_i[:, :kk] = self.id_map[pos[top]]
        return out_s, out_i

    def _selector(self, q: np.ndarray, k: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sel = faiss.IDSelectorBatch(pos.astype(np.int64))
        inner = self.inner
        base = faiss.downcast_index(inner.base_index) if isinstance(inner, faiss.IndexRefine) else inner
        if isinstance(base, faiss.IndexIVF):
            bp: Any = faiss.SearchParametersIVF()
            bp.nprobe = base.nprobe
        elif isinstance(base, faiss.IndexHNSW):
            bp = faiss.SearchParametersHNSW()
            bp.efSearch = base.hnsw.efSearch
        else:
            bp = faiss.SearchParameters()
        bp.sel = sel
        params = bp
        if isinstance(inner, faiss.IndexRefine):
            params = faiss.IndexRefineSearchParameters()
            params.k_factor = inner.k_factor
            params.base_index_params = bp
            params.sel = sel
        scores, found = inner.search(q, k, params=params)
        ids = np.where(found >= 0, self.id_map[found.clip(0)], -1)
        return scores, ids
