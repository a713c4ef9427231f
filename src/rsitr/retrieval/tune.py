"""Grid search of reranker parameters on a *validation* score matrix.

The γ-independent parts of each reranker (top-k, reverse positions) are computed once per k;
each grid point then only recombines (n, k) arrays and scores recalls on the candidates.
QB-Norm (non-transductive) searches its β and activation k against a fixed query bank.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsitr.errors import ConfigError
from rsitr.retrieval.metrics import RECALL_KS, TiePolicy, check_ties, evaluate_scores
from rsitr.retrieval.relevance import Relevance
from rsitr.retrieval.rerank import (
    MRParams,
    QBNormParams,
    QueryBank,
    SMRParams,
    rerank,
    smr_combine,
    smr_terms_both,
)

logger = logging.getLogger(__name__)

PAPER_GRID: tuple[float, ...] = tuple(round(0.5 + 0.1 * i, 1) for i in range(16))  # 0.5 … 2.0
MR_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))  # 0.1 … 2.0
QB_BETA_GRID: tuple[float, ...] = (2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 40.0)  # QB-Norm's β
TUNABLE = ("smr", "mr", "qb-norm")


@dataclass
class TuneResult:
    """Best parameters found, with the validation mR before and after reranking."""

    rerank: str
    params: dict[str, Any]
    val_mR: float
    baseline_mR: float
    ties: str
    grid: dict[str, list[Any]]
    top: list[dict[str, Any]] = field(default_factory=list)
    transductive: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-ready dict."""
        return {
            "rerank": self.rerank,
            "params": self.params,
            "val_mR": self.val_mR,
            "baseline_mR": self.baseline_mR,
            "ties": self.ties,
            "transductive": self.transductive,
            "grid": self.grid,
            "top": self.top,
        }


def _candidate_ranks(cand: np.ndarray, new: np.ndarray, relevant: np.ndarray, ties: TiePolicy) -> np.ndarray:
    """Ranks inside the top-k (k ≥ 10); a query with no relevant candidate gets rank k."""
    k = cand.shape[1]
    best = np.where(relevant, new, -np.inf).max(axis=1, keepdims=True)
    nonrel = ~relevant
    above = (new > best) if ties == "optimistic" else (new >= best)
    ranks = np.count_nonzero(above & nonrel, axis=1)
    return np.where(np.isfinite(best[:, 0]), ranks, k)


def _recall_sum(ranks: np.ndarray) -> float:
    return sum(100.0 * int(np.count_nonzero(ranks < kk)) / ranks.size for kk in RECALL_KS)


def _grid_mr(
    scores: np.ndarray, rel: Relevance, ties: TiePolicy, k: int, g1: Sequence[float], g2: Sequence[float]
) -> Iterable[tuple[dict[str, Any], float]]:
    # MR's output is linear in (Wp1, Wp2) only up to float32 rounding, so recompute per point;
    # top-k and reverse positions are cheap at validation size.
    for w1, w2 in itertools.product(g1, g2):
        p = MRParams(k=k, wp1=w1, wp2=w2)
        out = rerank(scores, "mr", p)
        m = evaluate_scores(out.i2t, rel, ties, t2i_scores=out.t2i)
        yield {"k": k, "wp1": w1, "wp2": w2}, m.mR


def _grid_smr(
    scores: np.ndarray, rel: Relevance, ties: TiePolicy, k: int, g1: Sequence[float], g2: Sequence[float]
) -> Iterable[tuple[dict[str, Any], float]]:
    if k < max(RECALL_KS):  # recalls then depend on the tail: evaluate the full matrices
        for a, b in itertools.product(g1, g2):
            out = rerank(scores, "smr", SMRParams(k=k, gamma1=a, gamma2=b))
            yield (
                {"k": k, "gamma1": a, "gamma2": b},
                evaluate_scores(out.i2t, rel, ties, t2i_scores=out.t2i).mR,
            )
        return
    c2i = rel.caption_to_image
    has_caps = rel.captions_per_image > 0
    ti, tt = smr_terms_both(scores, k)
    rel_i = c2i[ti.cand] == np.arange(scores.shape[0])[:, None]
    rel_t = tt.cand == c2i[:, None]
    for a, b in itertools.product(g1, g2):
        ri = _candidate_ranks(ti.cand, smr_combine(ti, a, b), rel_i, ties)[has_caps]
        rt = _candidate_ranks(tt.cand, smr_combine(tt, a, b), rel_t, ties)
        yield {"k": k, "gamma1": a, "gamma2": b}, (_recall_sum(ri) + _recall_sum(rt)) / 6.0


