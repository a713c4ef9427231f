"""Rerankers: functions from a score matrix to reranked i2t and t2i score matrices.

Most rerankers here are *transductive*: they look at the whole query set (reverse retrieval or
normalisation over all other queries), and every report that uses one says so. ``qb-norm`` is
not: it normalises with a fixed *query bank* (training captions and images), so each test query
is scored alone (``RerankerSpec.transductive`` is False for it).

Conventions shared by all of them: ``S`` is (n_images, n_captions), higher is more similar.
The i2t matrix is reranked row-wise; the t2i matrix is the same function applied to ``Sᵀ``
(queries are captions) and transposed back. Top-k candidates are taken in descending order
with ties broken by the lower index. Candidates outside the top-k keep their original relative
order below every candidate. The top-k rerankers therefore return *ranking keys* (see
:func:`rsitr.retrieval.ordering.scores_with_tail`); their raw reranked scores are available from
:func:`mr_reference_matrix` and :func:`smr_terms` / :func:`smr_combine`.

The two directions share their work: one top-k of the rows and one pass over column tiles (the
columns' top-k and the i2t reverse positions) serve both, and ``Sᵀ`` is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from rsitr.errors import ConfigError
from rsitr.retrieval.ordering import (
    TopK,
    col_topk_positions,
    row_positions,
    row_topk,
    scores_with_tail,
    scores_with_tail_t,
)


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
    needs_bank: bool = False


@dataclass(frozen=True)
class QueryBank:
    """Scores of a fixed bank of queries against the test gallery (for ``qb-norm``).

    Attributes:
        text: (n_bank_captions, n_images): training captions scored against the test images
            (the t2i bank).
        image: (n_bank_images, n_captions): training images scored against the test captions
            (the i2t bank), or ``None`` to leave i2t unnormalised.
    """

    text: np.ndarray
    image: np.ndarray | None = None


_RERANKERS: dict[str, RerankerSpec] = {}


def register_reranker(
    name: str, params: type, transductive: bool = True, needs_bank: bool = False
) -> Callable[[Callable[..., Reranked]], Callable]:
    """Register ``fn(S, params) -> Reranked`` (``fn(S, params, bank)`` when ``needs_bank``)
    under ``name``; duplicate names raise."""

    def deco(fn: Callable[..., Reranked]) -> Callable[..., Reranked]:
        if name in _RERANKERS:
            raise ValueError(f"reranker {name!r} is already registered")
        _RERANKERS[name] = RerankerSpec(name, fn, params, transductive, needs_bank)
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


def rerank(
    scores: np.ndarray, name: str, params: Any = None, bank: QueryBank | None = None, **overrides: Any
) -> Reranked:
    """Apply reranker ``name`` to ``scores``.

    Args:
        scores: (n_images, n_captions) score matrix.
        name: a registered reranker name, or ``"none"``.
        params: its parameter dataclass; built from ``overrides`` when omitted.
        bank: the query bank of a non-transductive reranker (``qb-norm``).
        **overrides: parameter values (``None`` keeps the default).

    Returns:
        The reranked i2t and t2i matrices.

    Raises:
        ConfigError: a reranker that needs a query bank without one, or a bank of wrong shape.
    """
    if name == "none":
        return Reranked(scores, scores)
    spec = get_reranker(name)
    if params is None:
        params = make_params(name, **overrides)
    if not spec.needs_bank:
        return spec.fn(scores, params)
    if bank is None:
        raise ConfigError(f"rerank {name}: needs a query bank (training captions and images, scored)")
    n, c = scores.shape
    if bank.text.ndim != 2 or bank.text.shape[1] != n:
        raise ConfigError(f"rerank {name}: bank text scores: shape {bank.text.shape}, need (*, {n})")
    if bank.image is not None and (bank.image.ndim != 2 or bank.image.shape[1] != c):
        raise ConfigError(
            f"rerank {name}: query bank image scores have shape {bank.image.shape}, need (*, {c})"
        )
    return spec.fn(scores, params, bank)


def _check_k(k: int, m: np.ndarray, direction: str) -> None:
    if not 1 <= k <= m.shape[1]:
        what = "captions" if direction == "i2t" else "images"
        raise ConfigError(
            f"k={k} must lie in [1, {m.shape[1]}]: {direction} has {m.shape[1]} candidate {what}"
        )


@dataclass(frozen=True)
class _TwoWay:
    """Top-k of both directions of ``S``: i2t queries are its rows, t2i queries its columns.

    Attributes:
        s: the (n, C) scores.
        i2t: (n, k) top-k captions of each image.
        t2i: (C, k) top-k images of each caption.
        back_i2t: (n, k) each image's position in the descending order of each of its
            candidate captions' columns.
        col_sums: (C,) float64 column sums of ``S``, if asked for.
    """

    s: np.ndarray
    i2t: TopK
    t2i: TopK
    back_i2t: np.ndarray
    col_sums: np.ndarray | None

    def back_t2i(self, group: np.ndarray | None = None) -> np.ndarray:
        """(C, k) each caption's position in the order of each of its candidate images' rows."""
        return _back_positions(self.s, self.t2i.idx, self.t2i.vals, group)

    def keys(self, direction: str, cand: np.ndarray, cand_scores: np.ndarray) -> np.ndarray:
        """Ranking keys of one direction, shaped like ``S``."""
        if direction == "i2t":
            return scores_with_tail(self.s, cand, cand_scores, self.i2t.next_val)
        return scores_with_tail_t(self.s, cand, cand_scores, self.t2i.next_val)


def _two_way(scores: np.ndarray, k: int, col_sums: bool = False) -> _TwoWay:
    """Checks ``k`` for both directions, then computes a :class:`_TwoWay` (``Sᵀ`` is never copied)."""
    s = np.asarray(scores)
    _check_k(k, s, "i2t")
    _check_k(k, s.T, "t2i")
    n = s.shape[0]
    i2t = row_topk(s, k)
    queries = np.repeat(np.arange(n), k)
    t2i, back, sums = col_topk_positions(s, k, queries, i2t.idx.ravel(), i2t.vals.ravel(), col_sums)
    return _TwoWay(s, i2t, t2i, back.reshape(n, k), sums)


def _back_positions(
    mt: np.ndarray, cand: np.ndarray, vals: np.ndarray | None = None, group: np.ndarray | None = None
) -> np.ndarray:
    """(n, k) position of each query in the descending order of each of its candidates.

    Args:
        mt: (C, n) transposed scores: row c is candidate c's scores over all n queries.
        cand: (n, k) candidates of each query.
        vals: (n, k) their scores, if at hand.
        group: optional (n, g) query groups whose best position is used.
    """
    n, k = cand.shape
    if group is None:
        queries = np.repeat(np.arange(n), k)
        flat_vals = None if vals is None else vals.ravel()
        return row_positions(mt, cand.ravel(), queries, flat_vals).reshape(n, k)
    g = group.shape[1]
    rows = np.repeat(group, k, axis=0).ravel()  # every (q, c) pair × g group members
    cols = np.repeat(cand.ravel(), g)
    return row_positions(mt, cols, rows).reshape(-1, g).min(axis=1).reshape(n, k)


def _reverse_perm(back: np.ndarray, tie_order: str) -> np.ndarray:
    """(n, k) order of each row's candidates by ascending reverse position."""
    if tie_order == "stable":
        return np.argsort(back, axis=1, kind="stable")
    return np.argsort(back.astype(np.float64), axis=1)  # the reference: float64, default kind


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
        cand = row_topk(m, k).idx
    back = _back_positions(np.ascontiguousarray(m.T), cand, group=group)
    return cand, _reverse_perm(back, tie_order)


