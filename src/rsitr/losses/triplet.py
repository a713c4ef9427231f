"""VSE++ hinge triplet loss on a batch of image-caption pairs."""

from __future__ import annotations

from typing import Literal

from torch import Tensor


def hinge_triplet(
    sim: Tensor,
    positives: Tensor,
    margin: float = 0.2,
    negatives: Literal["hardest", "all"] = "hardest",
) -> Tensor:
    """Bidirectional hinge triplet loss (Faghri et al., VSE++) over a batch of B pairs.

    Pair b is (image b, caption b), so ``sim[b, b]`` is its positive score. With
    c_txt[b, j] = [m − s_bb + s_bj]₊ (negative captions j of image b) and
    c_img[i, b] = [m − s_bb + s_ib]₊ (negative images i of caption b), ``hardest`` takes the
    maximum over negatives (VSE++, max-violation) and ``all`` their sum (VSE0, as AMFMN/GaLR).
    Entries that are positives (other captions of the same image) are never negatives.

    Args:
        sim: (B, B) similarities, rows images and columns captions of the same B pairs.
        positives: (B, B) bool, True where caption j describes image i (diagonal included).
        margin: the margin m.
        negatives: ``"hardest"`` or ``"all"``.

    Returns:
        Scalar loss, averaged over the B pairs.
    """
    if negatives not in ("hardest", "all"):
        raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"hinge_triplet expects a square (B, B) pair batch, got {tuple(sim.shape)}")
    pos_score = sim.diagonal()
    neg = (~positives).to(sim.dtype)
    cost_txt = (margin - pos_score[:, None] + sim).clamp_min(0) * neg
    cost_img = (margin - pos_score[None, :] + sim).clamp_min(0) * neg
    if negatives == "hardest":
        per_pair = cost_txt.amax(dim=1) + cost_img.amax(dim=0)
    else:
        per_pair = cost_txt.sum(dim=1) + cost_img.sum(dim=0)
    return per_pair.mean()


def optimized_triplet(
    sim: Tensor,
    positives: Tensor,
    margin: float = 0.2,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """CMPAGL's optimized triplet loss (Eq. 19) over a batch of B pairs.

    L = Σᵢ Σⱼ [α − s_ii + s_ij]₊ + Σⱼ Σᵢ [α − s_jj + s_ij]₊ + Σᵢ (1 − s_ii): the hinge over *all*
    in-batch negatives in both directions plus the intra-pair term that pulls every matching
    similarity towards 1. Entries that are positives (the diagonal, and other captions of the
    same image) are not negatives; Eq. 19's j = i terms are the constant α and are left out.

    Args:
        sim: (B, B) cosine similarities, rows images and columns captions of the same B pairs.
        positives: (B, B) bool, True where caption j describes image i (diagonal included).
        margin: the margin α.
        reduction: ``sum`` (Eq. 19 as printed) or ``mean`` (divided by B, for large batches).

    Returns:
        Scalar loss.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"optimized_triplet expects a square (B, B) pair batch, got {tuple(sim.shape)}")
    pos_score = sim.diagonal()
    neg = (~positives).to(sim.dtype)
    cost_txt = (margin - pos_score[:, None] + sim).clamp_min(0) * neg  # image i vs negative caption j
    cost_img = (margin - pos_score[None, :] + sim).clamp_min(0) * neg  # caption j vs negative image i
    total = cost_txt.sum() + cost_img.sum() + (1.0 - pos_score).sum()
    return total / sim.shape[0] if reduction == "mean" else total
