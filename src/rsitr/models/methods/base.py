"""The method contract: what training, evaluation and the search service rely on.

A method is an ``nn.Module`` built from a frozen ``Config`` dataclass. It splits each tower in
two: a *frozen part* (``image_features`` / ``text_features``: whatever a frozen encoder
computes, cacheable on disk) and a *trainable part* (``embed_image`` / ``embed_text``).
``forward(batch)`` returns a dict of named terms; the trainer sums the keys ending in
``_loss`` (after weighting) and logs every term. ``encode_image`` / ``encode_text`` return
L2-normalised (N, D) embeddings, so evaluation and search need nothing method-specific.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError
from rsitr.models.encoders.base import ImageEncoder, TextEncoder

Features = dict[str, Tensor]
GatherFn = Callable[[Tensor], Tensor]


def merge_preset(values: dict[str, Any], presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``values`` over the settings of its ``preset`` (explicit keys win); no preset: unchanged.

    Raises:
        ConfigError: an unknown preset name.
    """
    preset = values.get("preset")
    if preset is None:
        return values
    if preset not in presets:
        raise ConfigError(f"model.preset: {preset!r} is not one of {', '.join(presets)}")
    return {**presets[preset], **values}


def identity_gather(x: Tensor) -> Tensor:
    """Single-process gather: returns ``x``."""
    return x


class RetrievalMethod(nn.Module):
    """Base class of all registered methods.

    Subclasses set ``name`` and ``Config`` and implement the four feature/embedding hooks and
    :meth:`losses`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    #: dtype of floating features in the on-disk feature cache
    cache_dtype: ClassVar[torch.dtype] = torch.float32
    #: dtype of floating text features in the cache, when it differs from ``cache_dtype``
    text_cache_dtype: ClassVar[torch.dtype | None] = None
    #: the sequence-shaped (B, L, …) outputs of :meth:`text_features`: declaring them (``()`` if
    #: none) lets feature extraction trim padding and pad these back; ``None``: never trim
    padded_text_keys: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, cfg: Any, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        # Set by the trainer under DDP: an autograd-aware all-gather over ranks.
        self.gather: GatherFn = identity_gather

    # --- preprocessing -------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize raw captions with the text encoder's tokenizer."""
        return self.text_encoder.tokenize(texts)

    @property
    def cacheable(self) -> bool:
        """True when both frozen parts are fixed functions of the input (feature cache ok)."""
        return self.image_encoder.frozen and self.text_encoder.frozen

    # --- hooks ------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Features:
        """Frozen part of the image tower: (B, 3, H, W) → named feature tensors."""
        raise NotImplementedError

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """Frozen part of the text tower: token ids → named feature tensors."""
        raise NotImplementedError

    def embed_image(self, feats: Features) -> Tensor:
        """Trainable part: image features → (B, D) embedding (not normalised)."""
        raise NotImplementedError

    def embed_text(self, feats: Features) -> Tensor:
        """Trainable part: text features → (B, D) embedding (not normalised)."""
        raise NotImplementedError

    def losses(self, img: Tensor, txt: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named loss terms from (gathered) normalised embeddings and the batch."""
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------
    def _image_feats(self, batch: dict[str, Any]) -> Features:
        if "image_feats" in batch:
            return batch["image_feats"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.image_encoder.frozen):
            return self.image_features(batch["image"])

    def _text_feats(self, batch: dict[str, Any]) -> Features:
        if "text_feats" in batch:
            return batch["text_feats"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_encoder.frozen):
            return self.text_features(batch["input_ids"], batch["attention_mask"])

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Training step terms for a batch of B image-caption pairs.

        The batch holds either raw inputs (``image``; ``input_ids``, ``attention_mask``) or
        cached frozen features (``image_feats``, ``text_feats``), plus ``image_id`` (B,).
        """
        img = F.normalize(self.embed_image(self._image_feats(batch)), dim=-1)
        txt = F.normalize(self.embed_text(self._text_feats(batch)), dim=-1)
        gathered = {k: self.gather(v) for k, v in batch.items() if k in ("image_id", "scene", "text_id")}
        return self.losses(self.gather(img), self.gather(txt), {**batch, **gathered})

    @torch.no_grad()
    def encode_image(self, images: Tensor | None = None, feats: Features | None = None) -> Tensor:
        """L2-normalised (N, D) image embeddings, from images or cached frozen features."""
        feats = self.image_features(images) if feats is None else feats
        return F.normalize(self.embed_image(feats), dim=-1)

    @torch.no_grad()
    def encode_text(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        feats: Features | None = None,
    ) -> Tensor:
        """L2-normalised (N, D) text embeddings, from token ids or cached frozen features."""
        feats = self.text_features(input_ids, attention_mask) if feats is None else feats
        return F.normalize(self.embed_text(feats), dim=-1)

    def cache_identity(self) -> dict[str, Any]:
        """Config values the frozen features depend on beyond the encoders (part of the cache key)."""
        return {}

    def image_cache_identity(self) -> dict[str, Any]:
        """What the cached image features depend on beyond the image encoder (default: both towers')."""
        return self.cache_identity()

    def text_cache_identity(self) -> dict[str, Any]:
        """What the cached text features depend on beyond the text encoder (default: both towers')."""
        return self.cache_identity()

    # --- training hooks (no-ops unless a method needs them) --------------------------------------
    def set_schedule(self, steps_per_epoch: int) -> None:
        """Called once before training with the number of optimiser steps per epoch."""

    def on_step_end(self) -> None:
        """Called after every optimiser step (EMA teachers, parameter clamps)."""

    def on_epoch_end(self) -> None:
        """Called after every training epoch."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into ``backbone`` (encoders) and ``head`` (the rest)."""
        backbone_ids = {id(p) for enc in (self.image_encoder, self.text_encoder) for p in enc.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for p in self.parameters():
            if p.requires_grad:
                groups["backbone" if id(p) in backbone_ids else "head"].append(p)
        return groups
