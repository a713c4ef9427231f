"""Rerankers: functions from a score matrix to reranked i2t and t2i score matrices.

Every reranker here is *transductive*: it looks at the whole query set (reverse retrieval or
normalisation over all other queries), and every report that uses one says so.

Conventions shared by all of them: ``S`` is (n_images, n_captions), higher is more similar.
The i2t matrix is reranked row-wise; the t2i matrix is the same function applied to ``Sᵀ``
(queries are captions) and transposed back. Top-k candidates are taken in descending order
with ties broken by the lower index. Candidates outside the top-k keep their original relative
order below every candidate. The top-k rerankers therefore return *ranking keys* (see
:func:`rsitr.retrieval.ordering.scores_with_tail`); their raw reranked scores are available from
:func:`mr_reference_matrix` and :func:`smr_terms` / :func:`smr_combine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from rsitr.errors import ConfigError
from rsitr.retrieval.ordering import reverse_positions, scores_with_tail, topk_desc


@dataclass(frozen=True)
class Reranked:
    """Reranked scores, one matrix per direction, both shaped like the input ``S``."""

    i2t: np.ndarray
    t2i: np.ndarray


@dataclass(frozen=True)
class RerankerSpec:
    """A registered reranker: its function and its parameter dataclass."""

    name: str
    fn: Callable[..., Reranked]
    params: type
    transductive: bool = True


_RERANKERS: dict[str, RerankerSpec] = {}


def register_reranker(name: str, params: type) -> Callable[[Callable[..., Reranked]], Callable]:
    """Register ``fn(S, params) -> Reranked`` under ``name``; duplicate names raise."""

    def deco(fn: Callable[..., Reranked]) -> Callable[..., Reranked]:
        if name in _RERANKERS:
            raise ValueError(f"reranker {name!r} is already registered")
        _RERANKERS[name] = RerankerSpec(name, fn, params)
        return fn

    return deco


def list_rerankers() -> list[str]:
    """Names of the registered rerankers."""
    return sorted(_RERANKERS)


def get_reranker(name: str) -> RerankerSpec:
    """Look up a reranker; unknown names raise and list the known ones."""
    try:
        return _RERANKERS[name]
    except KeyError:
        known = ", ".join(["none", *list_rerankers()])
        raise ConfigError(f"rerank: unknown reranker {name!r}; choose one of {known}") from None


def make_params(name: str, **overrides: Any) -> Any:
    """Build the parameter dataclass of reranker ``name``; ``None`` values keep the default.

    Raises:
        ConfigError: a parameter that the reranker does not take.
    """
    spec = get_reranker(name)
    allowed = {f.name for f in fields(spec.params)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(
            f"rerank {name}: parameter(s) {', '.join(unknown)} do not apply; "
            f"it takes {', '.join(sorted(allowed))}"
        )
    return spec.params(**given)


def rerank(scores: np.ndarray, name: str, params: Any = None, **overrides: Any) -> Reranked:
    """Apply reranker ``name`` to ``scores``.

    Args:
        scores: (n_images, n_captions) score matrix.
        name: a registered reranker name, or ``"none"``.
        params: its parameter dataclass; built from ``overrides`` when omitted.
        **overrides: parameter values (``None`` keeps the default).

    Returns:
        The reranked i2t and t2i matrices.
    """
    if name == "none":
        return Reranked(scores, scores)
    spec = get_reranker(name)
    if params is None:
        params = make_params(name, **overrides)
    return spec.fn(scores, params)


def _check_k(k: int, m: np.ndarray, direction: str) -> None:
    if not 1 <= k <= m.shape[1]:
        what = "captions" if direction == "i2t" else "images"
        raise ConfigError(
            f"k={k} must lie in [1, {m.shape[1]}]: {direction} has {m.shape[1]} candidate {what}"
        )


def _both_directions(scores: np.ndarray, one_way: Callable[[np.ndarray, str], np.ndarray]) -> Reranked:
    return Reranked(one_way(scores, "i2t"), one_way(np.ascontiguousarray(scores.T), "t2i").T)


# --- reverse-rank (Wang et al., MTFN-RR; GaLR's i2t_rerank / t2i_rerank) ----------------------


@dataclass(frozen=True)
class ReverseRankParams:
    """Parameters of the reverse-rank permutation rerank.

    Attributes:
        k: number of top candidates of each query that are permuted.
        t2i_group_min: MTFN-RR's original t2i variant (the best position of any caption of the
            query's image in the candidate image's ranking). GaLR, and the default, use the
            query caption's own position.
        captions_per_image: caption-group size for ``t2i_group_min`` (columns cpi·i …).
        tie_order: order among equal reverse positions, ``"reference"`` (as GaLR, NumPy's
            default sort) or ``"stable"`` (forward order).
    """

    k: int = 30
    t2i_group_min: bool = False
    captions_per_image: int = 5
    tie_order: str = "reference"

    def __post_init__(self) -> None:
        _check_tie_order(self.tie_order)


TIE_ORDERS = ("reference", "stable")


def _check_tie_order(tie_order: str) -> None:
    if tie_order not in TIE_ORDERS:
        raise ConfigError(f"tie_order: unknown {tie_order!r}; choose one of {', '.join(TIE_ORDERS)}")


def reverse_rank_one_way(
    m: np.ndarray,
    k: int,
    group: np.ndarray | None = None,
    tie_order: str = "reference",
    cand: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of ``m`` and the permutation that sorts them by reverse position.

    The reverse position of candidate c for query q is q's 0-based position in the descending
    order of column c over all queries (or, with ``group``, the minimum over q's group).
    Candidates with equal reverse positions are common (q can be first for several candidates).
    ``tie_order="reference"`` orders them exactly as the reference code does, with NumPy's
    default ``argsort`` on float64 positions (its order among equals is NumPy's, the same on a
    given NumPy build and CPU); ``"stable"`` keeps their forward order, independent of the build.

    Args:
        m: (n, C) scores, rows are queries.
        k: candidates per query.
        group: optional (n, g) query groups whose best reverse position is used.
        tie_order: ``"reference"`` or ``"stable"``, see above.
        cand: the (n, k) forward top-k, if already computed.

    Returns:
        ``(cand, perm)``: (n, k) forward top-k, and (n, k) indices into it giving the new order.
    """
    if cand is None:
        cand, _ = topk_desc(m, k)
    if group is None:
        back = reverse_positions(m, np.repeat(np.arange(m.shape[0]), k), cand.ravel())
    else:
        g = group.shape[1]
        rows = np.repeat(group, k, axis=0).ravel()  # every (q, c) pair × g group members
        cols = np.repeat(cand.ravel(), g)
        back = reverse_positions(m, rows, cols).reshape(-1, g).min(axis=1)
    back = back.reshape(cand.shape)
    if tie_order == "stable":
        perm = np.argsort(back, axis=1, kind="stable")
    else:  # the reference sorts a float64 array of positions with the default kind
        perm = np.argsort(back.astype(np.float64), axis=1)
    return cand, perm


