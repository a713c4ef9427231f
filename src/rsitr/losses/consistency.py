"""Cross-scale consistency: distilling one score matrix's distribution into another (MSA, Eq. 16)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor


def score_distribution_kl(
    student: Tensor,
    teacher: Tensor,
    mu: float = 2.0,
    axis: Literal["row", "column"] = "row",
) -> Tensor:
    """KL between the softmax distributions of two (B_img, B_txt) score matrices (MSA Eq. 16).

    L_MMC(mⁱ, mⁿ) = 1/b Σ_j KL(Softmax(mⁿ_j / μ) ‖ Softmax(mⁱ_j / μ)), j over rows (``"row"``,
    as Eq. 16 writes it) or over columns (``"column"``, as the reference code's softmax does).
    The teacher mⁿ is detached, so no gradient reaches it; KL is taken teacher-to-student, as
    ``F.kl_div(log p_student, p_teacher)`` computes it (Eq. 16 leaves the order implicit).

    Args:
        student: (B_img, B_txt) scores of a smaller scale, mⁱ.
        teacher: (B_img, B_txt) scores of the largest scale, mⁿ (detached here).
        mu: the softmax temperature μ.
        axis: which axis the softmax runs over.

    Returns:
        Scalar, averaged over the B rows (or columns); zero when ``student == teacher``.
    """
    if axis not in ("row", "column"):
        raise ValueError(f"axis must be 'row' or 'column', got {axis!r}")
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    dim = 1 if axis == "row" else 0
    log_p = F.log_softmax(student / mu, dim=dim)
    log_q = F.log_softmax(teacher.detach() / mu, dim=dim)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim)  # one KL per row (or column)
    return kl.mean()
