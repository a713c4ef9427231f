"""Retrieval metrics of the RSITR protocol, with an explicit tie policy.

Convention (AMFMN/GaLR/MSA lineage, reference-notes §1.1), generalised to any number of
captions per image:

* i2t rank of image i: the number of non-relevant captions placed before the best-scored
  caption of image i (0-based; the minimum over i's captions of their positions).
* t2i rank of caption j: the number of other images placed before j's own image.
* R@K = 100 · mean(rank < K); medr = floor(median(rank)) + 1; meanr = mean(rank) + 1;
  mR = mean of the six recalls (i2t and t2i R@1, R@5, R@10).

Tie policy: ``pessimistic`` puts a relevant candidate behind every non-relevant candidate with
an equal score, ``optimistic`` before them. Ties among an image's own captions never cost
anything. On a tie-free matrix both equal the reference code exactly.

Everything is vectorised and processed in row/column chunks so that a 10,000 × 50,000 matrix
is evaluated without materialising any other full-size array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from rsitr.errors import ConfigError, DataError
from rsitr.retrieval.relevance import Relevance

TiePolicy = Literal["pessimistic", "optimistic"]
TIE_POLICIES: tuple[str, ...] = get_args(TiePolicy)
RECALL_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_CHUNK_BYTES = 256 * 2**20


def check_ties(ties: str) -> TiePolicy:
    """Validate a tie-policy name."""
    if ties not in TIE_POLICIES:
        raise ConfigError(f"ties: unknown policy {ties!r}; choose one of {', '.join(TIE_POLICIES)}")
    return ties  # type: ignore[return-value]


def _chunk_len(other_dim: int, itemsize: int, chunk_bytes: int) -> int:
    # A chunk holds the slice itself plus two boolean masks of the same shape.
    per_line = max(1, other_dim * (itemsize + 2))
    return max(1, chunk_bytes // per_line)


def gt_scores(scores: np.ndarray, rel: Relevance) -> np.ndarray:
    """(n_captions,) score of each caption with its own image: ``S[img(j), j]``."""
    return scores[rel.caption_to_image, np.arange(rel.num_captions)]


def i2t_ranks(
    scores: np.ndarray,
    rel: Relevance,
    ties: TiePolicy = "pessimistic",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """0-based image→text ranks of the query images (images with ≥ 1 caption).

    Args:
        scores: (n_images, n_captions) score matrix, higher is more similar.
        rel: the image → captions ground truth.
        ties: tie policy, see the module docstring.
        chunk_bytes: working-memory budget per chunk.

    Returns:
        (len(rel.query_images),) int64 ranks, in the order of ``rel.query_images``.
    """
    check_ties(ties)
    images, cols, starts = rel.grouped()
    g = gt_scores(scores, rel)[cols]
    best = np.maximum.reduceat(g, starts) if g.size else np.empty(0, scores.dtype)
    counts = rel.captions_per_image[images]
    # Own captions that tie with the best one are not counted against the query.
    own_ties = np.add.reduceat((g == np.repeat(best, counts)).astype(np.int64), starts)
    ranks = np.empty(images.size, dtype=np.int64)
    step = _chunk_len(scores.shape[1], scores.itemsize, chunk_bytes)
    contiguous = images.size == scores.shape[0]
    for s in range(0, images.size, step):
        rows = slice(s, s + step) if contiguous else images[s : s + step]
        block = scores[rows]
        b = best[s : s + step, None]
        if ties == "optimistic":
            ranks[s : s + step] = np.count_nonzero(block > b, axis=1)
        else:
            ranks[s : s + step] = np.count_nonzero(block >= b, axis=1) - own_ties[s : s + step]
    return ranks


def t2i_ranks(
    scores: np.ndarray,
    rel: Relevance,
    ties: TiePolicy = "pessimistic",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """0-based text→image ranks of every caption: the position of the caption's own image.

    Args:
        scores: (n_images, n_captions) score matrix, higher is more similar.
        rel: the image → captions ground truth.
        ties: tie policy, see the module docstring.
        chunk_bytes: working-memory budget per chunk.

    Returns:
        (n_captions,) int64 ranks.
    """
    check_ties(ties)
    g = gt_scores(scores, rel)
    ranks = np.empty(rel.num_captions, dtype=np.int64)
    step = _chunk_len(scores.shape[0], scores.itemsize, chunk_bytes)
    for s in range(0, rel.num_captions, step):
        block = scores[:, s : s + step]
        gs = g[None, s : s + step]
        if ties == "optimistic":
            ranks[s : s + step] = np.add.reduce(block > gs, axis=0, dtype=np.int64)
        else:  # the caption's own image always satisfies >=, hence the -1
            ranks[s : s + step] = np.add.reduce(block >= gs, axis=0, dtype=np.int64) - 1
    return ranks


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr = floor(median) + 1 and meanr = mean + 1 of 0-based ranks."""
    n = len(ranks)
    if n == 0:
        raise DataError("no queries to evaluate")
    out = {f"R@{k}": 100.0 * int(np.count_nonzero(ranks < k)) / n for k in RECALL_KS}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def mean_recall(i2t: dict[str, float], t2i: dict[str, float]) -> float:
    """mR: the mean of the six recalls, summed i2t first (bit-identical to the reference)."""
    return (i2t["R@1"] + i2t["R@5"] + i2t["R@10"] + t2i["R@1"] + t2i["R@5"] + t2i["R@10"]) / 6.0


