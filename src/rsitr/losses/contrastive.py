"""Symmetric InfoNCE with multi-positive targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def positives_from_ids(img_ids: Tensor, txt_img_ids: Tensor | None = None) -> Tensor:
    """(B_img, B_txt) bool matrix: True where the caption describes the image.

    Captions of the same image in a batch are all positives, so a batch holding several captions
    of one image (or an image twice) never treats a true match as a negative.
    """
    txt_img_ids = img_ids if txt_img_ids is None else txt_img_ids
    return img_ids[:, None] == txt_img_ids[None, :]


def batch_positives(batch: dict[str, Tensor], gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(B, B) bool positives of a training batch: same ``image_id``, or, when the batch carries
    ``text_id`` (``data.duplicate_captions: positive``), the same caption text word for word.

    Args:
        batch: holds ``image_id`` (B,) and optionally ``text_id`` (B,).
        gather: applied to both id tensors first (the DDP all-gather), if given.
    """
    g = gather or (lambda x: x)
    pos = positives_from_ids(g(batch["image_id"]))
    if "text_id" in batch:
        pos = pos | positives_from_ids(g(batch["text_id"]))
    return pos


def multi_positive_infonce(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE with soft multi-positive targets (HarMA / PIR style).

    With P the positive mask and targets y = P / Σ P per row (per column for t2i),
    L = ½ [ −Σ_j y_ij log softmax_j(s_ij) − Σ_i y_ij log softmax_i(s_ij) ], averaged over queries.

    Args:
        logits: (B_img, B_txt) scaled similarities s = sim / τ.
        positives: (B_img, B_txt) bool positive mask; every row and column has ≥ 1 positive.

    Returns:
        Scalar loss.
    """
    p = positives.to(logits.dtype)
    t_i2t = p / p.sum(1, keepdim=True).clamp_min(1.0)
    t_t2i = p / p.sum(0, keepdim=True).clamp_min(1.0)
    l_i2t = -(t_i2t * F.log_softmax(logits, dim=1)).sum(1)
    l_t2i = -(t_t2i * F.log_softmax(logits, dim=0)).sum(0)
    rows = positives.any(1)
    cols = positives.any(0)
    return 0.5 * (l_i2t[rows].mean() + l_t2i[cols].mean())


class LearnableTemperature(torch.nn.Module):
    """τ = exp(−θ), learnable, clamped so 1/τ ≤ ``max_scale`` (CLIP's 100)."""

    def __init__(self, init: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        if not 0 < init < 1:
            raise ValueError(f"temperature init must lie in (0, 1), got {init}")
        self.log_scale = torch.nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(init)))))
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        """The logit scale 1/τ."""
        return self.log_scale.exp().clamp(max=self.max_scale)


def queue_infonce(
    img: Tensor,
    txt: Tensor,
    img_ids: Tensor,
    img_keys: Tensor,
    txt_keys: Tensor,
    key_ids: Tensor,
    scale: Tensor | float,
    text_ids: Tensor | None = None,
    key_text_ids: Tensor | None = None,
) -> Tensor:
    """Momentum-queue ITC (CMPAGL Eq. 18, MoCo/ALBEF style) with multi-positive targets.

    Queries are the online embeddings; keys are the momentum embeddings of the batch followed by
    the queue. Every key whose image id equals the query's is a positive (the pair itself, other
    captions of the image in the batch, and its in-queue duplicates), never a negative; keys with
    id < 0 are empty queue slots and are ignored.

    Args:
        img: (B, D) normalised online image embeddings (i2t queries).
        txt: (B, D) normalised online caption embeddings (t2i queries).
        img_ids: (B,) image id of each pair.
        img_keys: (M, D) momentum image embeddings (batch + queue).
        txt_keys: (M, D) momentum caption embeddings (batch + queue).
        key_ids: (M,) image id of each key pair (−1: empty).
        scale: the logit scale 1/τ.
        text_ids: (B,) caption text id of each pair (``data.duplicate_captions: positive``): keys
            whose caption is word for word the query's are positives too.
        key_text_ids: (M,) caption text id of each key (−1: unknown).

    Returns:
        Scalar: ½ (L_i2t + L_t2i), each averaged over the B queries.
    """
    pos = img_ids[:, None] == key_ids[None, :]  # (B, M)
    if text_ids is not None and key_text_ids is not None:
        pos = pos | ((text_ids[:, None] == key_text_ids[None, :]) & (key_text_ids >= 0)[None, :])
    empty = (key_ids < 0)[None, :]
    targets = pos.to(img.dtype) / pos.sum(1, keepdim=True).clamp_min(1).to(img.dtype)

    def one_way(q: Tensor, keys: Tensor) -> Tensor:
        logits = (q @ keys.T * scale).masked_fill(empty, float("-inf"))
        log_p = F.log_softmax(logits, dim=1).masked_fill(empty, 0.0)
        return -(targets * log_p).sum(1).mean()

    return 0.5 * (one_way(img, txt_keys) + one_way(txt, img_keys))