def _grid_qb_norm(
    scores: np.ndarray, rel: Relevance, ties: TiePolicy, k: int, betas: Sequence[float], bank: QueryBank
) -> Iterable[tuple[dict[str, Any], float]]:
    for beta in betas:
        out = rerank(scores, "qb-norm", QBNormParams(beta=beta, k=k), bank=bank)
        yield {"k": k, "beta": beta}, evaluate_scores(out.i2t, rel, ties, t2i_scores=out.t2i).mR


def tune_rerank(
    scores: np.ndarray,
    rel: Relevance,
    rerank_name: str,
    ks: Sequence[int] = (10, 20, 30),
    ties: TiePolicy = "pessimistic",
    grid1: Sequence[float] | None = None,
    grid2: Sequence[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    bank: QueryBank | None = None,
) -> TuneResult:
    """Grid-search a reranker's parameters to maximise validation mR.

    SMR searches γ1, γ2 over 0.5–2.0 in steps of 0.1 (the paper's grid); MR searches Wp1, Wp2
    over 0.1–2.0. Both search k over ``ks``. QB-Norm searches β over ``grid1`` (default
    2.5–40) and its activation top-k over ``ks``, scoring against ``bank`` (the training
    split's queries): each val query stays scored alone. Ties between grid points keep the
    first one found.

    Args:
        scores: (n_images, n_captions) validation scores. Never tune on test.
        rel: its ground truth.
        rerank_name: ``"smr"``, ``"mr"`` or ``"qb-norm"``.
        ks: candidate-list sizes to try.
        ties: tie policy of the metrics.
        grid1: values of γ1 / Wp1 (defaults above).
        grid2: values of γ2 / Wp2 (defaults above).
        progress: optional callback ``(done, total)``.
        bank: QB-Norm's query bank (required for it, unused by the others).

    Returns:
        The best parameters and the validation mR before and after.
    """
    ties = check_ties(ties)
    if rerank_name not in TUNABLE:
        raise ConfigError(f"rerank: can tune {', '.join(TUNABLE)}, not {rerank_name!r}")
    n_cand = min(scores.shape)
    for k in ks:
        if not 1 <= k <= n_cand:
            raise ConfigError(f"k={k} must lie in [1, {n_cand}] for a {scores.shape} matrix")
    if rerank_name == "qb-norm":
        if bank is None:
            raise ConfigError("rerank qb-norm: tuning needs a query bank (--bank TRAIN.npz)")
        g1, g2 = list(grid1 or QB_BETA_GRID), [None]
        for beta in g1:
            QBNormParams(beta=beta)  # a clear error for β ≤ 0
    else:
        default = PAPER_GRID if rerank_name == "smr" else MR_GRID
        g1, g2 = list(grid1 or default), list(grid2 or default)
    baseline = evaluate_scores(scores, rel, ties).mR
    total = len(ks) * len(g1) * len(g2)
    results: list[tuple[float, dict[str, Any]]] = []
    for k in ks:
        if rerank_name == "qb-norm":
            points = _grid_qb_norm(scores, rel, ties, k, g1, bank)  # type: ignore[arg-type]
        else:
            points = (_grid_smr if rerank_name == "smr" else _grid_mr)(scores, rel, ties, k, g1, g2)
        for params, score in points:
            results.append((score, params))
            if progress is not None:
                progress(len(results), total)
    order = sorted(range(len(results)), key=lambda i: (-results[i][0], i))
    best_score, best = results[order[0]]
    logger.info("best %s %s: val mR %.3f (baseline %.3f)", rerank_name, best, best_score, baseline)
    if rerank_name == "qb-norm":
        grid: dict[str, list[Any]] = {"k": list(ks), "beta": g1}
    else:
        names = ("gamma1", "gamma2") if rerank_name == "smr" else ("wp1", "wp2")
        grid = {"k": list(ks), names[0]: g1, names[1]: g2}
    return TuneResult(
        rerank=rerank_name,
        params=best,
        val_mR=best_score,
        baseline_mR=baseline,
        ties=ties,
        grid=grid,
        top=[{**results[i][1], "mR": results[i][0]} for i in order[:10]],
        transductive=rerank_name != "qb-norm",
    )


__all__ = ["MR_GRID", "PAPER_GRID", "QB_BETA_GRID", "TuneResult", "tune_rerank"]
