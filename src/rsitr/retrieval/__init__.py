"""Retrieval protocol: scores, metrics with an explicit tie policy, and rerankers."""

from rsitr.retrieval.metrics import (
    TIE_POLICIES,
    RetrievalMetrics,
    evaluate_scores,
    i2t_ranks,
    mean_recall,
    rank_summary,
    t2i_ranks,
    validate_scores,
)
from rsitr.retrieval.relevance import Relevance
from rsitr.retrieval.rerank import (
    InvertedSoftmaxParams,
    MRParams,
    Reranked,
    ReverseRankParams,
    SMRParams,
    get_reranker,
    list_rerankers,
    make_params,
    mr_reference_matrix,
    rerank,
    smr_combine,
    smr_terms,
)

__all__ = [
    "TIE_POLICIES",
    "InvertedSoftmaxParams",
    "MRParams",
    "Relevance",
    "Reranked",
    "RetrievalMetrics",
    "ReverseRankParams",
    "SMRParams",
    "evaluate_scores",
    "get_reranker",
    "i2t_ranks",
    "list_rerankers",
    "make_params",
    "mean_recall",
    "mr_reference_matrix",
    "rank_summary",
    "rerank",
    "smr_combine",
    "smr_terms",
    "t2i_ranks",
    "validate_scores",
]
