"""``msa``: Multi-Scale Alignment (Yang et al., MSA; ``../shared/papers/003_88a939b35c33ebbb.txt``).

The image tower gives n single-scale features vⁱ (pooled encoder taps, Eq. 1), each projected to
the joint dimension d by its own linear layer Lⁱ (Eq. 2); the text tower gives the global
t^cls and the local token features t^local (Eq. 3). During training, one MSCMAT per scale
(Eq. 9–13) scores every image/text pair of the batch, giving one B×B matrix mⁱ per scale; the
matrices are trained with the symmetric contrastive L_MSCMA (Eq. 14–15) and the cross-scale
consistency L_CSMMC (Eq. 16–17). Retrieval uses only the fused image feature v″ (Eq. 5–6) and
t^cls, trained with the hinge triplet L_tri (Eq. 7); the total is Eq. 8. MSCMAT never runs at
evaluation (``encode_*``, or ``forward`` in eval mode), so retrieval stays a dual encoder.

Presets (``preset``) reproduce the paper's ablation rows (Tables V–VII):

========================  ==========  ==========  ===========  ====================================
preset                    image       α (MSCMA)   β (CSMMC)    paper row
========================  ==========  ==========  ===========  ====================================
``base``                  global      0           0            Base: encoder head feature + L_tri
``base+m``                multiscale  0           0            Base+M: fusion Eq. 5–6 + L_tri
``base+m+a+b``            multiscale  15          0            Base+M+A+B: + MSCMAT + L_MSCMA
``msa`` (default)         multiscale  15          10           Base+M+A+B+C: + L_CSMMC (full MSA)
========================  ==========  ==========  ===========  ====================================

``alpha``/``beta`` left at ``None`` take the preset's value; set them to override it. The
MSCMAT variants of Table VIII are ``mscmat: self`` and ``mscmat: no-cls``; Table IX's layer
subsets are ``align_scales``.

On a strong base (``head: mlp``, ``loss: infonce``, the image tower's ``pool: multi`` for
``base``): the same rows, with every projection (Lⁱ, Lᵍ, the text's) an MLP head, symmetric
multi-positive InfoNCE for the retrieval loss in place of (or beside) L_tri, and, for ``base``,
the standardised multi-tap feature that ``dual`` uses. ``mscmat_batch`` scores MSCMAT on the first
k images × k captions of a batch only (its cost grows with B²).

Where the reference code (yr666666/MSA) departs from the paper, the paper is the default and
the code's choice a switch: ``attention: softmax`` (code: softmax attention inside
``nn.MultiheadAttention``; paper Eq. 12: sigmoid), ``score: reference`` (code:
sigmoid(FC((attn + cls) ⊙ q)); paper Eq. 13: dot product), ``csmmc_axis: column`` (code:
column softmax; paper Eq. 16: rows). Pooling defaults to the code's choice (max for the
smaller scales, average for the largest), since the paper only says "Pool".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError
from rsitr.losses.consistency import score_distribution_kl
from rsitr.losses.contrastive import LearnableTemperature, batch_positives, multi_positive_infonce
from rsitr.losses.triplet import hinge_triplet
from rsitr.models.encoders.base import ImageEncoder, TextEncoder
from rsitr.models.methods.base import Features, RetrievalMethod
from rsitr.models.methods.dual import projection_head
from rsitr.models.registry import register_method

#: preset → (image feature, α, β); see the module docstring.
PRESETS: dict[str, tuple[str, float, float]] = {
    "base": ("global", 0.0, 0.0),
    "base+m": ("multiscale", 0.0, 0.0),
    "base+m+a+b": ("multiscale", 15.0, 0.0),
    "msa": ("multiscale", 15.0, 10.0),
}

# Above this many elements per (B_img × chunk × width) intermediate, MSCMAT scores text chunks.
_CHUNK_ELEMENTS = 1 << 24


def _choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"model.{field_name}: {value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class MSAConfig:
    """Configuration of ``msa``.

    Attributes:
        image_encoder: image tower spec; its ``maps`` (``feature_info``) are the scale taps.
        text_encoder: text tower spec; its ``pooled`` output is t^cls (MiniLM: masked mean).
        image_encoder_kwargs: extra image encoder options.
        text_encoder_kwargs: extra text encoder options.
        freeze_image: keep the image tower frozen (enables the feature cache).
        freeze_text: keep the text tower frozen.
        preset: ``base``, ``base+m``, ``base+m+a+b`` or ``msa`` (sets ``image``, α, β).
        alpha: α of Eq. 8, the L_MSCMA weight (``None``: the preset's).
        beta: β of Eq. 8, the L_CSMMC weight (``None``: the preset's).
        embed_dim: the joint dimension d.
        pool: spatial pooling of the taps (Eq. 1): ``reference`` (max for all but the largest
            scale, average for the largest, as the code), ``max`` or ``avg``.
        top_scale: the largest scale vⁿ: ``head``, the encoder's global (average-pooled) final
            feature, which is what C5 is for ResNet and what ``base`` uses (EfficientNet-Lite0: the
            1280-d head rather than the 320-d last block), or ``tap``, the last ``feature_info``
            map pooled with ``pool``.
        input_norm: ``batchnorm`` standardises each frozen pooled image feature (every scale and
            the ``base`` global feature) per dimension before its projection, as ``dual`` does
            for its multi-tap input; ``none`` projects the raw pooled features (the paper).
        mscmat: ``cross`` (Eq. 9–13), ``self`` (Table VIII's MSCMAT-SELF: self-attention over
            the image feature concatenated with the text tokens) or ``no-cls`` (Eq. 13 without
            t^cls).
        num_heads: attention heads per MSCMAT (the paper: 8).
        attention: ``sigmoid`` (Eq. 12) or ``softmax`` attention weights.
        score: ``dot`` (Eq. 13, cosine of v^i′ and t^agg ⊕ t^cls) or ``reference``
            (sigmoid(FC((t^agg + t^cls) ⊙ v^i′)), the code's scoring).
        align_scales: 1-based scales that get an MSCMAT and enter L_MSCMA/L_CSMMC (Table IX);
            the largest listed scale is the L_CSMMC teacher mⁿ.
        tau: temperature τ of L_CMA (Eq. 14).
        mu: softmax temperature μ of L_MMC (Eq. 16). ``None`` (default): μ = τ for ``score: dot``,
            whose scores are cosines in [−1, 1], so L_MMC compares the same sharp distributions
            that L_CMA trains; 2 for ``score: reference``, the code's μ on its sigmoid scores in
            [0, 1]. (The code's μ = 2 on cosines makes both softmaxes near uniform: L_MMC ≈ 1e-3
            and β·L_CSMMC ≈ 0.1 beside α·L_MSCMA ≈ 250, i.e. no effect.)
        csmmc_axis: softmax over ``row`` s (Eq. 16) or ``column`` s (the code).
        margin: triplet margin d (Eq. 7).
        negatives: triplet negatives, ``hardest`` (max-violation, as the code) or ``all`` (sum).
        triplet_reduction: L_tri over the batch: ``sum`` (as the code, which keeps it on the
            scale of α·L_MSCMA) or ``mean``.
        head: every projection (Lⁱ, Lᵍ, the text's t^cls′) is ``linear`` (the paper) or a 2-layer
            ``mlp`` (Linear–GELU–Dropout–Linear, as ``dual``).
        head_hidden: hidden width of the MLP heads.
        dropout: dropout on the MLP heads' hidden layer.
        input_dropout: dropout on every projection's input features.
        text_input_norm: ``batchnorm`` standardises t^cls per dimension before its projection
            (``dual``'s ``input_norm`` applies to both towers); ``none`` (the paper).
        loss: the retrieval loss on v″ and t^cls′: ``triplet`` (L_tri, Eq. 7), ``infonce``
            (symmetric multi-positive InfoNCE with a learnable temperature, ``dual``'s) or
            ``both``.
        temperature: initial InfoNCE temperature.
        weight_scale: multiplies the preset's α and β (not explicit ones). The paper's 15 and 10
            weigh a triplet summed over the batch; beside a batch-mean InfoNCE, about 1/30 of
            them keeps the same balance.
        mscmat_batch: MSCMAT and its losses see the first k images and k captions of each batch
            (a k × k block of pairs); 0 scores the whole B × B batch (the paper).
    """

    image_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm-l6"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    text_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze_image: bool = True
    freeze_text: bool = True
    preset: Literal["base", "base+m", "base+m+a+b", "msa"] = "msa"
    alpha: float | None = None
    beta: float | None = None
    embed_dim: int = 512
    pool: Literal["reference", "max", "avg"] = "reference"
    top_scale: Literal["head", "tap"] = "head"
    input_norm: Literal["none", "batchnorm"] = "none"
    mscmat: Literal["cross", "self", "no-cls"] = "cross"
    num_heads: int = 8
    attention: Literal["sigmoid", "softmax"] = "sigmoid"
    score: Literal["dot", "reference"] = "dot"
    align_scales: tuple[int, ...] = (1, 2, 3, 4)
    tau: float = 0.07
    mu: float | None = None
    csmmc_axis: Literal["row", "column"] = "row"
    margin: float = 0.2
    negatives: Literal["hardest", "all"] = "hardest"
    triplet_reduction: Literal["sum", "mean"] = "sum"
    head: Literal["linear", "mlp"] = "linear"
    head_hidden: int = 1024
    dropout: float = 0.0
    input_dropout: float = 0.0
    text_input_norm: Literal["none", "batchnorm"] = "none"
    loss: Literal["triplet", "infonce", "both"] = "triplet"
    temperature: float = 0.07
    weight_scale: float = 1.0
    mscmat_batch: int = 0

    def __post_init__(self) -> None:
        _choice("preset", self.preset, tuple(PRESETS))
        _choice("pool", self.pool, ("reference", "max", "avg"))
        _choice("top_scale", self.top_scale, ("head", "tap"))
        _choice("input_norm", self.input_norm, ("none", "batchnorm"))
        _choice("mscmat", self.mscmat, ("cross", "self", "no-cls"))
        _choice("attention", self.attention, ("sigmoid", "softmax"))
        _choice("score", self.score, ("dot", "reference"))
        _choice("csmmc_axis", self.csmmc_axis, ("row", "column"))
        _choice("negatives", self.negatives, ("hardest", "all"))
        _choice("triplet_reduction", self.triplet_reduction, ("sum", "mean"))
        _choice("head", self.head, ("linear", "mlp"))
        _choice("text_input_norm", self.text_input_norm, ("none", "batchnorm"))
        _choice("loss", self.loss, ("triplet", "infonce", "both"))
        for name in ("dropout", "input_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.mscmat_batch < 0 or self.head_hidden < 1:
            raise ConfigError(
                f"model.mscmat_batch must be >= 0 (got {self.mscmat_batch}) and model.head_hidden "
                f">= 1 (got {self.head_hidden})"
            )
        if not 0 < self.temperature < 1:
            raise ConfigError(f"model.temperature must lie in (0, 1), got {self.temperature}")
        for name in ("alpha", "beta", "weight_scale"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"model.{name} must be >= 0 (or null for the preset's), got {v}")
        if self.embed_dim < 1 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim={self.embed_dim} must be >= 1 and divisible by "
                f"model.num_heads={self.num_heads}"
            )
        scales = tuple(int(s) for s in self.align_scales)  # YAML gives a list
        if not scales or len(set(scales)) != len(scales) or min(scales) < 1:
            raise ConfigError(
                f"model.align_scales: {list(self.align_scales)} must be distinct 1-based scale indices"
            )
        object.__setattr__(self, "align_scales", tuple(sorted(scales)))
        for name in ("tau", "mu"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")

    @property
    def image_mode(self) -> str:
        """``global`` (the encoder's pooled head feature) or ``multiscale`` (fusion, Eq. 5–6)."""
        return PRESETS[self.preset][0]

    @property
    def mu_value(self) -> float:
        """μ in effect (the explicit value, else τ for cosine scores and 2 for the code's scores)."""
        if self.mu is not None:
            return float(self.mu)
        return 2.0 if self.score == "reference" else self.tau

    @property
    def alpha_value(self) -> float:
        """α in effect (the explicit value, else the preset's × ``weight_scale``)."""
        return PRESETS[self.preset][1] * self.weight_scale if self.alpha is None else float(self.alpha)

    @property
    def beta_value(self) -> float:
        """β in effect (the explicit value, else the preset's × ``weight_scale``)."""
        return PRESETS[self.preset][2] * self.weight_scale if self.beta is None else float(self.beta)


class MSCMAT(nn.Module):
    """Multi-Scale Cross-Modal Alignment Transformer for one scale (Eq. 9–13), one layer.

    Scores every (image, caption) pair of two batches at once: the single-scale image feature is
    the query (Eq. 9), the local text tokens the keys and values (Eq. 10–11), with ``num_heads``
    heads and weights Sigmoid(QKᵀ/τ) (Eq. 12, τ = √(d/heads); Eq. 12 prints QVᵀ, read as QKᵀ)
    or softmax; padding tokens get zero weight. The aggregated t^agg is added to t^cls and
    scored against v^i′ (Eq. 13). As in Eq. 12, t^agg is the heads' outputs concatenated, with no
    output projection (one would cost a d×d product for every one of the B² pairs).

    ``variant="self"`` (MSCMAT-SELF) runs self-attention over [v^i′; t^local] with the same
    projections. With one layer only the output at the image position enters the score, and it
    equals cross-attention whose keys/values also hold the image token itself, so that is what
    is computed (the text positions' outputs would be discarded).

    Args:
        dim: the joint dimension d.
        num_heads: number of heads.
        attention: ``sigmoid`` or ``softmax``.
        variant: ``cross``, ``self`` or ``no-cls``.
        score: ``dot`` or ``reference``.
    """

    def __init__(self, dim: int, num_heads: int, attention: str, variant: str, score: str) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attention, self.variant, self.score_kind = attention, variant, score
        self.q = nn.Linear(dim, dim)  # W^q, Eq. 9
        self.k = nn.Linear(dim, dim)  # W^k, Eq. 10
        self.v = nn.Linear(dim, dim)  # W^v, Eq. 11
        self.fc = nn.Linear(dim, 1) if score == "reference" else None

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def attend(self, img: Tensor, tok: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """t^agg for every pair (Eq. 12) and the attention weights over the text tokens.

        Args:
            img: (B_i, d) single-scale image features v^i′.
            tok: (B_t, L, d) local text features t^local′.
            mask: (B_t, L) bool, True for real tokens.

        Returns:
            ``(agg, weights)``: (B_i, B_t, d) aggregated text vectors and (B_i, B_t, heads, L)
            weights on the text tokens (zero on padding).
        """
        scale = self.head_dim**-0.5
        q = self._heads(self.q(img))  # (B_i, h, dh)
        k = self._heads(self.k(tok))  # (B_t, L, h, dh)
        v = self._heads(self.v(tok))  # (B_t, L, h, dh)
        logits = torch.einsum("ihd,jlhd->ijhl", q, k) * scale  # (B_i, B_t, h, L)
        valid = mask[None, :, None, :]  # (1, B_t, 1, L)
        self_logit = self_v = None
        if self.variant == "self":
            self_logit = (q * self._heads(self.k(img))).sum(-1) * scale  # (B_i, h)
            self_v = self._heads(self.v(img))  # (B_i, h, dh)
        if self.attention == "sigmoid":
            w = torch.sigmoid(logits) * valid
            w_self = None if self_logit is None else torch.sigmoid(self_logit)[:, None]  # (B_i, 1, h)
        else:
            logits = logits.masked_fill(~valid, float("-inf"))
            if self_logit is None:
                w = logits.softmax(-1).nan_to_num(0.0)  # a caption with no tokens attends to nothing
                w_self = None
            else:
                both = torch.cat(
                    [logits, self_logit[:, None, :, None].expand(-1, logits.shape[1], -1, 1)], -1
                )
                both = both.softmax(-1)
                w, w_self = both[..., :-1], both[..., -1]  # (B_i, B_t, h, L), (B_i, B_t, h)
        agg = torch.einsum("ijhl,jlhd->ijhd", w, v)  # (B_i, B_t, h, dh)
        if w_self is not None:
            agg = agg + w_self[..., None] * self_v[:, None]
        return agg.flatten(-2), w

    def forward(self, img: Tensor, tok: Tensor, mask: Tensor, cls: Tensor) -> Tensor:
        """Scores mⁱ of all B_i × B_t pairs (Eq. 13), computed in chunks of captions.

        Args:
            img: (B_i, d) v^i′.
            tok: (B_t, L, d) t^local′.
            mask: (B_t, L) bool.
            cls: (B_t, d) t^cls′.

        Returns:
            (B_i, B_t) score matrix mⁱ.
        """
        n_i, (n_t, n_l, _) = img.shape[0], tok.shape
        width = max(self.num_heads * n_l, self.dim)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, n_i * width))
        cols = []
        for s in range(0, n_t, chunk):
            agg, _ = self.attend(img, tok[s : s + chunk], mask[s : s + chunk])  # (B_i, c, d)
            c = cls[s : s + chunk]
            text = agg if self.variant == "no-cls" else agg + c[None]  # t^agg ⊕ t^cls
            if self.fc is not None:  # the reference code: sigmoid(FC((attn + cls) ⊙ q))
                cols.append(torch.sigmoid(self.fc(text * img[:, None])).squeeze(-1))
            else:  # Eq. 13, as a cosine so that τ of Eq. 14 has a fixed scale
                cols.append((F.normalize(text, dim=-1) * F.normalize(img, dim=-1)[:, None]).sum(-1))
        return torch.cat(cols, dim=1)


def pool_scale(fmap: Tensor, kind: str) -> Tensor:
    """Global spatial pooling of a (B, C, H, W) map: ``max`` or ``avg`` → (B, C) (Eq. 1)."""
    return fmap.amax((2, 3)) if kind == "max" else fmap.mean((2, 3))


@register_method("msa")
class MSA(RetrievalMethod):
    """Multi-Scale Alignment: per-scale MSCMAT alignment in training, fused dual encoder at test."""

    name = "msa"
    padded_text_keys = ("tokens", "mask")
    Config = MSAConfig

    def __init__(self, cfg: MSAConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__(cfg, image_encoder, text_encoder)
        chs = [f["num_chs"] for f in image_encoder.feature_info]
        # With the tower's ``pool: multi``, ``pooled`` is the multi-tap vector (``base``'s feature)
        # and vⁿ is the head feature alone (``head``: the token map's average, token_dim wide).
        self.multi_tap = getattr(image_encoder, "pool", None) == "multi"
        if cfg.top_scale == "head":  # vⁿ is the global final feature (ResNet: C5 average-pooled)
            chs[-1] = image_encoder.token_dim if self.multi_tap else image_encoder.num_features
        self.num_scales = n = len(chs)
        if max(cfg.align_scales) > n:
            raise ConfigError(
                f"model.align_scales: {list(cfg.align_scales)} asks for scale {max(cfg.align_scales)}, "
                f"but {image_encoder.name} has {n} scale taps"
            )
        d = cfg.embed_dim
        self.alpha, self.beta = cfg.alpha_value, cfg.beta_value
        # Pooling per scale: the code's max for C2–C4 and average for C5 (``reference``).
        self.pools = [
            ("avg" if i == n - 1 else "max") if cfg.pool == "reference" else cfg.pool for i in range(n)
        ]
        self.scale_keys = [f"{kind}{i}" for i, kind in enumerate(self.pools)]
        if cfg.top_scale == "head":
            self.scale_keys[-1] = "head" if self.multi_tap else "pooled"
        norm = cfg.input_norm
        head = (cfg.head, cfg.head_hidden, cfg.dropout, cfg.input_dropout)
        needs_mscmat = self.alpha > 0 or self.beta > 0
        multiscale = cfg.image_mode == "multiscale"
        # Only the layers this preset uses are built (an unused trainable layer breaks DDP):
        # ``base`` has no Lⁱ or fusion, and MSCMAT's token projection exists only with α or β > 0.
        self.scale_proj = nn.ModuleList(
            projection_head(c, d, *head, input_norm=norm) for c in chs
        ) if (multiscale or needs_mscmat) else nn.ModuleList()  # Lⁱ, Eq. 2  # fmt: skip
        self.fusion_gate = nn.Linear(d, d) if multiscale else None  # L^ms, Eq. 6
        self.global_proj = (
            projection_head(image_encoder.num_features, d, *head, input_norm=norm) if not multiscale else None
        )
        # t^cls′ (the paper: a linear layer)
        self.text_proj = projection_head(text_encoder.num_features, d, *head, input_norm=cfg.text_input_norm)
        self.logit_scale = LearnableTemperature(cfg.temperature) if cfg.loss != "triplet" else None
        self.token_proj = nn.Linear(text_encoder.token_dim, d) if needs_mscmat else None  # t^local′
        self.mscmat = nn.ModuleDict(
            {
                str(s): MSCMAT(d, cfg.num_heads, cfg.attention, cfg.mscmat, cfg.score)
                for s in (cfg.align_scales if needs_mscmat else ())
            }
        )

    # --- frozen part: config-independent, so one feature cache serves every preset ---------------
    def image_features(self, images: Tensor) -> Features:
        """``pooled`` feature (the multi-tap vector with ``pool: multi``, whose ``head`` is then
        the head feature alone) plus ``max{i}``/``avg{i}`` pooled taps for every scale i."""
        out = self.image_encoder(images)
        feats = {"pooled": out.pooled}
        if self.multi_tap:
            feats["head"] = out.tokens.mean(1)
        for i, fmap in enumerate(out.maps):
            feats[f"max{i}"] = pool_scale(fmap, "max")
            feats[f"avg{i}"] = pool_scale(fmap, "avg")
        return feats

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """``pooled`` (t^cls), ``tokens`` (t^local, (B, L, D)) and ``mask`` (B, L) of Eq. 3."""
        out = self.text_encoder(input_ids, attention_mask)
        return {"pooled": out.pooled, "tokens": out.tokens, "mask": out.mask.float()}

    # --- trainable part ---------------------------------------------------------------------------
    def scale_features(self, feats: Features) -> list[Tensor]:
        """v^i′ = Lⁱ(vⁱ) for every scale (Eq. 1–2), each (B, d)."""
        return [proj(feats[key]) for proj, key in zip(self.scale_proj, self.scale_keys, strict=True)]

    def fuse(self, scales: list[Tensor]) -> Tensor:
        """v″ = Sigmoid(L^ms(Σᵢ v^i′)) ⊙ Σᵢ v^i′ (Eq. 5–6; ⊕ is element-wise addition)."""
        assert self.fusion_gate is not None, "fuse() needs a multiscale preset"
        total = torch.stack(scales).sum(0)
        return torch.sigmoid(self.fusion_gate(total)) * total

    def _embed_image(self, feats: Features) -> tuple[Tensor, list[Tensor]]:
        scales = self.scale_features(feats) if (self.global_proj is None or len(self.mscmat)) else []
        if self.global_proj is not None:
            return self.global_proj(feats["pooled"]), scales
        return self.fuse(scales), scales

    def embed_image(self, feats: Features) -> Tensor:
        """The retrieval image feature: v″ (Eq. 5–6), or Lᵍ(pooled) for ``base``."""
        return self._embed_image(feats)[0]

    def embed_text(self, feats: Features) -> Tensor:
        """The retrieval text feature t^cls′."""
        return self.text_proj(feats["pooled"])

    def text_tokens(self, feats: Features) -> tuple[Tensor, Tensor]:
        """t^local′ (B, L, d) and its bool mask (B, L)."""
        assert self.token_proj is not None, "text_tokens() needs MSCMAT (alpha or beta > 0)"
        return self.token_proj(feats["tokens"]), feats["mask"] > 0.5

    def scale_scores(self, scales: list[Tensor], txt_feats: Features, cls: Tensor) -> list[Tensor]:
        """One (B_i, B_t) MSCMAT score matrix mⁱ per aligned scale (Eq. 4, 13), smallest first."""
        tok, mask = self.text_tokens(txt_feats)
        g = self.gather
        tok, mask, cls = g(tok), g(mask.float()) > 0.5, g(cls)
        return [self.mscmat[str(s)](g(scales[s - 1]), tok, mask, cls) for s in self.cfg.align_scales]

    # --- losses -------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """L_total = L_tri + α·L_MSCMA + β·L_CSMMC (Eq. 8), as weighted ``*_loss`` terms
        (``loss: infonce``/``both``: InfoNCE in place of / beside L_tri).

        MSCMAT runs only in training mode and only when α or β is non-zero, on the first
        ``mscmat_batch`` pairs when set. The unweighted terms are logged as ``mscma``/``csmmc``.
        """
        c = self.cfg
        img_feats, txt_feats = self._image_feats(batch), self._text_feats(batch)
        img, scales = self._embed_image(img_feats)
        cls = self.embed_text(txt_feats)
        g = self.gather
        img_n, txt_n = g(F.normalize(img, dim=-1)), g(F.normalize(cls, dim=-1))
        pos = batch_positives(batch, g)
        sims = img_n @ txt_n.T
        out: dict[str, Tensor] = {}
        if c.loss in ("triplet", "both"):
            tri = hinge_triplet(sims, pos, c.margin, c.negatives)  # batch mean
            out["triplet_loss"] = tri * len(img_n) if c.triplet_reduction == "sum" else tri
        if self.logit_scale is not None:
            scale = self.logit_scale()
            out["infonce_loss"] = multi_positive_infonce(sims * scale, pos)
            out["logit_scale"] = scale.detach()
        if self.training and len(self.mscmat):
            k = c.mscmat_batch
            if k and k < len(img):  # the first k images × k captions
                scales, cls = [s[:k] for s in scales], cls[:k]
                txt_feats = {key: v[:k] for key, v in txt_feats.items()}
                pos = batch_positives(
                    {key: batch[key][:k] for key in ("image_id", "text_id") if key in batch}, g
                )
            m = self.scale_scores(scales, txt_feats, cls)
            out.update(self.alignment_losses(m, pos))
        return out

    def alignment_losses(self, m: list[Tensor], pos: Tensor) -> dict[str, Tensor]:
        """``mscma_loss`` = α·Σᵢ L_CMA(mⁱ) (Eq. 14–15) and ``csmmc_loss`` = β·Σᵢ L_MMC(mⁱ, mⁿ)
        (Eq. 16–17, i over the smaller aligned scales, mⁿ detached).

        Args:
            m: per-scale (B, B) score matrices, smallest scale first.
            pos: (B, B) bool positives (other captions of the same image count as positives).
        """
        out: dict[str, Tensor] = {}
        mscma = torch.stack([multi_positive_infonce(mi / self.cfg.tau, pos) for mi in m]).sum()
        out["mscma"] = mscma.detach()
        if self.alpha > 0:
            out["mscma_loss"] = self.alpha * mscma
        if self.beta > 0 and len(m) > 1:
            teacher = m[-1]
            csmmc = torch.stack(
                [score_distribution_kl(mi, teacher, self.cfg.mu_value, self.cfg.csmmc_axis) for mi in m[:-1]]
            ).sum()
            out["csmmc"] = csmmc.detach()
            out["csmmc_loss"] = self.beta * csmmc
        return out

    # --- visualisations (rsitr evaluate --report) ----------------------------------------------------
    def report_figures(self, corpus: Any, folder: str | Path, **kwargs: Any) -> list[Path]:
        """Fig. 3 (per-scale similarity heatmaps and diagonal boxplots) and Fig. 8 (per-scale
        attention over a caption's words) as PNG files in ``folder``; see
        :func:`rsitr.models.methods._msa_figures.write_figures`."""
        from rsitr.models.methods._msa_figures import write_figures

        return write_figures(self, corpus, Path(folder), **kwargs)