@dataclass
class RetrievalMetrics:
    """The protocol's metrics for one score matrix, and how they were obtained."""

    i2t: dict[str, float]
    t2i: dict[str, float]
    mR: float
    ties: str
    rerank: str = "none"
    i2t_ranks: np.ndarray | None = field(default=None, repr=False)
    t2i_ranks: np.ndarray | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: ``{"i2t": {...}, "t2i": {...}, "mR", "ties", "rerank", ...extra}``."""
        return {
            "i2t": dict(self.i2t),
            "t2i": dict(self.t2i),
            "mR": self.mR,
            "ties": self.ties,
            "rerank": self.rerank,
            **self.extra,
        }


def validate_scores(scores: np.ndarray, rel: Relevance | None = None, name: str = "scores") -> None:
    """Raise :class:`DataError` unless ``scores`` is a finite 2-D float matrix matching ``rel``."""
    if not isinstance(scores, np.ndarray) or scores.ndim != 2:
        shape = getattr(scores, "shape", None)
        raise DataError(f"expected a 2-D score matrix, got shape {shape}", path=name)
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise DataError(f"expected a real-valued matrix, got dtype {scores.dtype}", path=name)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise DataError(f"empty score matrix of shape {scores.shape}", path=name)
    if np.issubdtype(scores.dtype, np.floating):
        step = _chunk_len(scores.shape[1], 1, DEFAULT_CHUNK_BYTES)
        for s in range(0, scores.shape[0], step):
            bad = ~np.isfinite(scores[s : s + step])
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise DataError(f"non-finite value {scores[s + r, c]} at row {s + r}, column {c}", path=name)
    if rel is not None and (scores.shape[0] != rel.num_images or scores.shape[1] != rel.num_captions):
        raise DataError(
            f"score matrix shape {scores.shape} does not match "
            f"{rel.num_images} images × {rel.num_captions} captions",
            path=name,
        )


def evaluate_scores(
    scores: np.ndarray,
    rel: Relevance,
    ties: TiePolicy = "pessimistic",
    *,
    t2i_scores: np.ndarray | None = None,
    rerank: str = "none",
    keep_ranks: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> RetrievalMetrics:
    """All protocol metrics of a score matrix.

    Args:
        scores: (n_images, n_captions) scores used for i2t (and for t2i unless ``t2i_scores``).
        rel: the image → captions ground truth.
        ties: tie policy.
        t2i_scores: optional separate matrix for t2i (rerankers produce one per direction).
        rerank: name of the reranker that produced the matrices, recorded in the report.
        keep_ranks: keep the per-query rank arrays in the result.
        chunk_bytes: working-memory budget per chunk.

    Returns:
        The metrics, naming the tie policy and reranker used.
    """
    ties = check_ties(ties)
    ri = i2t_ranks(scores, rel, ties, chunk_bytes)
    rt = t2i_ranks(scores if t2i_scores is None else t2i_scores, rel, ties, chunk_bytes)
    i2t, t2i = rank_summary(ri), rank_summary(rt)
    return RetrievalMetrics(
        i2t=i2t,
        t2i=t2i,
        mR=mean_recall(i2t, t2i),
        ties=ties,
        rerank=rerank,
        i2t_ranks=ri if keep_ranks else None,
        t2i_ranks=rt if keep_ranks else None,
    )
