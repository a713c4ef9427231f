"""Deterministic orderings of score matrices: top-k and reverse positions.

Rows are queries, columns candidates. Orders are descending by score with ties broken by the
lower index, so results never depend on the sort algorithm of a NumPy build.
"""

from __future__ import annotations

import numpy as np

_CHUNK_ELEMS = 2**21  # elements per working block: 16 MiB of float64, small enough for malloc to reuse


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
    # Counting costs P·n comparisons; sorting the needed columns costs about U·n·log2(n).
    if rows.size <= 2 * n_cols * max(1.0, np.log2(max(n, 2))):
        return _reverse_positions_count(m, rows, cols)
    return _reverse_positions_sort(m, rows, cols)


def _reverse_positions_count(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Count, for each pair, the queries above it in its column (contiguous column gathers)."""
    n = m.shape[0]
    out = np.empty(rows.size, dtype=np.int64)
    ar = np.arange(n)[None, :]
    per = max(1, _CHUNK_ELEMS // max(n, 1))
    ucols, inverse = np.unique(cols, return_inverse=True)
    xt = np.ascontiguousarray(m[:, ucols].T)  # (U, n): column c of m as a contiguous row
    for s in range(0, rows.size, per):
        r = rows[s : s + per, None]
        g = xt[inverse[s : s + per]]  # (P, n)
        v = np.take_along_axis(g, r, 1)
        out[s : s + per] = np.count_nonzero(g > v, axis=1) + np.count_nonzero((g == v) & (ar < r), axis=1)
    return out


def _reverse_positions_sort(m: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sort each needed column once (fast unstable sort), then fix the order inside ties."""
    n = m.shape[0]
    out = np.empty(rows.size, dtype=np.int64)
    by_col = np.argsort(cols, kind="stable")
    ucols, starts = np.unique(cols[by_col], return_index=True)
    bounds = np.append(starts, by_col.size)
    per = max(1, _CHUNK_ELEMS // max(n, 1))
    ar = np.arange(n)
    for s in range(0, ucols.size, per):
        chunk = ucols[s : s + per]
        w = chunk.size
        x = np.ascontiguousarray(m[:, chunk].T)  # (w, n): one row per column of m
        order = np.argsort(-x, axis=1)  # unstable; ties are fixed below
        sv = np.take_along_axis(x, order, 1)
        in_tie_sorted = np.zeros((w, n), dtype=bool)
        eq = sv[:, 1:] == sv[:, :-1]
        in_tie_sorted[:, 1:] |= eq
        in_tie_sorted[:, :-1] |= eq
        pos_all = np.empty((w, n), dtype=np.int64)
        np.put_along_axis(pos_all, order, ar[None, :], 1)
        in_tie = np.empty((w, n), dtype=bool)
        np.put_along_axis(in_tie, order, in_tie_sorted, 1)
        sel = by_col[bounds[s] : bounds[s + w]]
        lc = np.searchsorted(chunk, cols[sel])
        q = rows[sel]
        pos = pos_all[lc, q]
        tied = np.flatnonzero(in_tie[lc, q])
        # The unstable sort may misorder equal scores: count those positions exactly.
        for t0 in range(0, tied.size, per):
            tb = tied[t0 : t0 + per]
            xt = x[lc[tb]]  # (T, n)
            qt = q[tb][:, None]
            vt = np.take_along_axis(xt, qt, 1)
            pos[tb] = np.count_nonzero(xt > vt, axis=1) + np.count_nonzero(
                (xt == vt) & (ar[None, :] < qt), axis=1
            )
        out[sel] = pos
    return out


def scores_with_tail(m: np.ndarray, cand: np.ndarray, cand_scores: np.ndarray) -> np.ndarray:
    """Ranking keys: candidates ordered by their new scores, above everything else.

    The candidates' new scores are replaced by their dense descending rank mapped above the
    row's largest non-candidate score (``tail_max + 1 + k − 1 − dense_rank``), so their order and
    their ties are kept exactly whatever the magnitude of the new scores. Non-candidates keep
    their original scores, hence their relative order and ties.

    Args:
        m: (n, C) original scores.
        cand: (n, k) candidate columns of each row.
        cand_scores: (n, k) their new scores (finite).

    Returns:
        (n, C) float64 keys whose descending order is: candidates by new score, then the rest.
    """
    n, k = cand.shape
    out = np.array(m, dtype=np.float64, copy=True)
    if k == out.shape[1]:
        tail_max = np.zeros((n, 1))
    else:
        np.put_along_axis(out, cand, -np.inf, 1)
        tail_max = out.max(axis=1, keepdims=True)
    order = np.argsort(-cand_scores, axis=1, kind="stable")
    ranked = np.take_along_axis(cand_scores, order, 1)
    dense_sorted = np.concatenate(
        [np.zeros((n, 1), np.int64), np.cumsum(ranked[:, 1:] != ranked[:, :-1], axis=1)], axis=1
    )
    dense = np.empty_like(dense_sorted)
    np.put_along_axis(dense, order, dense_sorted, 1)
    np.put_along_axis(out, cand, tail_max + 1.0 + (k - 1 - dense), 1)
    return out
