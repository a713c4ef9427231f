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


_PASS_ELEMS = 2**18  # elements per row block of the counting pass: the block stays in cache


def _count_dtype(bound: int) -> type:
    """Smallest unsigned type for counts up to ``bound`` (narrow sums are the fastest)."""
    return np.uint16 if bound < 2**16 else np.uint32 if bound < 2**32 else np.uint64


def _counts_at_least(
    scores: np.ndarray,
    row_thr: np.ndarray | None,
    col_thr: np.ndarray | None,
    strict: bool,
    chunk_bytes: int,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Entries of each row ≥ ``row_thr`` and of each column ≥ ``col_thr`` (> if ``strict``).

    One pass over row blocks small enough to stay in cache serves both counts.

    Returns:
        ``(row_counts, col_counts)``, int64, ``None`` where no threshold was given.
    """
    n, c = scores.shape
    cmp = np.greater if strict else np.greater_equal
    rows_per = min(max(1, _PASS_ELEMS // c), _chunk_len(c, scores.itemsize, chunk_bytes))
    row_counts = None if row_thr is None else np.empty(n, dtype=np.int64)
    col_counts = None if col_thr is None else np.zeros(c, dtype=np.int64)
    mask = np.empty((min(rows_per, n), c), dtype=bool)
    row_type, col_type = _count_dtype(c), _count_dtype(rows_per)
    for s in range(0, n, rows_per):
        block = scores[s : s + rows_per]
        m = mask[: block.shape[0]]
        if row_counts is not None:
            cmp(block, row_thr[s : s + rows_per, None], out=m)  # type: ignore[index]
            row_counts[s : s + rows_per] = np.add.reduce(m.view(np.uint8), axis=1, dtype=row_type)
        if col_counts is not None:
            cmp(block, col_thr[None, :], out=m)  # type: ignore[index]
            col_counts += np.add.reduce(m.view(np.uint8), axis=0, dtype=col_type)
    return row_counts, col_counts


def gt_scores(scores: np.ndarray, rel: Relevance) -> np.ndarray:
    """(n_captions,) score of each caption with its own image: ``S[img(j), j]``."""
    return scores[rel.caption_to_image, np.arange(rel.num_captions)]


def _i2t_thresholds(scores: np.ndarray, rel: Relevance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query images, the best score of each one's captions, and how many captions tie with it."""
    images, cols, starts = rel.grouped()
    g = gt_scores(scores, rel)[cols]
    best = np.maximum.reduceat(g, starts) if g.size else np.empty(0, scores.dtype)
    counts = rel.captions_per_image[images]
    # Own captions that tie with the best one are not counted against the query.
    own_ties = (
        np.add.reduceat((g == np.repeat(best, counts)).astype(np.int64), starts)
        if g.size
        else np.zeros(0, dtype=np.int64)
    )
    return images, best, own_ties


def _i2t_from_counts(
    counts: np.ndarray, images: np.ndarray, own_ties: np.ndarray, ties: TiePolicy
) -> np.ndarray:
    """i2t ranks of the query images from each image's count of captions at/above its best."""
    ranks = counts if counts.size == images.size else counts[images]
    return ranks if ties == "optimistic" else ranks - own_ties


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
    images, best, own_ties = _i2t_thresholds(scores, rel)
    thr = np.zeros(scores.shape[0], dtype=scores.dtype)  # images without captions: discarded
    thr[images] = best
    counts, _ = _counts_at_least(scores, thr, None, ties == "optimistic", chunk_bytes)
    return _i2t_from_counts(counts, images, own_ties, ties)  # type: ignore[arg-type]


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
    _, counts = _counts_at_least(scores, None, gt_scores(scores, rel), ties == "optimistic", chunk_bytes)
    # Pessimistic: the caption's own image always satisfies >=, hence the -1.
    return counts if ties == "optimistic" else counts - 1  # type: ignore[return-value,operator]


def _both_ranks(
    scores: np.ndarray, rel: Relevance, ties: TiePolicy, chunk_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(i2t_ranks, t2i_ranks)`` of one matrix in a single pass over it."""
    images, best, own_ties = _i2t_thresholds(scores, rel)
    thr = np.zeros(scores.shape[0], dtype=scores.dtype)
    thr[images] = best
    strict = ties == "optimistic"
    rows, cols = _counts_at_least(scores, thr, gt_scores(scores, rel), strict, chunk_bytes)
    ri = _i2t_from_counts(rows, images, own_ties, ties)  # type: ignore[arg-type]
    return ri, cols if strict else cols - 1  # type: ignore[return-value,operator]


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
    if t2i_scores is None:
        ri, rt = _both_ranks(scores, rel, ties, chunk_bytes)
    else:
        ri = i2t_ranks(scores, rel, ties, chunk_bytes)
        rt = t2i_ranks(t2i_scores, rel, ties, chunk_bytes)
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
