"""Deterministic orderings of score matrices: top-k and reverse positions.

Rows are queries, columns candidates. Orders are descending by score with ties broken by the
lower index, so results never depend on the sort algorithm of a NumPy build.
"""

from __future__ import annotations

import math

import numpy as np

_CHUNK_ELEMS = 16 * 2**20  # elements per working block (≈ 128 MiB of float64)


def topk_desc(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` columns of every row, descending, ties broken by the lower column index.

    Args:
        m: (n, C) scores.
        k: number of candidates, 1 ≤ k ≤ C.

    Returns:
        ``(idx, vals)``, both (n, k): the column indices and their scores.
    """
    n, c = m.shape
    if not 1 <= k <= c:
        raise ValueError(f"k={k} must lie in [1, {c}]")
    idx = np.empty((n, k), dtype=np.int64)
    rows_per = max(1, _CHUNK_ELEMS // c)
    for s in range(0, n, rows_per):
        block = m[s : s + rows_per]
        neg = -block
        if k == c:
            part = np.argsort(neg, axis=1, kind="stable")
        else:
            part = np.argpartition(neg, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(block, part, 1).min(axis=1, keepdims=True)
            # argpartition picks arbitrarily among values tied at the k-th place; fix those rows.
            tied = np.flatnonzero(np.count_nonzero(block >= kth, axis=1) > k)
            if tied.size:
                part[tied] = np.argsort(neg[tied], axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(block, part, 1)
        order = np.lexsort((part, -vals), axis=1)
        idx[s : s + rows_per] = np.take_along_axis(part, order, 1)
    return idx, np.take_along_axis(m, idx, 1)


def reverse_positions(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """0-based position of query ``rows[p]`` in the descending order of column ``cols[p]``.

    The order of column c runs over all n queries (ties by the lower query index), so the
    position is ``#{q': m[q',c] > m[q,c]} + #{q' < q: m[q',c] = m[q,c]}``.

    Args:
        m: (n, C) scores.
        rows: (P,) query indices.
        cols: (P,) column indices.

    Returns:
        (P,) int64 positions.
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = np.asarray(cols, dtype=np.int64).ravel()
    n = m.shape[0]
    n_cols = np.unique(cols).size
    cost_count = rows.size * n
    cost_sort = 4 * n * n_cols * max(1.0, math.log2(max(n, 2)))
    if cost_count <= cost_sort:
        return _reverse_positions_count(m, rows, cols)
    return _reverse_positions_sort(m, rows, cols)


def _reverse_positions_count(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    n = m.shape[0]
    out = np.empty(rows.size, dtype=np.int64)
    qidx = np.arange(n)[:, None]
    per = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, rows.size, per):
        r, c = rows[s : s + per], cols[s : s + per]
        g = m[:, c]  # (n, P)
        v = m[r, c][None, :]
        out[s : s + per] = np.count_nonzero(g > v, axis=0) + np.count_nonzero(
            (g == v) & (qidx < r[None, :]), axis=0
        )
    return out


def _reverse_positions_sort(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    n = m.shape[0]
    out = np.empty(rows.size, dtype=np.int64)
    order = np.argsort(cols, kind="stable")
    ucols, starts = np.unique(cols[order], return_index=True)
    bounds = np.append(starts, order.size)
    per = max(1, _CHUNK_ELEMS // max(n, 1))
    for s in range(0, ucols.size, per):
        chunk = ucols[s : s + per]
        w = chunk.size
        argsorted = np.argsort(-m[:, chunk], axis=0, kind="stable")  # (n, w)
        pos = np.empty((n, w), dtype=np.int64)
        np.put_along_axis(pos, argsorted, np.arange(n)[:, None], axis=0)
        sel = order[bounds[s] : bounds[s + w]]
        local = np.searchsorted(chunk, cols[sel])
        out[sel] = pos[rows[sel], local]
    return out


def scores_with_tail(
    m: np.ndarray, cand: np.ndarray, cand_scores: np.ndarray, dtype: np.dtype | None = None
) -> np.ndarray:
    """Full score rows where the candidates take new scores and everything else sits below.

    Non-candidates keep their original relative order (``m`` shifted per row), strictly below
    every candidate; ties among them stay ties.

    Args:
        m: (n, C) original scores.
        cand: (n, k) candidate columns of each row.
        cand_scores: (n, k) their new scores.
        dtype: output dtype, by default ``m``'s floating dtype (at least float32).

    Returns:
        (n, C) scores whose descending order is: candidates by new score, then the rest.
    """
    dtype = np.dtype(dtype or np.result_type(m.dtype, np.float32))
    out = np.array(m, dtype=dtype, copy=True)
    saved = np.take_along_axis(out, cand, 1)
    np.put_along_axis(out, cand, -np.inf, 1)
    tail_max = out.max(axis=1, keepdims=True)
    np.put_along_axis(out, cand, saved, 1)
    has_tail = np.isfinite(tail_max)
    shift = np.where(has_tail, tail_max - cand_scores.min(axis=1, keepdims=True) + 1.0, 0.0)
    out -= shift.astype(dtype)
    np.put_along_axis(out, cand, cand_scores.astype(dtype), 1)
    return out