@register_reranker("reverse-rank", ReverseRankParams)
def reverse_rank(scores: np.ndarray, p: ReverseRankParams) -> Reranked:
    """Reverse-rank rerank (MTFN-RR, reference-notes §3.1): permute each query's top-k."""

    def one_way(m: np.ndarray, direction: str) -> np.ndarray:
        _check_k(p.k, m, direction)
        group = None
        if direction == "t2i" and p.t2i_group_min:
            # m = Sᵀ: its rows are captions; column (image) order over all captions.
            # A caption's group is every caption of its image; here m's columns are images, and the
            # reverse list of an image runs over captions, so groups index m's rows.
            cpi = p.captions_per_image
            base = (np.arange(m.shape[0]) // cpi) * cpi
            group = base[:, None] + np.arange(cpi)[None, :]
        cand, perm = reverse_rank_one_way(m, p.k, group, p.tie_order)
        cand = np.take_along_axis(cand, perm, 1)
        new = np.broadcast_to(np.arange(p.k, 0, -1, dtype=np.float64), cand.shape)
        return scores_with_tail(m, cand, new)

    return _both_directions(scores, one_way)


# --- MR: GaLR's multivariate rerank (i2t_rerank_optim / t2i_rerank_optim) -------------------


@dataclass(frozen=True)
class MRParams:
    """GaLR MR parameters (defaults as GaLR's script runs it: K=30, Wp1=0.30, Wp2=1.1).

    ``tie_order`` orders candidates with equal reverse positions, see
    :func:`reverse_rank_one_way`.
    """

    k: int = 30
    wp1: float = 0.30
    wp2: float = 1.1
    tie_order: str = "reference"

    def __post_init__(self) -> None:
        _check_tie_order(self.tie_order)


def mr_reference_matrix(
    m: np.ndarray, k: int, wp1: float, wp2: float, tie_order: str = "reference"
) -> np.ndarray:
    """GaLR's ``i2t_rerank_optim`` on ``m`` (rows are queries), reproduced exactly.

    With K = max(10, k), for each query q and top-K candidate c at 0-based position j::

        R[q,c] = Wp1 · S[q,c] / Σ_q' S[q',c]  +  exp(−0.05 (j+1))  +  Wp2 · exp(−0.05 (j'+1))

    where j' is c's position after sorting the candidates by q's position in c's own ranking.
    Entries outside the top-K are 0. A zero column sum gives a zero first term (the reference
    would produce inf/NaN). The reference accumulates in a float32 matrix, and so does
    this function, term by term, so its output matches to the last bit on tie-free input.

    Returns:
        (n, C) float32 matrix.
    """
    cand, acc = mr_candidate_scores(m, k, wp1, wp2, tie_order)
    out = np.zeros(m.shape, dtype=np.float32)
    np.put_along_axis(out, cand, acc, 1)
    return out


def mr_candidate_scores(
    m: np.ndarray, k: int, wp1: float, wp2: float, tie_order: str = "reference"
) -> tuple[np.ndarray, np.ndarray]:
    """MR's top-K candidates (K = max(10, k)) and their float32 scores, see
    :func:`mr_reference_matrix`."""
    kk = max(10, k)
    m64 = np.asarray(m, dtype=np.float64)
    cand, _ = topk_desc(m64, kk)
    # Column sums of the whole matrix with pairwise summation over contiguous memory, as
    # np.sum(sim[:, c]) does in the reference.
    col_sum = np.ascontiguousarray(m64.T).sum(axis=1)
    # The reference divides by a raw column sum; a zero sum (possible with signed scores) would
    # give inf/NaN there. Here it contributes a zero saliency instead.
    den = col_sum[cand]
    num = np.take_along_axis(m64, cand, 1)
    p1 = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    j = np.arange(kk, dtype=np.float64)
    p2 = np.exp(-0.05 * (j + 1.0))
    acc = (wp1 * p1).astype(np.float32)
    acc = (acc.astype(np.float64) + p2[None, :]).astype(np.float32)
    _, perm = reverse_rank_one_way(m64, kk, tie_order=tie_order, cand=cand)
    new_pos = np.empty_like(perm)  # j' of each forward candidate
    np.put_along_axis(new_pos, perm, np.arange(kk)[None, :], 1)
    p3 = wp2 * np.exp(-0.05 * (new_pos.astype(np.float64) + 1.0))
    acc = (acc.astype(np.float64) + p3).astype(np.float32)
    return cand, acc


@register_reranker("mr", MRParams)
def mr(scores: np.ndarray, p: MRParams) -> Reranked:
    """GaLR multivariate rerank (reference-notes §3.2); non-candidates stay below in order."""

    def one_way(m: np.ndarray, direction: str) -> np.ndarray:
        _check_k(max(10, p.k), m, direction)
        cand, acc = mr_candidate_scores(m, p.k, p.wp1, p.wp2, p.tie_order)
        return scores_with_tail(m, cand, acc.astype(np.float64))

    return _both_directions(scores, one_way)


# --- SMR: CMPAGL's similarity matrix reweighting (Eq. 10–16) ---------------------------------


@dataclass(frozen=True)
class SMRParams:
    """CMPAGL SMR parameters (defaults: the paper's best, k=10, γ1=0.9, γ2=1.9)."""

    k: int = 10
    gamma1: float = 0.9
    gamma2: float = 1.9


@dataclass(frozen=True)
class SMRTerms:
    """The γ-independent parts of SMR for one direction (reusable across a γ grid)."""

    cand: np.ndarray  # (n, k) candidates, descending
    s: np.ndarray  # (n, k) their scores
    forward: np.ndarray  # (n, k) 1 − j/k
    backward: np.ndarray  # (n, k) 1 − r/Nq
    ratio: np.ndarray  # (n, k) S/max_row + S/max_col


def smr_terms(m: np.ndarray, k: int) -> SMRTerms:
    """Compute SMR's ranking and extreme-difference-ratio terms (Eq. 10–14) for rows of ``m``.

    For query q and its top-k candidate c at 1-based position j, with r the 1-based position of
    q in the descending order of column c over all Nq queries (ties by lower index):
    forward = 1 − j/k, backward = 1 − r/Nq, ratio = S[q,c]/max_c′ S[q,c′] + S[q,c]/max_q′ S[q′,c].
    A zero maximum contributes a zero ratio.
    """
    n = m.shape[0]
    cand, s = topk_desc(m, k)
    j = np.arange(1, k + 1, dtype=np.float64)
    forward = np.broadcast_to(1.0 - j / k, cand.shape)
    r = reverse_positions(m, np.repeat(np.arange(n), k), cand.ravel()).reshape(cand.shape) + 1
    backward = 1.0 - r / n
    row_max = s[:, :1].astype(np.float64)
    col_max = m.max(axis=0).astype(np.float64)[cand]
    s64 = s.astype(np.float64)
    ratio = np.divide(s64, row_max, out=np.zeros_like(s64), where=row_max != 0) + np.divide(
        s64, col_max, out=np.zeros_like(s64), where=col_max != 0
    )
    return SMRTerms(cand, s64, forward, backward, ratio)


def smr_combine(t: SMRTerms, gamma1: float, gamma2: float) -> np.ndarray:
    """S_opt = W ⊙ S with W = forward + γ1·backward + γ2·ratio (Eq. 15–16); (n, k)."""
    return (t.forward + gamma1 * t.backward + gamma2 * t.ratio) * t.s


@register_reranker("smr", SMRParams)
def smr(scores: np.ndarray, p: SMRParams) -> Reranked:
    """CMPAGL similarity matrix reweighting rerank (Eq. 10–16)."""

    def one_way(m: np.ndarray, direction: str) -> np.ndarray:
        _check_k(p.k, m, direction)
        t = smr_terms(m, p.k)
        return scores_with_tail(m, t.cand, smr_combine(t, p.gamma1, p.gamma2))

    return _both_directions(scores, one_way)


# --- inverted softmax (Smith et al. 2017; dual-softmax / query-bank normalisation family) ---


@dataclass(frozen=True)
class InvertedSoftmaxParams:
    """Inverted-softmax temperature τ (default 0.1)."""

    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    mx = x.max(axis=axis, keepdims=True)
    return mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))


@register_reranker("inverted-softmax", InvertedSoftmaxParams)
def inverted_softmax(scores: np.ndarray, p: InvertedSoftmaxParams) -> Reranked:
    """Inverted softmax: i2t = S/τ − logsumexp over images (per caption column); t2i = S/τ −
    logsumexp over captions (per image row). Each candidate is normalised by how strongly it
    matches every other query."""
    z = np.asarray(scores, dtype=np.float64) / p.temperature
    return Reranked(z - _logsumexp(z, axis=0), z - _logsumexp(z, axis=1))
