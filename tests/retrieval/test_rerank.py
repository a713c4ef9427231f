"""Rerankers: SMR against its equations, set preservation, tails, inverted softmax, tuning."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsitr.errors import ConfigError
from rsitr.retrieval import Relevance, evaluate_scores, list_rerankers, rerank, smr_combine, smr_terms
from rsitr.retrieval.ordering import reverse_positions, topk_desc
from rsitr.retrieval.tune import tune_rerank

TOPK_RERANKERS = ["reverse-rank", "mr", "smr"]


def _matrix(seed: int, n: int = 12, cpi: int = 3, positive: bool = False, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.05, 1.0, (n, n * cpi)) if positive else rng.normal(size=(n, n * cpi))
    return np.round(s, 1) if ties else s


def _smr_oracle(s: np.ndarray, k: int, g1: float, g2: float) -> tuple[np.ndarray, np.ndarray]:
    """CMPAGL Eq. 10–16 with rsitr's conventions, one query at a time."""
    nq = s.shape[0]
    cands, new = [], []
    for q in range(nq):
        order = sorted(range(s.shape[1]), key=lambda c: (-s[q, c], c))[:k]
        w = []
        for j, c in enumerate(order, start=1):
            col_order = sorted(range(nq), key=lambda qq: (-s[qq, c], qq))
            r = col_order.index(q) + 1
            ratio = s[q, c] / s[q].max() + s[q, c] / s[:, c].max()
            w.append(((1 - j / k) + g1 * (1 - r / nq) + g2 * ratio) * s[q, c])
        cands.append(order)
        new.append(w)
    return np.array(cands), np.array(new)


@pytest.mark.parametrize("ties", [False, True])
def test_smr_matches_equations(ties: bool) -> None:
    s = _matrix(3, ties=ties)
    k, g1, g2 = 6, 0.9, 1.9
    out = rerank(s, "smr", k=k, gamma1=g1, gamma2=g2)
    for m, keys in ((s, out.i2t), (s.T, out.t2i.T)):
        cand, new = _smr_oracle(m, k, g1, g2)
        terms = smr_terms(m, k)
        assert np.array_equal(terms.cand, cand)
        np.testing.assert_allclose(smr_combine(terms, g1, g2), new, rtol=1e-12)
        # The returned keys order the candidates by S_opt (ties kept as ties), then the rest.
        got = np.take_along_axis(keys, cand, 1)
        assert (
            np.sign(got[:, :, None] - got[:, None, :])
            == np.sign(np.round(new[:, :, None] - new[:, None, :], 12))
        ).all()
        tail = keys.copy()
        np.put_along_axis(tail, cand, -np.inf, 1)
        assert (got.min(axis=1) > tail.max(axis=1)).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12))
def test_smr_without_gammas_keeps_topk_order(seed: int, k: int) -> None:
    # With γ1 = γ2 = 0, W = 1 − j/k decreases with j, so positive scores keep their order.
    s = _matrix(seed, positive=True)
    out = rerank(s, "smr", k=k, gamma1=0.0, gamma2=0.0)
    before, _ = topk_desc(s, k)
    after = np.argsort(-out.i2t, axis=1, kind="stable")[:, :k]
    assert np.array_equal(before, after)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(TOPK_RERANKERS), st.integers(1, 12), st.booleans())
def test_rerankers_keep_topk_set_and_tail_order(seed: int, name: str, k: int, ties: bool) -> None:
    s = _matrix(seed, ties=ties)
    out = rerank(s, name, k=k)
    kk = max(10, k) if name == "mr" else k
    for m, got in ((s, out.i2t), (s.T, out.t2i.T)):
        before, _ = topk_desc(m, kk)
        after = np.argsort(-got, axis=1, kind="stable")
        assert np.array_equal(np.sort(before, 1), np.sort(after[:, :kk], 1))
        # Outside the candidates the original relative order is kept.
        tail_new = after[:, kk:]
        tail_vals = np.take_along_axis(m, tail_new, 1)
        assert (np.diff(tail_vals, axis=1) <= 0).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("table_elems", [None, 40])
def test_reverse_positions_agree_between_strategies(
    ties: bool, table_elems: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rsitr.retrieval import ordering

    if table_elems is not None:  # several row blocks, each with its own lookup tables
        monkeypatch.setattr(ordering, "_TABLE_ELEMS", table_elems)
    s = _matrix(5, ties=ties)
    rows = np.repeat(np.arange(s.shape[0]), 4)
    cols = np.random.default_rng(0).integers(0, s.shape[1], rows.size)
    st = np.ascontiguousarray(s.T)
    counted = ordering._positions_by_count(st, cols, rows, s[rows, cols])
    searched = reverse_positions(s, rows, cols)
    naive = [
        sorted(range(s.shape[0]), key=lambda q: (-s[q, c], q)).index(r)
        for r, c in zip(rows, cols, strict=True)
    ]
    assert counted.tolist() == searched.tolist() == naive


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 9), st.booleans())
def test_topk_and_positions_match_full_sorts(seed: int, k: int, ties: bool) -> None:
    from rsitr.retrieval.ordering import row_positions, row_topk

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(int(rng.integers(1, 15)), 9))
    a = np.round(a) if ties else a
    order = np.argsort(-a, axis=1, kind="stable")
    top = row_topk(a, k)
    assert np.array_equal(top.idx, order[:, :k])
    if k < a.shape[1]:
        assert np.array_equal(top.next_val, np.take_along_axis(a, order[:, k : k + 1], 1)[:, 0])
    rows = np.repeat(np.arange(a.shape[0]), a.shape[1])
    entries = np.tile(np.arange(a.shape[1]), a.shape[0])
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.arange(a.shape[1])[None, :], 1)
    assert np.array_equal(row_positions(a, rows, entries), pos.ravel())


