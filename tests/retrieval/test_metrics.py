"""Properties of the protocol metrics: tie policy, invariances, chunking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsitr.errors import ConfigError, DataError
from rsitr.retrieval import Relevance, evaluate_scores, i2t_ranks, t2i_ranks, validate_scores


@st.composite
def matrices(draw: st.DrawFn, tied: bool = False) -> tuple[np.ndarray, int]:
    n = draw(st.integers(2, 14))
    cpi = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, n * cpi))
    if tied:  # few distinct values → many ties
        s = np.round(s)
    return s, cpi


def _naive_ranks(s: np.ndarray, rel: Relevance, pessimistic: bool) -> tuple[list, list]:
    """Per-query loops, straight from the definition (the test's own oracle)."""
    c2i = rel.caption_to_image
    ri = []
    for i in range(s.shape[0]):
        own = np.flatnonzero(c2i == i)
        if own.size == 0:
            continue
        b = s[i, own].max()
        other = np.flatnonzero(c2i != i)
        ri.append(int(np.sum(s[i, other] >= b) if pessimistic else np.sum(s[i, other] > b)))
    rt = []
    for j in range(s.shape[1]):
        g = s[c2i[j], j]
        others = np.delete(s[:, j], c2i[j])
        rt.append(int(np.sum(others >= g) if pessimistic else np.sum(others > g)))
    return ri, rt


@settings(max_examples=60, deadline=None)
@given(matrices(tied=True), st.sampled_from(["pessimistic", "optimistic"]))
def test_ranks_match_definition_with_ties(m: tuple[np.ndarray, int], ties: str) -> None:
    s, cpi = m
    rel = Relevance.from_captions_per_image(s.shape[0], cpi)
    ri, rt = _naive_ranks(s, rel, ties == "pessimistic")
    assert i2t_ranks(s, rel, ties).tolist() == ri  # type: ignore[arg-type]
    assert t2i_ranks(s, rel, ties).tolist() == rt  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(matrices(), st.integers(0, 2**31 - 1))
def test_invariant_to_permuting_images_with_their_captions(m: tuple[np.ndarray, int], seed: int) -> None:
    s, cpi = m
    n = s.shape[0]
    rel = Relevance.from_captions_per_image(n, cpi)
    perm = np.random.default_rng(seed).permutation(n)
    cols = (perm[:, None] * cpi + np.arange(cpi)).ravel()
    a = evaluate_scores(s, rel).to_dict()
    b = evaluate_scores(s[perm][:, cols], rel).to_dict()
    assert a == b


@settings(max_examples=30, deadline=None)
@given(matrices(tied=True), st.sampled_from(["pessimistic", "optimistic"]))
def test_recall_is_monotone_in_k(m: tuple[np.ndarray, int], ties: str) -> None:
    s, cpi = m
    r = evaluate_scores(s, Relevance.from_captions_per_image(s.shape[0], cpi), ties)  # type: ignore[arg-type]
    for d in (r.i2t, r.t2i):
        assert d["R@1"] <= d["R@5"] <= d["R@10"]
    assert r.mR == pytest.approx(sum(r.i2t[k] + r.t2i[k] for k in ("R@1", "R@5", "R@10")) / 6)


@pytest.mark.parametrize("n", [11, 25])
def test_all_tied_matrix(n: int) -> None:
    s = np.zeros((n, 5 * n))
    rel = Relevance.from_captions_per_image(n, 5)
    pess = evaluate_scores(s, rel, "pessimistic")
    opt = evaluate_scores(s, rel, "optimistic")
    for d in (pess.i2t, pess.t2i):
        assert d["R@10"] == 0.0
    for d in (opt.i2t, opt.t2i):
        assert d["R@1"] == d["R@10"] == 100.0
    assert pess.ties == "pessimistic" and opt.ties == "optimistic"


def test_identical_own_captions_cost_nothing() -> None:
    # Image 0's five captions are identical (the RSICD case): tied scores among them.
    s = np.array([[0.9] * 5 + [0.1] * 5, [0.2] * 5 + [0.8] * 5])
    rel = Relevance.from_captions_per_image(2, 5)
    r = evaluate_scores(s, rel, "pessimistic")
    assert r.i2t["R@1"] == 100.0 and r.t2i["R@1"] == 100.0


def test_tie_with_other_image_caption_is_pessimistic() -> None:
    s = np.array([[0.5, 0.5, 0.1], [0.2, 0.3, 0.9]])  # caption 1 (image 1) ties image 0's own
    rel = Relevance(np.array([0, 1, 1]), 2)
    assert i2t_ranks(s, rel, "pessimistic").tolist() == [1, 0]
    assert i2t_ranks(s, rel, "optimistic").tolist() == [0, 0]


def test_any_number_of_captions_per_image() -> None:
    rel = Relevance.from_image_captions([[0, 3], [1], [2, 4, 5], []])
    s = np.full((4, 6), -1.0)
    for i, caps in enumerate([[0, 3], [1], [2, 4, 5]]):
        s[i, caps] = 1.0
    r = evaluate_scores(s, rel, keep_ranks=True)
    assert r.i2t_ranks.size == 3  # the caption-less image is not an i2t query
    assert r.i2t["R@1"] == r.t2i["R@1"] == 100.0


@settings(max_examples=25, deadline=None)
@given(matrices(tied=True), st.integers(1, 400))
def test_chunked_equals_unchunked(m: tuple[np.ndarray, int], chunk_bytes: int) -> None:
    s, cpi = m
    rel = Relevance.from_captions_per_image(s.shape[0], cpi)
    full = evaluate_scores(s, rel, keep_ranks=True)
    tiny = evaluate_scores(s, rel, keep_ranks=True, chunk_bytes=chunk_bytes)
    assert np.array_equal(full.i2t_ranks, tiny.i2t_ranks)
    assert np.array_equal(full.t2i_ranks, tiny.t2i_ranks)


def test_bad_inputs_raise_clear_errors() -> None:
    rel = Relevance.from_captions_per_image(2, 2)
    with pytest.raises(DataError, match="2-D"):
        validate_scores(np.zeros(4))
    bad = np.zeros((2, 4))
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="row 1, column 2"):
        validate_scores(bad)
    with pytest.raises(DataError, match="does not match"):
        validate_scores(np.zeros((3, 4)), rel)
    with pytest.raises(ConfigError, match="ties"):
        evaluate_scores(np.zeros((2, 4)), rel, "random")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="two images"):
        Relevance.from_image_captions([[0, 1], [1]])
