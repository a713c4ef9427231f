"""``dual``: the baseline dual encoder (the "Base" row of MSA and CMPAGL).

Image and text towers, each followed by a projection head into a joint space; trained with
symmetric multi-positive InfoNCE (learnable temperature), a VSE++ hinge triplet, or both.
With ``text_tune_layers = k`` the top k transformer layers of a BERT-like text tower move out of
the frozen encoder and are fine-tuned: the frozen prefix's hidden states are what the feature
cache stores, so a CPU step runs only the k layers (partial fine-tuning from a cached prefix).
``image_tune_stages = k`` does the same for EfficientNet-Lite0: its head convolution, and the last
k − 1 stages before it, are fine-tuned on the cached map of the frozen prefix (7×7 at 224 px).
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
from rsitr.models.encoders.base import ImageEncoder, TextEncoder, masked_mean
from rsitr.models.encoders.efficientnet import LiteTop, split_lite_top
from rsitr.models.encoders.hf_text import additive_mask
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
        text_tune_layers: fine-tune the top k layers of a BERT-like text tower (``minilm-l6``,
            ``hf:``) from its cached frozen prefix; 0 keeps the whole tower frozen. Their learning
            rate is ``optim.backbone_lr``.
        image_tune_stages: fine-tune the last k units of an ``efficientnet-lite0`` tower (1: the
            head convolution; 2, 3: also the last 1, 2 stages) from its cached prefix map; 0 keeps
            it frozen. Their learning rate is ``optim.backbone_lr``.
        tune_autocast: run the fine-tuned text layers under bfloat16 autocast (CPU and GPU); the
            image units follow the tower's ``precision``.
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
    text_tune_layers: int = 0
    image_tune_stages: int = 0
    tune_autocast: bool = True

    def __post_init__(self) -> None:
        for name in ("text_tune_layers", "image_tune_stages"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
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


STRONG_BASE_HEAD: dict[str, Any] = {
    "kind": "mlp",
    "hidden": 1024,
    "dropout": 0.3,
    "input_dropout": 0.3,
    "input_norm": "batchnorm",
}
"""The head of the strong base (``configs/rsicd_offline.yaml``): an MLP on standardised inputs."""


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
        self.text_top: nn.ModuleList | None = None
        self.image_top: LiteTop | None = None
        if cfg.text_tune_layers:
            self.text_top = split_top_layers(text_encoder, cfg.text_tune_layers)
            # the cached prefix is a padded (M, L, hidden) sequence: trimmed, and stored in fp16
            self.padded_text_keys = ("tokens", "mask")
            self.text_cache_dtype = torch.float16
        if cfg.image_tune_stages:
            self.image_top = split_lite_top(image_encoder, cfg.image_tune_stages)
            self.cache_dtype = torch.float16  # the cached (N, C, 7, 7) prefix maps
            if self.text_top is None:
                self.text_cache_dtype = torch.float32

    def image_features(self, images: Tensor) -> Features:
        if self.image_top is not None:
            return self.image_encoder.prefix(images)  # type: ignore[operator]
        return {"pooled": self.image_encoder(images).pooled}

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        out = self.text_encoder(input_ids, attention_mask)
        if self.text_top is None:
            return {"pooled": out.pooled}
        return {"tokens": out.tokens, "mask": out.mask.to(torch.uint8)}

    def embed_image(self, feats: Features) -> Tensor:
        if self.image_top is not None:
            return self.image_head(self.image_top(feats))
        return self.image_head(feats["pooled"])

    def embed_text(self, feats: Features) -> Tensor:
        if self.text_top is None:
            return self.text_head(feats["pooled"])
        return self.text_head(self._top_layers(feats["tokens"], feats["mask"].bool()))

    def _top_layers(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The fine-tuned top layers over the frozen prefix's states, then the tower's pooling."""
        assert self.text_top is not None
        n = max(1, int(mask.sum(1).max()))
        h, mask = tokens[:, :n].float(), mask[:, :n]
        ext = additive_mask(mask, torch.float32)
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=self.cfg.tune_autocast):
            for layer in self.text_top:
                h = layer(h, attention_mask=ext)
                h = h[0] if isinstance(h, tuple) else h
        h = h.float()
        return h[:, 0] if getattr(self.text_encoder, "pool", "mean") == "cls" else masked_mean(h, mask)

    def image_cache_identity(self) -> dict[str, Any]:
        """The image features are the frozen prefix below the fine-tuned units."""
        return {"image_tune_stages": self.cfg.image_tune_stages} if self.image_top is not None else {}

    def text_cache_identity(self) -> dict[str, Any]:
        """The text features are the frozen prefix below the fine-tuned layers."""
        return {"text_tune_layers": self.cfg.text_tune_layers} if self.text_top is not None else {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The fine-tuned tower parts are pretrained weights: ``backbone`` (``optim.backbone_lr``)."""
        groups = super().param_groups()
        for part in (self.text_top, self.image_top):
            if part is not None:
                top = {id(p) for p in part.parameters()}
                groups["head"] = [p for p in groups["head"] if id(p) not in top]
                groups["backbone"] += [p for p in part.parameters() if p.requires_grad]
        return groups

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


def split_top_layers(encoder: TextEncoder, k: int) -> nn.ModuleList:
    """Move the top ``k`` layers of a BERT-like encoder out of it and make them trainable; the
    encoder keeps the frozen prefix (its ``tokens`` become the prefix's last hidden states).

    Raises:
        ConfigError: the encoder has no layer list, or ``k`` is not within 1..layers - 1.
    """
    if not hasattr(encoder, "layers") or not hasattr(encoder, "model"):
        raise ConfigError(
            f"model.text_tune_layers needs a BERT-like text tower (minilm-l6, hf:), not {encoder.name}"
        )
    if getattr(encoder, "pool", None) == "multi":
        raise ConfigError("model.text_tune_layers needs the text tower's pool 'mean' or 'cls', not 'multi'")
    n = len(encoder.layers)  # type: ignore[attr-defined]
    if not 1 <= k < n:
        raise ConfigError(
            f"model.text_tune_layers: {k} is not within 1..{n - 1} for {encoder.name} ({n} layers)"
        )
    top = nn.ModuleList(encoder.truncate(n - k))  # type: ignore[attr-defined]
    top.requires_grad_(True)
    return top


class _Members(nn.ModuleList):
    """M projection heads: the concatenation of their unit outputs, divided by √M."""

    def forward(self, x: Tensor) -> Tensor:
        outs = [F.normalize(head(x), dim=-1) for head in self]
        return torch.cat(outs, dim=-1) / len(outs) ** 0.5