@register_reranker("reverse-rank", ReverseRankParams)
def reverse_rank(scores: np.ndarray, p: ReverseRankParams) -> Reranked:
    """Reverse-rank rerank (MTFN-RR, reference-notes §3.1): permute each query's top-k."""
    tw = _two_way(scores, p.k)
    group = None
    if p.t2i_group_min:
        # The t2i queries are captions, and the reverse list of an image runs over captions;
        # a caption's group is every caption of its image.
        cpi = p.captions_per_image
        base = (np.arange(tw.s.shape[1]) // cpi) * cpi
        group = base[:, None] + np.arange(cpi)[None, :]
    out = []
    for direction, top, back in (("i2t", tw.i2t, tw.back_i2t), ("t2i", tw.t2i, tw.back_t2i(group))):
        cand = np.take_along_axis(top.idx, _reverse_perm(back, p.tie_order), 1)
        new = np.broadcast_to(np.arange(p.k, 0, -1, dtype=np.float64), cand.shape)
        out.append(tw.keys(direction, cand, new))
    return Reranked(*out)


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


def _row_sums64(a: np.ndarray) -> np.ndarray:
    """(R,) float64 row sums, pairwise over each contiguous float64 row (as ``np.sum(sim[:, c])``
    sums a column in the reference)."""
    out = np.empty(a.shape[0])
    per = max(1, 2**21 // max(a.shape[1], 1))  # rows per float64 working block (16 MiB)
    for s in range(0, a.shape[0], per):
        out[s : s + per] = np.ascontiguousarray(a[s : s + per], dtype=np.float64).sum(axis=1)
    return out


def _mr_scores(
    vals: np.ndarray, den: np.ndarray, back: np.ndarray, wp1: float, wp2: float, tie_order: str
) -> np.ndarray:
    """(n, K) float32 MR scores of the forward top-K, see :func:`mr_reference_matrix`.

    Args:
        vals: (n, K) candidate scores, descending.
        den: (n, K) float64 column sums of the candidates.
        back: (n, K) reverse positions of the candidates.
    """
    kk = vals.shape[1]
    num = vals.astype(np.float64)
    # The reference divides by a raw column sum; a zero sum (possible with signed scores) would
    # give inf/NaN there. Here it contributes a zero saliency instead.
    p1 = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    j = np.arange(kk, dtype=np.float64)
    p2 = np.exp(-0.05 * (j + 1.0))
    acc = (wp1 * p1).astype(np.float32)
    acc = (acc.astype(np.float64) + p2[None, :]).astype(np.float32)
    perm = _reverse_perm(back, tie_order)
    new_pos = np.empty_like(perm)  # j' of each forward candidate
    np.put_along_axis(new_pos, perm, np.arange(kk)[None, :], 1)
    p3 = wp2 * np.exp(-0.05 * (new_pos.astype(np.float64) + 1.0))
    return (acc.astype(np.float64) + p3).astype(np.float32)


def mr_candidate_scores(
    m: np.ndarray, k: int, wp1: float, wp2: float, tie_order: str = "reference"
) -> tuple[np.ndarray, np.ndarray]:
    """MR's top-K candidates (K = max(10, k)) and their float32 scores, see
    :func:`mr_reference_matrix`."""
    top = row_topk(m, max(10, k))
    mt = np.ascontiguousarray(m.T)
    # Column sums of the whole matrix with pairwise summation over contiguous float64 memory,
    # as np.sum(sim[:, c]) does in the reference.
    den = _row_sums64(mt)[top.idx]
    back = _back_positions(mt, top.idx, top.vals)
    return top.idx, _mr_scores(top.vals, den, back, wp1, wp2, tie_order)


@register_reranker("mr", MRParams)
def mr(scores: np.ndarray, p: MRParams) -> Reranked:
    """GaLR multivariate rerank (reference-notes §3.2); non-candidates stay below in order."""
    tw = _two_way(scores, max(10, p.k), col_sums=True)
    out = []
    for direction, top, back, sums in (
        ("i2t", tw.i2t, tw.back_i2t, tw.col_sums),
        ("t2i", tw.t2i, tw.back_t2i(), _row_sums64(tw.s)),  # t2i's columns are S's rows
    ):
        acc = _mr_scores(top.vals, sums[top.idx], back, p.wp1, p.wp2, p.tie_order)  # type: ignore[index]
        out.append(tw.keys(direction, top.idx, acc.astype(np.float64)))
    return Reranked(*out)


# --- SMR: CMPAGL's similarity matrix reweighting (Eq. 10–16) ---------------------------------


@dataclass(frozen=True)
class SMRParams:
    """CMPAGL SMR parameters: γ1 = 0.9, γ2 = 1.9 are the paper's best (its grid search on RSITMD,
    §IV-D); the paper gives no K, so k = 10 is our choice (the K of MR/GaLR's reranking code);
    tune it on a validation split with ``rsitr tune-rerank``."""

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


def _smr_terms(top: TopK, back: np.ndarray, col_max: np.ndarray) -> SMRTerms:
    """SMR terms from the top-k, their 0-based reverse positions and their columns' maxima."""
    n, k = top.idx.shape
    j = np.arange(1, k + 1, dtype=np.float64)
    forward = np.broadcast_to(1.0 - j / k, top.idx.shape)
    backward = 1.0 - (back + 1) / n
    row_max = top.vals[:, :1].astype(np.float64)
    col_max = col_max.astype(np.float64)
    s64 = top.vals.astype(np.float64)
    ratio = np.divide(s64, row_max, out=np.zeros_like(s64), where=row_max != 0) + np.divide(
        s64, col_max, out=np.zeros_like(s64), where=col_max != 0
    )
    return SMRTerms(top.idx, s64, forward, backward, ratio)


def smr_terms(m: np.ndarray, k: int) -> SMRTerms:
    """Compute SMR's ranking and extreme-difference-ratio terms (Eq. 10–14) for rows of ``m``.

    For query q and its top-k candidate c at 1-based position j, with r the 1-based position of
    q in the descending order of column c over all Nq queries (ties by lower index):
    forward = 1 − j/k, backward = 1 − r/Nq, ratio = S[q,c]/max_c′ S[q,c′] + S[q,c]/max_q′ S[q′,c].
    A zero maximum contributes a zero ratio.
    """
    top = row_topk(m, k)
    mt = np.ascontiguousarray(m.T)
    back = _back_positions(mt, top.idx, top.vals)
    return _smr_terms(top, back, mt.max(axis=1)[top.idx])


def _smr_both(tw: _TwoWay) -> tuple[SMRTerms, SMRTerms]:
    # The maximum of an i2t candidate's column is that caption's top t2i score, and back.
    i2t = _smr_terms(tw.i2t, tw.back_i2t, tw.t2i.row_max[tw.i2t.idx])
    t2i = _smr_terms(tw.t2i, tw.back_t2i(), tw.i2t.row_max[tw.t2i.idx])
    return i2t, t2i


def smr_terms_both(scores: np.ndarray, k: int) -> tuple[SMRTerms, SMRTerms]:
    """``(smr_terms(S, k), smr_terms(Sᵀ, k))``, sharing the work between the two directions."""
    return _smr_both(_two_way(scores, k))


def smr_combine(t: SMRTerms, gamma1: float, gamma2: float) -> np.ndarray:
    """S_opt = W ⊙ S with W = forward + γ1·backward + γ2·ratio (Eq. 15–16); (n, k)."""
    return (t.forward + gamma1 * t.backward + gamma2 * t.ratio) * t.s


@register_reranker("smr", SMRParams)
def smr(scores: np.ndarray, p: SMRParams) -> Reranked:
    """CMPAGL similarity matrix reweighting rerank (Eq. 10–16)."""
    tw = _two_way(scores, p.k)
    ti, tt = _smr_both(tw)
    return Reranked(
        tw.keys("i2t", ti.cand, smr_combine(ti, p.gamma1, p.gamma2)),
        tw.keys("t2i", tt.cand, smr_combine(tt, p.gamma1, p.gamma2)),
    )


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


_SOFTMAX_ELEMS = 2**18  # elements per row block: its temporaries stay in cache


@register_reranker("inverted-softmax", InvertedSoftmaxParams)
def inverted_softmax(scores: np.ndarray, p: InvertedSoftmaxParams) -> Reranked:
    """Inverted softmax: i2t = S/τ − logsumexp over images (per caption column); t2i = S/τ −
    logsumexp over captions (per image row). Each candidate is normalised by how strongly it
    matches every other query.

    Computed in row blocks, bit for bit as ``z − logsumexp(z, axis)`` on the whole of
    ``z = S/τ`` in float64: row reductions are per row, and the column sums add the rows in
    order, as NumPy's reduction over axis 0 of a C-ordered matrix does.
    """
    n, c = scores.shape
    # With a single column NumPy would sum pairwise instead: keep one block there.
    rows_per = n if c < 2 else max(1, _SOFTMAX_ELEMS // c)
    i2t = np.empty((n, c))  # z until the column normalisers are known
    t2i = np.empty((n, c))
    col_max = np.full(c, -np.inf)
    for s in range(0, n, rows_per):
        z = np.divide(scores[s : s + rows_per], p.temperature, out=i2t[s : s + rows_per], dtype=np.float64)
        np.maximum(col_max, z.max(axis=0), out=col_max)
        np.subtract(z, _logsumexp(z, axis=1), out=t2i[s : s + rows_per])
    buf = np.empty((min(rows_per, n) + 1, c))  # row 0 carries the running column sums
    col_sum = None
    for s in range(0, n, rows_per):
        z = i2t[s : s + rows_per]
        e = buf[1 : z.shape[0] + 1]
        np.exp(np.subtract(z, col_max, out=e), out=e)
        if col_sum is None:
            col_sum = e.sum(axis=0)
        else:
            buf[0] = col_sum
            col_sum = buf[: z.shape[0] + 1].sum(axis=0)
    i2t -= col_max + np.log(col_sum)  # type: ignore[arg-type]
    return Reranked(i2t, t2i)


# --- QB-Norm with dynamic inverted softmax (Bogolin et al., CVPR 2022): non-transductive ---


@dataclass(frozen=True)
class QBNormParams:
    """QB-Norm's inverse temperature β (default 20) and activation top-k (default 1)."""

    beta: float = 20.0
    k: int = 1

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")


def dynamic_inverted_softmax(queries: np.ndarray, bank: np.ndarray, beta: float, k: int) -> np.ndarray:
    """Dynamic inverted softmax (QB-Norm Eq. 4-5) of (n_queries, n_gallery) scores.

    A gallery item is *activated* when it is among the top-``k`` of some bank query (a hub).
    A query whose top-1 item is activated gets ``β·s(q, g) − log Σ_b exp(β·s(b, g))`` over the
    bank queries b; any other query keeps its raw scores. Each row depends only on itself and
    the bank, never on the other test queries.
    """
    q = queries.astype(np.float64)
    b = bank.astype(np.float64) * beta
    n_gallery = q.shape[1]
    k = min(k, n_gallery)
    active = np.zeros(n_gallery, dtype=bool)
    if k < n_gallery:
        active[np.argpartition(-b, k - 1, axis=1)[:, :k].reshape(-1)] = True
    else:
        active[:] = len(b) > 0
    mx = b.max(axis=0)
    lse = mx + np.log(np.exp(b - mx).sum(axis=0))  # (n_gallery,)
    hit = active[q.argmax(axis=1)]
    out = q.copy()
    out[hit] = beta * q[hit] - lse
    return out


@register_reranker("qb-norm", QBNormParams, transductive=False, needs_bank=True)
def qb_norm(scores: np.ndarray, p: QBNormParams, bank: QueryBank) -> Reranked:
    """QB-Norm with dynamic inverted softmax and a fixed query bank (non-transductive).

    t2i: caption queries over test images, normalised by the bank of training captions; i2t:
    image queries over test captions, normalised by the bank of training images (raw when the
    bank has none).
    """
    t2i = dynamic_inverted_softmax(scores.T, bank.text, p.beta, p.k).T
    if bank.image is None:
        i2t = scores.astype(np.float64)
    else:
        i2t = dynamic_inverted_softmax(scores, bank.image, p.beta, p.k)
    return Reranked(np.ascontiguousarray(i2t), np.ascontiguousarray(t2i))
