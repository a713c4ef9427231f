"""The encoder contract every registered image or text tower implements.

An encoder returns its global embedding, its token/patch sequence with a validity mask, and,
for images, multi-scale feature maps (4 taps at strides 4/8/16/32 or the nearest). It carries
its own preprocessing (normalisation and input size, or tokenizer and max length) and a
``frozen`` switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ImageOutput:
    """Outputs of an image encoder.

    Attributes:
        pooled: (B, num_features) global embedding.
        tokens: (B, L, token_dim) patch/spatial tokens (last stage, flattened).
        mask: (B, L) bool, True where a token is valid (all True for images).
        maps: multi-scale feature maps, each (B, C_i, H_i, W_i), shallow to deep.
    """

    pooled: Tensor
    tokens: Tensor
    mask: Tensor
    maps: list[Tensor] = field(default_factory=list)


@dataclass
class TextOutput:
    """Outputs of a text encoder.

    Attributes:
        pooled: (B, num_features) global embedding (CLS, mean-pooled or EOT, per encoder).
        tokens: (B, L, token_dim) token features.
        mask: (B, L) bool, True for real (non-padding) tokens.
    """

    pooled: Tensor
    tokens: Tensor
    mask: Tensor


class Encoder(nn.Module):
    """Shared behaviour: the ``frozen`` switch and an identity for caches and checkpoints."""

    #: the registry name the encoder was built from (e.g. ``"efficientnet-lite0"``)
    name: str = ""
    num_features: int = 0
    token_dim: int = 0

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False

    @property
    def frozen(self) -> bool:
        """Whether the encoder's parameters are frozen (no grad, eval mode)."""
        return self._frozen

    def set_frozen(self, frozen: bool = True) -> Encoder:
        """Freeze (``requires_grad=False``, kept in eval mode) or unfreeze the encoder."""
        self._frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.eval()
        return self

    def train(self, mode: bool = True) -> Encoder:
        """A frozen encoder stays in eval mode (BatchNorm/Dropout) whatever the caller asks."""
        return super().train(mode and not self._frozen)

    def identity(self) -> dict[str, Any]:
        """What determines this encoder's outputs: name, weights source, preprocessing."""
        return {"name": self.name}


class ImageEncoder(Encoder):
    """Base class of image towers.

    Attributes:
        image_size: square input size in pixels.
        mean: per-channel normalisation mean (RGB, 0–1 scale).
        std: per-channel normalisation std.
        feature_info: one dict per map in :attr:`ImageOutput.maps`: ``num_chs``, ``reduction``.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    feature_info: list[dict[str, int]]

    def forward(self, images: Tensor) -> ImageOutput:  # pragma: no cover - abstract
        """Encode (B, 3, H, W) normalised images."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        prep = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}
        return {**super().identity(), **prep}


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the trailing columns that are padding in every row of a right-padded token batch.

    Tokenizers pad to ``max_length`` so that cached features stack; a training step on raw text
    only needs the longest caption of its batch. Masked (BERT-like) and causal (CLIP) towers give
    the same outputs on the real tokens either way.
    """
    mask = batch["attention_mask"]
    if mask.ndim != 2 or mask.shape[1] == 0:
        return batch
    keep = max(1, int(mask.ne(0).sum(1).max()))
    return {k: v[:, :keep] if v.ndim == 2 and v.shape == mask.shape else v for k, v in batch.items()}


class TextEncoder(Encoder):
    """Base class of text towers.

    Attributes:
        max_length: maximum number of tokens (including special tokens).
    """

    max_length: int = 32

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Tokenize ``texts`` into ``input_ids`` and ``attention_mask`` (B, L) tensors."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:  # pragma: no cover
        """Encode tokenized text."""
        raise NotImplementedError

    def encode(self, texts: list[str], device: torch.device | str = "cpu") -> TextOutput:
        """Tokenize and encode raw strings."""
        batch = self.tokenize(texts)
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "max_length": self.max_length}


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid tokens: Σ_l m_l x_l / Σ_l m_l; (B, L, D), (B, L) → (B, D)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
