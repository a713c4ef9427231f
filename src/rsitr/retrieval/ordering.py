"""Deterministic orderings of score matrices: top-k and reverse positions.

Rows are queries, columns candidates. Orders are descending by score with ties broken by the
lower index, so results never depend on the sort algorithm of a NumPy build.

Nothing here sorts whole rows. Top-k finds the k-th largest score of each row with
``np.partition`` (a SIMD selection) and gathers the entries at or above it. The position of an
entry in its row's order only depends on the entries at least as large, so the entries of each
row above the smallest value looked up in it are gathered into a small table, sorted
(``np.sort``) and binary-searched for every lookup at once. A lookup whose score is tied with
another entry of its row, where the order depends on the indices, is counted exactly instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_ELEMS = 2**21  # elements per working block: 16 MiB of float64, small enough for malloc to reuse
_TABLE_ELEMS = 2**22  # elements per block of rows whose lookup tables are built together
_SELECT_ELEMS = 2**18  # elements per block of rows (or tile of columns) partitioned together
_TRANSPOSE_ROWS = 512  # rows per step of a transposed copy


@dataclass(frozen=True)
class TopK:
    """Top-k entries of every row of a matrix, with the summaries rerankers reuse.

    Attributes:
        idx: (R, k) int64 columns, descending by score, ties broken by the lower column index.
        vals: (R, k) their scores, in the matrix's dtype.
        next_val: (R,) the (k+1)-th largest score of each row, i.e. the best score outside the
            top-k; ``None`` when k equals the row length.
        row_max: (R,) the largest score of each row.
    """

    idx: np.ndarray
    vals: np.ndarray
    next_val: np.ndarray | None
    row_max: np.ndarray


def row_topk(m: np.ndarray, k: int) -> TopK:
    """Top-``k`` entries of every row of ``m`` (descending, ties by the lower column index).

    Args:
        m: (R, L) scores.
        k: number of entries, 1 ≤ k ≤ L.
    """
    n, c = m.shape
    if not 1 <= k <= c:
        raise ValueError(f"k={k} must lie in [1, {c}]")
    if k == c:
        idx = np.argsort(-m, axis=1, kind="stable")
        vals = np.take_along_axis(m, idx, 1)
        return TopK(idx, vals, None, vals[:, 0].copy())
    idx = np.empty((n, k), dtype=np.int64)
    vals = np.empty((n, k), dtype=m.dtype)
    next_val = np.empty(n, dtype=m.dtype)
    rows_per = max(1, _SELECT_ELEMS // c)  # small blocks: the partition's copy stays in cache
    for s in range(0, n, rows_per):
        block = np.ascontiguousarray(m[s : s + rows_per])
        idx[s : s + rows_per], vals[s : s + rows_per], next_val[s : s + rows_per] = _select(block, k)
    return _ordered(idx, vals, next_val)


def _select(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (k < L) of each row of a C-ordered block, in index order, and the (k+1)-th score."""
    c = block.shape[1]
    part = np.partition(block, c - k - 1, axis=1)
    cols, vals = _entries_at_least(block, part[:, c - k :].min(axis=1), k)
    return cols, vals, part[:, c - k - 1]