def test_inverted_softmax_definition() -> None:
    s = _matrix(7)
    t = 0.1
    out = rerank(s, "inverted-softmax", temperature=t)
    z = s / t
    i2t = z - np.log(np.exp(z).sum(axis=0, keepdims=True))
    t2i = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out.i2t, i2t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.t2i, t2i, rtol=1e-9, atol=1e-12)


def test_inverted_softmax_fixes_a_hub() -> None:
    # Caption column 2 belongs to image 1 but image 0 is a "hub" that scores high everywhere.
    s = np.array([[0.9, 0.8, 0.85, 0.8], [0.1, 0.2, 0.8, 0.7]])
    rel = Relevance(np.array([0, 0, 1, 1]), 2)
    plain = evaluate_scores(s, rel)
    inv = rerank(s, "inverted-softmax", temperature=0.1)
    fixed = evaluate_scores(inv.i2t, rel, t2i_scores=inv.t2i)
    assert fixed.t2i["R@1"] > plain.t2i["R@1"]


def test_unknown_and_misapplied_parameters() -> None:
    s = _matrix(1)
    with pytest.raises(ConfigError, match="unknown reranker"):
        rerank(s, "nope")
    with pytest.raises(ConfigError, match="gamma1"):
        rerank(s, "mr", gamma1=1.0)
    with pytest.raises(ConfigError, match="candidate images"):
        rerank(s, "smr", k=s.shape[0] + 1)
    with pytest.raises(ConfigError, match="temperature"):
        rerank(s, "inverted-softmax", temperature=0.0)
    assert set(TOPK_RERANKERS + ["inverted-softmax", "qb-norm"]) == set(list_rerankers())


@pytest.mark.parametrize("name", ["smr", "mr"])
def test_tuning_fast_path_matches_full_evaluation(name: str) -> None:
    n, cpi = 30, 5
    rng = np.random.default_rng(0)
    s = rng.normal(size=(n, n * cpi)) + 1.5 * np.repeat(np.eye(n), cpi, axis=1)
    rel = Relevance.from_captions_per_image(n, cpi)
    res = tune_rerank(s, rel, name, ks=(10, 12), grid1=[0.5, 1.0], grid2=[0.7, 1.9])
    full = rerank(s, name, **res.params)
    assert evaluate_scores(full.i2t, rel, t2i_scores=full.t2i).mR == pytest.approx(res.val_mR)
    assert res.val_mR == max(t["mR"] for t in res.top)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(TOPK_RERANKERS), st.integers(1, 12), st.booleans())
def test_blocked_and_tiled_paths_give_identical_results(seed: int, name: str, k: int, ties: bool) -> None:
    # Tiny working blocks force many row blocks, column tiles and lookup-table blocks.
    from rsitr.retrieval import ordering

    s = _matrix(seed, ties=ties).astype(np.float32 if seed % 2 else np.float64)
    whole = rerank(s, name, k=k)
    with pytest.MonkeyPatch.context() as mp:
        for const in ("_SELECT_ELEMS", "_TABLE_ELEMS", "_CHUNK_ELEMS"):
            mp.setattr(ordering, const, 7)
        blocked = rerank(s, name, k=k)
    assert np.array_equal(whole.i2t, blocked.i2t) and np.array_equal(whole.t2i, blocked.t2i)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12), st.booleans(), st.sampled_from([2**22, 1]))
def test_column_pass_matches_the_transposed_matrix(seed: int, k: int, ties: bool, table_elems: int) -> None:
    # table_elems=1 leaves no room for row-block lookup tables: lookups go tile by tile.
    from rsitr.retrieval import ordering

    s = _matrix(seed, ties=ties)
    st_ = np.ascontiguousarray(s.T)
    rows = np.random.default_rng(seed).integers(0, s.shape[0], 50)
    cols = np.random.default_rng(seed + 1).integers(0, s.shape[1], 50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ordering, "_SELECT_ELEMS", 40)  # several column tiles
        mp.setattr(ordering, "_TABLE_ELEMS", table_elems)
        top, pos, sums = ordering.col_topk_positions(s, k, rows, cols, s[rows, cols], col_sums=True)
    ref = ordering.row_topk(st_, k)
    assert np.array_equal(top.idx, ref.idx) and np.array_equal(top.vals, ref.vals)
    assert np.array_equal(top.row_max, ref.row_max)
    assert (top.next_val is None) == (ref.next_val is None)
    if ref.next_val is not None:
        assert np.array_equal(top.next_val, ref.next_val)
    assert np.array_equal(pos, ordering.row_positions(st_, cols, rows))
    assert np.array_equal(sums, st_.sum(axis=1))


@pytest.mark.parametrize("block", [1, 7, 2**18])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverted_softmax_blocks_are_bit_identical(block: int, dtype: type) -> None:
    rerank_mod = importlib.import_module(
        "rsitr.retrieval.rerank"
    )  # the package exports a function of that name

    s = _matrix(11, n=23).astype(dtype)
    z = np.asarray(s, dtype=np.float64) / 0.1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rerank_mod, "_SOFTMAX_ELEMS", block)
        out = rerank(s, "inverted-softmax", temperature=0.1)
    assert np.array_equal(out.i2t, z - rerank_mod._logsumexp(z, axis=0))
    assert np.array_equal(out.t2i, z - rerank_mod._logsumexp(z, axis=1))
