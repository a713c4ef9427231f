"""rsitr's protocol and rerankers against the GaLR reference outputs (exact)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rsitr.retrieval import Relevance, evaluate_scores, mr_reference_matrix, rerank
from tests.conftest import shared_path


def _cases() -> list[dict]:
    path = shared_path("conformance", "galr_reference_cases.json")
    return json.loads(path.read_text())["cases"]


def _recalls(d: dict) -> list[float]:
    return [d["R@1"], d["R@5"], d["R@10"]]


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return _cases()


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_metrics_match_reference_exactly(cases: list[dict], ties: str) -> None:
    for case in cases:
        s = np.array(case["similarity"])
        rel = Relevance.from_captions_per_image(case["n_images"], case["captions_per_image"])
        m = evaluate_scores(s, rel, ties, keep_ranks=True)  # type: ignore[arg-type]
        ref = case["metrics"]
        assert m.i2t_ranks.tolist() == ref["i2t_ranks"]
        assert m.t2i_ranks.tolist() == ref["t2i_ranks"]
        assert _recalls(m.i2t) == ref["i2t"] and _recalls(m.t2i) == ref["t2i"]
        assert m.i2t["medr"] == ref["i2t_medr"] and m.i2t["meanr"] == ref["i2t_meanr"]
        assert m.t2i["medr"] == ref["t2i_medr"] and m.t2i["meanr"] == ref["t2i_meanr"]
        assert m.mR == ref["mR"]
        assert m.ties == ties


def test_mr_matrices_and_recalls_match_reference(cases: list[dict]) -> None:
    for case in cases:
        s = np.array(case["similarity"])
        ref = case["mr_rerank"]
        k, w1, w2 = ref["K"], ref["Wp1"], ref["Wp2"]
        i2t = mr_reference_matrix(s, k, w1, w2)
        t2i = mr_reference_matrix(s.T, k, w1, w2).T
        np.testing.assert_allclose(i2t, np.array(ref["i2t_matrix"]), rtol=0, atol=1e-9)
        np.testing.assert_allclose(t2i, np.array(ref["t2i_matrix"]), rtol=0, atol=1e-9)
        rel = Relevance.from_captions_per_image(case["n_images"], case["captions_per_image"])
        out = rerank(s, "mr", k=k, wp1=w1, wp2=w2)
        m = evaluate_scores(out.i2t, rel, t2i_scores=out.t2i)
        assert _recalls(m.i2t) == ref["i2t"] and _recalls(m.t2i) == ref["t2i"]
        assert m.mR == ref["mR"]


def test_reverse_rank_orders_and_recalls_match_reference(cases: list[dict]) -> None:
    for case in cases:
        s = np.array(case["similarity"])
        ref = case["reverse_rank_rerank"]
        out = rerank(s, "reverse-rank", k=ref["K"])
        # Reranked scores are tie-free, so their descending order is the reranked list.
        i2t_order = np.argsort(-out.i2t, axis=1, kind="stable")
        t2i_order = np.argsort(-out.t2i, axis=0, kind="stable")
        assert i2t_order.tolist() == ref["i2t_order"]
        assert t2i_order.tolist() == ref["t2i_order"]
        rel = Relevance.from_captions_per_image(case["n_images"], case["captions_per_image"])
        m = evaluate_scores(out.i2t, rel, t2i_scores=out.t2i)
        assert _recalls(m.i2t) == ref["i2t"] and _recalls(m.t2i) == ref["t2i"]
        assert m.mR == ref["mR"]
