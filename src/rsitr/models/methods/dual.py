"""``dual``: the baseline dual encoder (the "Base" row of MSA and CMPAGL).

Image and text towers, each followed by a projection head into a joint space; trained with
symmetric multi-positive InfoNCE (learnable temperature), a VSE++ hinge triplet, or both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError
from rsitr.losses.contrastive import LearnableTemperature, batch_positives, multi_positive_infonce
from rsitr.losses.triplet import hinge_triplet
from rsitr.models.encoders.base import ImageEncoder, TextEncoder
from rsitr.models.methods.base import Features, RetrievalMethod
from rsitr.models.registry import register_method


@dataclass(frozen=True)
class DualConfig:
    """Configuration of the ``dual`` baseline.

    Attributes:
        image_encoder: image tower spec (``efficientnet-lite0``, ``resnet50``, ``clip:ViT-B-32``…).
        text_encoder: text tower spec (``minilm-l6``, ``hf:bert-base-uncased``, ``clip:…``).
        image_encoder_kwargs: extra encoder options, e.g. ``{"pool": "multi"}``.
        text_encoder_kwargs: extra encoder options.
        freeze_image: keep the image tower frozen (enables the feature cache).
        freeze_text: keep the text tower frozen.
        embed_dim: joint-space dimension.
        head: ``linear`` projection or 2-layer ``mlp`` (Linear–GELU–Dropout–Linear).
        head_hidden: hidden width of the MLP head.
        dropout: dropout on the MLP head's hidden layer.
        input_dropout: dropout on the head's input features; ``None`` uses ``dropout`` for the
            ``mlp`` head and 0 for the ``linear`` head.
        input_norm: normalise the head's input features per dimension: ``none``, ``batchnorm``
            (standardise each feature dimension; frozen multi-tap features mix very different
            scales) or ``layernorm``.
        loss: ``infonce``, ``triplet`` or ``both``.
        temperature: initial InfoNCE temperature τ.
        learn_temperature: learn τ (CLIP-style, 1/τ ≤ 100).
        margin: triplet margin.
        negatives: triplet negatives, ``hardest`` (VSE++) or ``all``.
        members: independent head pairs trained side by side on the same batches, each with its
            own loss; the embedding concatenates the members' unit embeddings / √M, so a score
            is the mean of the members' cosines (an ensemble in one checkpoint).
    """

    image_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm-l6"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    text_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze_image: bool = True
    freeze_text: bool = True
    embed_dim: int = 512
    head: Literal["linear", "mlp"] = "mlp"
    head_hidden: int = 1024
    dropout: float = 0.3
    input_dropout: float | None = None
    input_norm: Literal["none", "batchnorm", "layernorm"] = "none"
    loss: Literal["infonce", "triplet", "both"] = "infonce"
    temperature: float = 0.07
    learn_temperature: bool = True
    margin: float = 0.2
    negatives: Literal["hardest", "all"] = "hardest"
    members: int = 1

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError(f"model.members must be >= 1, got {self.members}")
        if self.head not in ("linear", "mlp"):
            raise ConfigError(f"model.head: {self.head!r} is not one of linear, mlp")
        if self.loss not in ("infonce", "triplet", "both"):
            raise ConfigError(f"model.loss: {self.loss!r} is not one of infonce, triplet, both")
        if self.negatives not in ("hardest", "all"):
            raise ConfigError(f"model.negatives: {self.negatives!r} is not one of hardest, all")
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        for name in ("dropout", "input_dropout"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.input_norm not in ("none", "batchnorm", "layernorm"):
            raise ConfigError(
                f"model.input_norm: {self.input_norm!r} is not one of none, batchnorm, layernorm"
            )  # noqa: E501


def projection_head(
    in_dim: int,
    out_dim: int,
    kind: str,
    hidden: int,
    dropout: float,
    input_dropout: float = 0.0,
    input_norm: str = "none",
) -> nn.Module:
    """[Norm →] [Dropout →] ``linear``: W x + b, or ``mlp``: Linear → GELU → Dropout → Linear."""
    if kind == "linear" and input_norm == "none" and input_dropout == 0:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = []
    if input_norm == "batchnorm":
        layers.append(nn.BatchNorm1d(in_dim, affine=False))
    elif input_norm == "layernorm":
        layers.append(nn.LayerNorm(in_dim, elementwise_affine=False))
    if input_dropout > 0:
        layers.append(nn.Dropout(input_dropout))
    if kind == "linear":
        layers.append(nn.Linear(in_dim, out_dim))
    else:
        layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers)


@register_method("dual")
class DualEncoder(RetrievalMethod):
    """Two towers + projection heads; retrieval by cosine similarity."""

    name = "dual"
    padded_text_keys = ()  # pooled only
    Config = DualConfig

    def __init__(self, cfg: DualConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__(cfg, image_encoder, text_encoder)
        in_drop = cfg.input_dropout
        if in_drop is None:
            in_drop = cfg.dropout if cfg.head == "mlp" else 0.0
        head = (cfg.head, cfg.head_hidden, cfg.dropout, in_drop, cfg.input_norm)

        def heads(in_dim: int) -> nn.Module:
            if cfg.members == 1:
                return projection_head(in_dim, cfg.embed_dim, *head)
            return _Members([projection_head(in_dim, cfg.embed_dim, *head) for _ in range(cfg.members)])

        self.image_head = heads(image_encoder.num_features)
        self.text_head = heads(text_encoder.num_features)
        self.logit_scale = LearnableTemperature(cfg.temperature)
        self.logit_scale.log_scale.requires_grad_(cfg.learn_temperature)

    def image_features(self, images: Tensor) -> Features:
        return {"pooled": self.image_encoder(images).pooled}

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        return {"pooled": self.text_encoder(input_ids, attention_mask).pooled}

    def embed_image(self, feats: Features) -> Tensor:
        return self.image_head(feats["pooled"])

    def embed_text(self, feats: Features) -> Tensor:
        return self.text_head(feats["pooled"])

    def losses(self, img: Tensor, txt: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``infonce_loss`` (multi-positive, Eq. of HarMA/PIR) and/or ``triplet_loss`` (VSE++)."""
        m = self.cfg.members
        pos = batch_positives(batch)
        out: dict[str, Tensor] = {}
        scale = self.logit_scale()
        # member k's cosines: its (unit · √M) slices of the concatenated embeddings
        sims = [a @ b.T * m for a, b in zip(img.chunk(m, dim=1), txt.chunk(m, dim=1), strict=True)]
        if self.cfg.loss in ("infonce", "both"):
            out["infonce_loss"] = sum(multi_positive_infonce(s * scale, pos) for s in sims) / m
        if self.cfg.loss in ("triplet", "both"):
            c = self.cfg
            out["triplet_loss"] = sum(hinge_triplet(s, pos, c.margin, c.negatives) for s in sims) / m
        out["logit_scale"] = scale.detach()
        return out


class _Members(nn.ModuleList):
    """M projection heads: the concatenation of their unit outputs, divided by √M."""

    def forward(self, x: Tensor) -> Tensor:
        outs = [F.normalize(head(x), dim=-1) for head in self]
        return torch.cat(outs, dim=-1) / len(outs) ** 0.5