def _entries_at_least(block: np.ndarray, kth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(r, k) ascending columns of each row's top-k, and their scores, given each row's k-th
    largest score (``block`` C-ordered).

    Every entry above ``kth`` is taken; entries equal to it fill the remaining places in
    index order.
    """
    r, c = block.shape
    flat = np.flatnonzero(block >= kth[:, None])
    if flat.size != r * k:  # some rows have more than k entries ≥ kth: keep the first ties
        rows = flat // c
        above = block.ravel()[flat] > kth[rows]
        need = k - np.bincount(rows[above], minlength=r)
        at = ~above
        cum = np.cumsum(at)
        counts = np.bincount(rows, minlength=r)
        before = np.concatenate([[0], cum])[np.cumsum(counts) - counts]  # ties in earlier rows
        flat = flat[above | (at & (cum - before[rows] <= need[rows]))]
    return (flat % c).reshape(r, k), block.ravel()[flat].reshape(r, k)


def _ordered(idx: np.ndarray, vals: np.ndarray, next_val: np.ndarray | None) -> TopK:
    """Sort each row's top-k (given in index order) by descending score, ties by index."""
    order = np.argsort(-vals, axis=1)  # fast but not stable: equal scores are fixed below
    idx = np.take_along_axis(idx, order, 1)
    vals = np.take_along_axis(vals, order, 1)
    tied = np.flatnonzero((vals[:, 1:] == vals[:, :-1]).any(axis=1))
    if tied.size:
        fix = np.lexsort((idx[tied], -vals[tied]), axis=1)
        idx[tied] = np.take_along_axis(idx[tied], fix, 1)
    return TopK(idx, vals, next_val, vals[:, 0].copy())


def topk_desc(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` columns of every row, descending, ties broken by the lower column index.

    Args:
        m: (n, C) scores.
        k: number of candidates, 1 ≤ k ≤ C.

    Returns:
        ``(idx, vals)``, both (n, k): the column indices and their scores.
    """
    t = row_topk(m, k)
    return t.idx, t.vals


def row_positions(
    a: np.ndarray, rows: np.ndarray, entries: np.ndarray, vals: np.ndarray | None = None
) -> np.ndarray:
    """0-based position of entry ``entries[p]`` in the descending order of row ``rows[p]`` of ``a``.

    The order runs over the whole row, ties by the lower index, so the position is
    ``#{j: a[r,j] > v} + #{j < e: a[r,j] = v}`` with ``v = a[r, e]``.

    Args:
        a: (R, L) scores.
        rows: (P,) row indices.
        entries: (P,) column indices.
        vals: the (P,) scores ``a[rows, entries]``, if already at hand.

    Returns:
        (P,) int64 positions.
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    entries = np.asarray(entries, dtype=np.int64).ravel()
    vals = a[rows, entries] if vals is None else np.asarray(vals, dtype=a.dtype).ravel()
    out = np.empty(rows.size, dtype=np.int64)
    floor = _floors(a.dtype, a.shape[0], rows, vals)
    if floor is None:
        out[:] = _positions_by_count(a, rows, entries, vals)
        return out
    per = max(1, _TABLE_ELEMS // a.shape[1])
    for s, sel in _blocks(rows, a.shape[0], per):
        out[sel] = _block_positions(
            a[s : s + per], floor[s : s + per], rows[sel] - s, entries[sel], vals[sel]
        )
    return out


def _floors(dtype: np.dtype, n_rows: int, rows: np.ndarray, vals: np.ndarray) -> np.ndarray | None:
    """(n_rows,) the smallest score looked up in each row (the dtype's maximum where none is);
    ``None`` for a dtype that is neither float nor integer."""
    if np.issubdtype(dtype, np.floating):
        top = np.inf
    elif np.issubdtype(dtype, np.integer):
        top = np.iinfo(dtype).max
    else:
        return None
    floor = np.full(n_rows, top, dtype=dtype)
    np.minimum.at(floor, rows, vals)
    return floor


def _blocks(rows: np.ndarray, n_rows: int, per: int) -> list[tuple[int, np.ndarray | slice]]:
    """Split lookups by blocks of ``per`` rows: ``(first row, lookup selection)`` per non-empty block."""
    if n_rows <= per:
        return [(0, slice(None))] if rows.size else []
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(0, n_rows + per, per))
    return [
        (s, order[bounds[i] : bounds[i + 1]])
        for i, s in enumerate(range(0, n_rows, per))
        if bounds[i + 1] > bounds[i]
    ]


def _block_positions(
    block: np.ndarray, floor: np.ndarray, r: np.ndarray, entries: np.ndarray, vals: np.ndarray
) -> np.ndarray:
    """:func:`row_positions` within a block of rows (``r`` local), ``floor`` from :func:`_floors`."""
    gt, tied = _search_tables(block, floor, r, vals)
    if tied.size:
        gt[tied] = _positions_by_count(block, r[tied], entries[tied], vals[tied])
    return gt


def col_topk_positions(
    s: np.ndarray, k: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, col_sums: bool = False
) -> tuple[TopK, np.ndarray, np.ndarray | None]:
    """``row_topk(sᵀ, k)`` and ``row_positions(sᵀ, cols, rows, vals)``, never materialising ``sᵀ``.

    The top-k transposes columns of ``s`` in tiles small enough to stay in cache. The lookups
    are answered from row blocks of ``s`` (or tile by tile, where their tables would be large).

    Args:
        s: (n, C) scores.
        k: entries per column, 1 ≤ k ≤ n.
        rows, cols, vals: (P,) lookups: the position of row ``rows[p]`` in column ``cols[p]``'s
            descending order, with ``vals[p] = s[rows[p], cols[p]]``.
        col_sums: also return the float64 sum of each column, pairwise over its entries as
            ``np.sum`` of a contiguous copy of the column does.

    Returns:
        ``(top, positions, sums)``: the columns' top-k, (P,) int64 positions, (C,) sums or ``None``.
    """
    n, c = s.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}]")
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = np.asarray(cols, dtype=np.int64).ravel()
    vals = np.asarray(vals, dtype=s.dtype).ravel()
    width = max(1, _SELECT_ELEMS // n)
    idx = np.empty((c, k), dtype=np.int64)
    top_vals = np.empty((c, k), dtype=s.dtype)
    next_val = np.empty(c, dtype=s.dtype) if k < n else None
    sums = np.empty(c) if col_sums else None
    pos = _col_positions(s, rows, cols, vals) if rows.size else np.empty(0, dtype=np.int64)
    lookups: dict[int, np.ndarray | slice] = {}
    floor = None
    if pos is None:  # answer the lookups tile by tile instead
        floor = _floors(s.dtype, c, cols, vals)
        lookups = dict(_blocks(cols, c, width))
        pos = np.empty(rows.size, dtype=np.int64)
    for j in range(0, c, width):
        tile = _transposed(s[:, j : j + width])
        w = tile.shape[0]
        if next_val is None:
            t = row_topk(tile, k)
            idx[j : j + w], top_vals[j : j + w] = t.idx, t.vals
        else:
            idx[j : j + w], top_vals[j : j + w], next_val[j : j + w] = _select(tile, k)
        if sums is not None:
            sums[j : j + w] = np.ascontiguousarray(tile, dtype=np.float64).sum(axis=1)
        sel = lookups.get(j)
        if sel is not None:
            if floor is None:
                pos[sel] = _positions_by_count(tile, cols[sel] - j, rows[sel], vals[sel])
            else:
                pos[sel] = _block_positions(tile, floor[j : j + w], cols[sel] - j, rows[sel], vals[sel])
    top = (
        TopK(idx, top_vals, None, top_vals[:, 0].copy())
        if next_val is None
        else _ordered(idx, top_vals, next_val)
    )
    return top, pos, sums


def _transposed(part: np.ndarray) -> np.ndarray:
    """C-ordered copy of ``partᵀ``, copied a few hundred rows at a time (a tall strided copy
    touches one memory page per row and misses the TLB)."""
    out = np.empty(part.shape[::-1], dtype=part.dtype)
    for i in range(0, part.shape[0], _TRANSPOSE_ROWS):
        out[:, i : i + _TRANSPOSE_ROWS] = part[i : i + _TRANSPOSE_ROWS].T
    return out


def _search_tables(
    block: np.ndarray, floor: np.ndarray, r: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Count the entries of row ``r[p]`` of ``block`` above ``v[p]``, a score of that row ≥ floor.

    Returns:
        ``(greater, tied)``: the counts, and the lookups whose score occurs more than once in
        their row (their position also depends on the indices).
    """
    block = np.ascontiguousarray(block)
    flat = np.flatnonzero(block >= floor[:, None])
    table = _table(flat // block.shape[1], block.ravel()[flat], block.shape[0])
    return _search(table, r, v)


def _table(owner: np.ndarray, vals: np.ndarray, n_rows: int) -> np.ndarray:
    """(n_rows, width) ascending table of the ``vals`` of each row (``owner`` non-decreasing);
    padding sorts below every score."""
    counts = np.bincount(owner, minlength=n_rows)
    width = int(counts.max())
    low = -np.inf if np.issubdtype(vals.dtype, np.floating) else np.iinfo(vals.dtype).min
    table = np.full((n_rows, width), low, dtype=vals.dtype)
    # The e-th value of row i goes to table place i·width + e.
    shift = np.arange(n_rows) * width - (np.cumsum(counts) - counts)
    table.ravel()[np.arange(owner.size) + shift[owner]] = vals
    table.sort(axis=1)
    return table


def _search(table: np.ndarray, r: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of table row ``r[p]`` above ``v[p]`` (a value present in that row), and the
    lookups whose value occurs more than once there."""
    width = table.shape[1]
    flat = table.ravel()
    # Branch-free binary search of every lookup at once: pos ends at base + #(table row ≤ v).
    pos = r * width
    base = pos.copy()
    span = width
    while span > 1:
        half = span >> 1
        pos += np.multiply(flat.take(pos + half) <= v, half, dtype=pos.dtype)
        span -= half
    pos += flat[pos] <= v
    n_le = pos - base
    # v itself is at pos − 1; another equal score would sit just before it.
    tied = np.flatnonzero((n_le >= 2) & (flat[np.maximum(pos - 2, 0)] == v))
    return width - n_le, tied


def _col_positions(s: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray | None:
    """``row_positions(sᵀ, cols, rows, vals)`` from row blocks of ``s``; ``None`` when the
    lookup tables would exceed the memory budget (a column looked up far down its order)."""
    n, c = s.shape
    floor = _floors(s.dtype, c, cols, vals)
    if floor is None:
        return None
    per = max(1, _TABLE_ELEMS // c)
    flat = np.concatenate(
        [np.flatnonzero(s[i : i + per] >= floor[None, :]) + i * c for i in range(0, n, per)]
    )
    owner = flat % c
    if c * int(np.bincount(owner, minlength=c).max()) > 4 * _TABLE_ELEMS:
        return None
    by_col = np.argsort(owner, kind="stable")  # row order kept within each column
    flat, owner = flat[by_col], owner[by_col]
    table = _table(owner, s[flat // c, owner], c)
    gt, tied = _search(table, cols, vals)
    if tied.size:
        gt[tied] = _positions_by_count(s.T, cols[tied], rows[tied], vals[tied])
    return gt


def _positions_by_count(a: np.ndarray, rows: np.ndarray, entries: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """:func:`row_positions` by counting over whole rows (exact with ties; P·L comparisons)."""
    length = a.shape[1]
    out = np.empty(rows.size, dtype=np.int64)
    ar = np.arange(length)[None, :]
    per = max(1, _CHUNK_ELEMS // max(length, 1))
    for s in range(0, rows.size, per):
        g = a[rows[s : s + per]]  # (P, L)
        v = vals[s : s + per, None]
        e = entries[s : s + per, None]
        out[s : s + per] = np.count_nonzero(g > v, axis=1) + np.count_nonzero((g == v) & (ar < e), axis=1)
    return out


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
    return row_positions(np.ascontiguousarray(m.T), cols, rows)


def tail_keys(cand_scores: np.ndarray, tail_max: np.ndarray) -> np.ndarray:
    """Keys placing each row's candidates above ``tail_max`` in the order of ``cand_scores``.

    A candidate's key is ``tail_max + 1 + k − 1 − dense_rank`` (dense descending rank of its new
    score in the row), so ties among new scores stay ties whatever their magnitude.

    Args:
        cand_scores: (n, k) new scores (finite).
        tail_max: (n, 1) float64, the best score outside the candidates.

    Returns:
        (n, k) float64 keys.
    """
    n, k = cand_scores.shape
    if (cand_scores[:, 1:] < cand_scores[:, :-1]).all():  # already strictly descending
        return tail_max + 1.0 + (k - 1 - np.arange(k))
    order = np.argsort(-cand_scores, axis=1)  # equal scores get equal ranks in any order
    ranked = np.take_along_axis(cand_scores, order, 1)
    dense_sorted = np.concatenate(
        [np.zeros((n, 1), np.int64), np.cumsum(ranked[:, 1:] != ranked[:, :-1], axis=1)], axis=1
    )
    dense = np.empty_like(dense_sorted)
    np.put_along_axis(dense, order, dense_sorted, 1)
    return tail_max + 1.0 + (k - 1 - dense)


def scores_with_tail(
    m: np.ndarray, cand: np.ndarray, cand_scores: np.ndarray, tail_max: np.ndarray | None = None
) -> np.ndarray:
    """Ranking keys: candidates ordered by their new scores, above everything else.

    The candidates' new scores are replaced by :func:`tail_keys` above the row's largest
    non-candidate score, so their order and their ties are kept exactly whatever the magnitude
    of the new scores. Non-candidates keep their original scores, hence their relative order
    and ties.

    Args:
        m: (n, C) original scores.
        cand: (n, k) candidate columns of each row.
        cand_scores: (n, k) their new scores (finite).
        tail_max: (n,) the best non-candidate score of each row (:attr:`TopK.next_val`), if
            known; ignored when k = C.

    Returns:
        (n, C) float64 keys whose descending order is: candidates by new score, then the rest.
    """
    n, k = cand.shape
    out = np.array(m, dtype=np.float64, copy=True)
    if k == out.shape[1]:
        top = np.zeros((n, 1))
    elif tail_max is not None:
        top = np.asarray(tail_max, dtype=np.float64).reshape(n, 1)
    else:
        np.put_along_axis(out, cand, -np.inf, 1)
        top = out.max(axis=1, keepdims=True)
    np.put_along_axis(out, cand, tail_keys(cand_scores, top), 1)
    return out


def scores_with_tail_t(
    s: np.ndarray, cand: np.ndarray, cand_scores: np.ndarray, tail_max: np.ndarray | None
) -> np.ndarray:
    """``scores_with_tail(sᵀ, cand, cand_scores, tail_max).T``, built directly in ``s``'s layout.

    Args:
        s: (n, C) original scores; the queries are its columns.
        cand: (C, k) candidate rows of each column.
        cand_scores: (C, k) their new scores.
        tail_max: (C,) the best non-candidate score of each column (``None`` only when k = n).

    Returns:
        (n, C) C-ordered float64 keys.
    """
    c, k = cand.shape
    out = np.array(s, dtype=np.float64, order="C", copy=True)
    top = np.zeros((c, 1)) if k == s.shape[0] else np.asarray(tail_max, dtype=np.float64).reshape(c, 1)
    out[cand, np.arange(c)[:, None]] = tail_keys(cand_scores, top)
    return out
