"""``rdb``: Representation Discrepancy Bridging (Ning et al., arXiv 2505.16756; ``specs/rdb.md``).

A frozen dual encoder adapted by the Cross-Modal Asymmetric Adapter (CMAA): VEA (bottleneck +
differential attention) in the image tower, TSA (bottleneck + hierarchical attention) in the text
tower, and one shared interaction layer per depth whose weights serve both towers (spec §1).
Trained with the Dual-Task Consistency Loss (spec §2):

    L_DTCL = Σ_k r_k·[exp(−s_k)·L_k + s_k],  k ∈ {itc, cls, ema}

with L_itc the multi-positive symmetric InfoNCE, L_cls a shared cosine scene classifier on both
modalities' embeddings, and L_ema the KL between a mean teacher's and the student's retrieval
distributions and class posteriors (ramped in). Retrieval stays dual-encoder.

Presets ``A0``–``A7`` are the ablation grid of spec §4.3 (``model.preset``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError
from rsitr.losses.contrastive import LearnableTemperature, batch_positives, multi_positive_infonce
from rsitr.losses.triplet import hinge_triplet
from rsitr.losses.weighting import WEIGHTINGS, LossWeighting
from rsitr.models.adapters.attention import (
    DifferentialAttention,
    HierarchicalAttention,
    SelfAttention,
    SharedInteraction,
)
from rsitr.models.adapters.bottleneck import BottleneckAdapter
from rsitr.models.adapters.towers import AdaptedTower, adapted_tower
from rsitr.models.ema import MeanTeacher
from rsitr.models.encoders.base import ImageEncoder, TextEncoder
from rsitr.models.methods.base import Features, RetrievalMethod, merge_preset
from rsitr.models.methods.dual import projection_head
from rsitr.models.registry import register_method

#: The ablation grid of spec §4.3, each row a change from the full CMAA with L_itc only (A4).
#: A7 is the full method (the defaults).
_A4: dict[str, Any] = {
    "image_adapter": "vea",
    "text_adapter": "tsa",
    "shared": True,
    "use_cls": False,
    "use_ema": False,
    "weighting": "fixed",
}
PRESETS: dict[str, dict[str, Any]] = {
    "A0": {**_A4, "image_adapter": "mhsa", "text_adapter": "mhsa"},  # symmetric adapters
    "A1": {**_A4, "text_adapter": "mhsa"},  # VEA only
    "A2": {**_A4, "image_adapter": "mhsa"},  # TSA only
    "A3": {**_A4, "shared": False},  # no shared layer
    "A4": _A4,
    "A5": {**_A4, "use_cls": True},
    "A6": {**_A4, "use_cls": True, "use_ema": True},
    "A7": {**_A4, "use_cls": True, "use_ema": True, "weighting": "uncertainty"},
}
TERMS = ("itc", "cls", "ema")


@dataclass(frozen=True)
class RDBConfig:
    """Configuration of ``rdb``. [REC] choices of the spec are all switches here.

    Attributes:
        preset: ``A0``–``A7`` (spec §4.3); explicit keys override the preset's.
        image_encoder / text_encoder: tower specs (``clip:ViT-B-32@openai``, a GeoRSCLIP checkpoint
            path as ``clip:ViT-B-32@/path/RS5M_ViT-B-32_RET-2.pt``, or the offline
            ``efficientnet-lite0`` / ``minilm-l6``). Both towers are always frozen.
        image_layers / text_layers: adapt the last k blocks (``None``: all).
        image_site: ``blocks`` (the last ``image_layers`` blocks) or ``head``: one VEA on the
            output of the image tower's last frozen layer (EfficientNet-Lite: the head
            convolution's map), so no frozen layer runs in a training step (``image_layers`` 1).
        bottleneck: r, common to both towers.
        heads: heads of the modality attentions (DA: h differential heads of 2 sub-heads).
        shared_heads: heads of the shared interaction layer (on r/2 tokens).
        image_adapter: ``vea`` (differential attention) or ``mhsa`` (symmetric baseline).
        text_adapter: ``tsa`` (hierarchical attention) or ``mhsa``.
        shared: use the shared interaction layer.
        attn_twice: apply the modality attention again after the shared layer (HarMA).
        lambda_init: DA's λ_init, ``"schedule"`` (0.8 − 0.6·e^{−0.3(l−1)}) or a constant.
        tsa_mode: ``full`` (word → phrase → sentence) or ``simple``.
        tsa_causal: causal word-level attention; ``None`` matches the tower (CLIP text: causal).
        placement: ``mlp_out_gated`` (spec default) or ``parallel_mlp`` (PE-RSITR; CLIP only).
        gate_init / inner_gate_init: initial values of the outer gate g and inner gate β.
        head: projection into the joint space: ``auto`` (none when both towers already share
            one, as CLIP does; else ``mlp``), ``none``, ``linear`` or ``mlp``.
        embed_dim / head_hidden / dropout / input_norm: the projection heads (as in ``dual``).
        temperature / learn_temperature: InfoNCE τ (init 0.07, learnable).
        use_cls: the classification term; ``num_classes`` is filled in from the training split.
        cls_temperature: τ_c of the cosine classifier.
        label_smoothing: for L_cls.
        use_ema: the EMA-consistency term.
        ema_decay: the teacher's final μ (ramped from 0.99 over the first epoch).
        ema_rampup_epochs: r_ema(t) = exp(−5(1 − t/T)²) for t < T epochs.
        ema_target: ``both``, ``retrieval``, ``classification`` or ``embedding_mse``.
        weighting: ``uncertainty``, ``anchored`` (ITC held at weight 1, the auxiliary terms
            adapted), ``normalised`` (uncertainty weights rescaled to sum to 3), ``ratio``, ``dwa``
            or ``fixed``.
        fixed_weights: (itc, cls, ema) weights for ``fixed``.
        logvar_clamp: the clamp c on the log-variances.
        triplet: add HarMA's hinge triplet (sum over negatives) to L_itc.
        margin: its margin.
    """

    preset: str | None = None
    image_encoder: str = "efficientnet-lite0"
    text_encoder: str = "minilm-l6"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    text_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    image_layers: int | None = None
    image_site: Literal["blocks", "head"] = "blocks"
    text_layers: int | None = None
    bottleneck: int = 128
    heads: int = 4
    shared_heads: int = 8
    image_adapter: Literal["vea", "mhsa"] = "vea"
    text_adapter: Literal["tsa", "mhsa"] = "tsa"
    shared: bool = True
    attn_twice: bool = False
    lambda_init: float | str = "schedule"
    tsa_mode: Literal["full", "simple"] = "full"
    tsa_causal: bool | None = None
    placement: Literal["mlp_out_gated", "parallel_mlp"] = "mlp_out_gated"
    gate_init: float = 0.6
    inner_gate_init: float = 0.6
    head: Literal["auto", "none", "linear", "mlp"] = "auto"
    embed_dim: int = 512
    head_hidden: int = 1024
    dropout: float = 0.3
    input_norm: Literal["none", "batchnorm", "layernorm"] = "none"
    temperature: float = 0.07
    learn_temperature: bool = True
    use_cls: bool = True
    num_classes: int = 0
    cls_temperature: float = 0.05
    label_smoothing: float = 0.0
    use_ema: bool = True
    ema_decay: float = 0.999
    ema_rampup_epochs: float = 5.0
    ema_target: Literal["both", "retrieval", "classification", "embedding_mse"] = "both"
    weighting: Literal["uncertainty", "anchored", "normalised", "ratio", "dwa", "fixed"] = "uncertainty"
    fixed_weights: tuple[float, float, float] = (1.0, 0.5, 1.0)
    logvar_clamp: float = 4.0
    triplet: bool = False
    margin: float = 0.2

    @classmethod
    def resolve(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` over its ``preset``'s settings (unknown presets raise)."""
        return merge_preset(values, PRESETS)

    def __post_init__(self) -> None:
        choices = {
            "image_adapter": ("vea", "mhsa"), "text_adapter": ("tsa", "mhsa"), "tsa_mode": ("full", "simple"),
            "placement": ("mlp_out_gated", "parallel_mlp"), "head": ("auto", "none", "linear", "mlp"),
            "input_norm": ("none", "batchnorm", "layernorm"), "weighting": WEIGHTINGS,
            "image_site": ("blocks", "head"),
            "ema_target": ("both", "retrieval", "classification", "embedding_mse"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.bottleneck < 2 or self.bottleneck % (2 * self.heads):
            raise ConfigError(
                f"model.bottleneck: {self.bottleneck} must be a multiple of 2·heads = {2 * self.heads}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"model.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if len(self.fixed_weights) != len(TERMS):
            raise ConfigError(f"model.fixed_weights needs {len(TERMS)} values (itc, cls, ema)")
        object.__setattr__(self, "fixed_weights", tuple(float(w) for w in self.fixed_weights))


class CosineClassifier(nn.Module):
    """Shared scene classifier on unit embeddings: logits = W̄ f / τ_c, rows of W̄ unit-norm."""

    def __init__(self, dim: int, num_classes: int, temperature: float = 0.05) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.temperature = temperature

    def forward(self, f: Tensor) -> Tensor:
        return f @ F.normalize(self.weight, dim=-1).T / self.temperature


def _kl(teacher_logits: Tensor, student_logits: Tensor, dim: int) -> Tensor:
    """Mean over rows (``dim=1``) or columns of KL(softmax(teacher) ‖ softmax(student))."""
    log_q = F.log_softmax(teacher_logits.detach(), dim=dim)
    log_p = F.log_softmax(student_logits, dim=dim)
    return (log_q.exp() * (log_q - log_p)).sum(dim).mean()


@register_method("rdb")
class RDB(RetrievalMethod):
    """Frozen towers + CMAA adapters + projection heads (offline stack) + DTCL."""

    name = "rdb"
    Config = RDBConfig
    image_tower: AdaptedTower
    text_tower: AdaptedTower
    #: frozen prefixes (token maps, hidden states) are large: cache them in half precision
    cache_dtype: ClassVar[torch.dtype] = torch.float16

    def __init__(self, cfg: RDBConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__(cfg, image_encoder, text_encoder)
        image_encoder.set_frozen(True)
        text_encoder.set_frozen(True)
        self.shared = nn.ModuleList()
        r = cfg.bottleneck

        def shared_for(from_end: int) -> nn.Module | None:
            if not cfg.shared:
                return None
            while len(self.shared) <= from_end:
                self.shared.append(SharedInteraction(r, cfg.shared_heads, cfg.inner_gate_init))
            return self.shared[from_end]

        def image_adapter(layer: int, dim: int, from_end: int) -> BottleneckAdapter:
            if cfg.image_adapter == "vea":
                attn: nn.Module = DifferentialAttention(r, cfg.heads, layer, cfg.lambda_init)
            else:
                attn = SelfAttention(r, cfg.heads)
            return BottleneckAdapter(dim, r, attn, shared_for(from_end), cfg.attn_twice, cfg.inner_gate_init)

        from rsitr.models.encoders.clip import ClipTextEncoder

        causal = isinstance(text_encoder, ClipTextEncoder) if cfg.tsa_causal is None else cfg.tsa_causal

        def text_adapter(layer: int, dim: int, from_end: int) -> BottleneckAdapter:
            if cfg.text_adapter == "tsa":
                attn: nn.Module = HierarchicalAttention(r, cfg.heads, causal, mode=cfg.tsa_mode)
            else:
                attn = SelfAttention(r, cfg.heads, causal)
            return BottleneckAdapter(dim, r, attn, shared_for(from_end), cfg.attn_twice, cfg.inner_gate_init)

        kw = {"gate_init": cfg.gate_init, "placement": cfg.placement}
        kw_image = {**kw, "site": cfg.image_site}
        self.image_tower = adapted_tower(image_encoder, cfg.image_layers, image_adapter, **kw_image)
        self.text_tower = adapted_tower(text_encoder, cfg.text_layers, text_adapter, **kw)

        head = cfg.head
        if head == "auto":  # CLIP towers already share a joint space
            same = image_encoder.num_features == text_encoder.num_features
            head = "none" if isinstance(text_encoder, ClipTextEncoder) and same else "mlp"
        if head == "none":
            if image_encoder.num_features != text_encoder.num_features:
                raise ConfigError(
                    f"model.head=none needs towers of equal width; got {image_encoder.num_features} "
                    f"and {text_encoder.num_features}"
                )
            self.image_head: nn.Module = nn.Identity()
            self.text_head: nn.Module = nn.Identity()
            dim = image_encoder.num_features
        else:
            args = (head, cfg.head_hidden, cfg.dropout, cfg.dropout if head == "mlp" else 0.0, cfg.input_norm)
            self.image_head = projection_head(image_encoder.num_features, cfg.embed_dim, *args)
            self.text_head = projection_head(text_encoder.num_features, cfg.embed_dim, *args)
            dim = cfg.embed_dim
        self.logit_scale = LearnableTemperature(cfg.temperature)
        self.logit_scale.log_scale.requires_grad_(cfg.learn_temperature)
        self.classifier: CosineClassifier | None = None
        if cfg.use_cls:
            if cfg.num_classes < 2:
                raise ConfigError(
                    "model.use_cls needs scene labels: num_classes is filled in from the training split's "
                    f"labels (got {cfg.num_classes}); give data.labels, or set model.use_cls=false"
                )
            self.classifier = CosineClassifier(dim, cfg.num_classes, cfg.cls_temperature)
        self.weighting = LossWeighting(TERMS, cfg.weighting, cfg.fixed_weights, cfg.logvar_clamp)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.steps_per_epoch = 1
        self.teacher: MeanTeacher | None = None
        if cfg.use_ema:
            self.teacher = MeanTeacher(self, exclude=("weighting.", "logit_scale."))

    # --- the four hooks ---------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Features:
        return self.image_tower.prefix(images)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        return self.text_tower.prefix(input_ids, attention_mask)

    def embed_image(self, feats: Features) -> Tensor:
        return self.image_head(self.image_tower.suffix(_as_float(feats)))

    def embed_text(self, feats: Features) -> Tensor:
        return self.text_head(self.text_tower.suffix(_as_float(feats)))

    def cache_identity(self) -> dict[str, Any]:
        """The prefixes end at the first adapted block of each tower, and are stored in half precision."""
        return {
            "image_split": self.image_tower.first,
            **({"image_site": self.cfg.image_site} if self.cfg.image_site != "blocks" else {}),
            "text_split": self.text_tower.first,
            "placement": self.cfg.placement,
            "dtype": str(self.cache_dtype),
        }

    # --- training -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        img_feats, txt_feats = self._image_feats(batch), self._text_feats(batch)
        img = F.normalize(self.embed_image(img_feats), dim=-1)
        txt = F.normalize(self.embed_text(txt_feats), dim=-1)
        extra: dict[str, Any] = {}
        if self.teacher is not None and self.training:
            with torch.no_grad(), self.teacher.swapped():
                was = [m.training for m in (self.image_head, self.text_head)]
                self.image_head.eval()
                self.text_head.eval()
                t_img = F.normalize(self.embed_image(img_feats), dim=-1)
                t_txt = F.normalize(self.embed_text(txt_feats), dim=-1)
                t_cls = self.classifier.weight.detach().clone() if self.classifier is not None else None
                self.image_head.train(was[0])
                self.text_head.train(was[1])
            extra = {"teacher_img": self.gather(t_img), "teacher_txt": self.gather(t_txt)}
            extra["teacher_cls"] = t_cls
        gathered = {k: self.gather(v) for k, v in batch.items() if k in ("image_id", "scene", "text_id")}
        return self.losses(self.gather(img), self.gather(txt), {**batch, **gathered, **extra})

    def ema_ramp(self) -> float:
        """r_ema(t) = exp(−5(1 − t/T)²) for t < T (epochs, fractional), else 1."""
        t = float(self.step) / max(1, self.steps_per_epoch)
        T = self.cfg.ema_rampup_epochs
        return 1.0 if T <= 0 or t >= T else math.exp(-5.0 * (1.0 - t / T) ** 2)

    def losses(self, img: Tensor, txt: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``dtcl_loss`` plus the unweighted terms ``itc``, ``cls``, ``ema`` and the weights."""
        cfg = self.cfg
        scale = self.logit_scale()
        sim = img @ txt.T
        pos = batch_positives(batch)
        terms: dict[str, Tensor] = {"itc": multi_positive_infonce(sim * scale, pos)}
        if cfg.triplet:
            terms["itc"] = terms["itc"] + hinge_triplet(sim, pos, cfg.margin, "all")
        if self.classifier is not None and "scene" in batch:
            scene = batch["scene"]  # the scene of each pair's image; -1 where unlabelled (ignored)
            known = scene >= 0
            if known.any():
                y = scene[known]
                ce = [
                    F.cross_entropy(self.classifier(e[known]), y, label_smoothing=cfg.label_smoothing)
                    for e in (img, txt)
                ]
                terms["cls"] = 0.5 * (ce[0] + ce[1])
        if "teacher_img" in batch:
            terms["ema"] = self._ema_term(img, txt, sim * scale, batch)
        ramps = {"ema": self.ema_ramp()}
        total = self.weighting(terms, ramps)
        out = {"dtcl_loss": total, **{k: v.detach() for k, v in terms.items()}}
        out["logit_scale"] = scale.detach()
        for n, w in self.weighting.weights(terms).items():
            out[f"w_{n}"] = w
        return out

    def _ema_term(self, img: Tensor, txt: Tensor, logits: Tensor, batch: dict[str, Any]) -> Tensor:
        """L_ema (spec §2.3): teacher → student KL on retrieval distributions and class posteriors."""
        t_img, t_txt = batch["teacher_img"], batch["teacher_txt"]
        target = self.cfg.ema_target
        if target == "embedding_mse":
            return 0.5 * (F.mse_loss(img, t_img) + F.mse_loss(txt, t_txt))
        parts: list[Tensor] = []
        if target in ("both", "retrieval"):
            t_logits = (t_img @ t_txt.T) * self.logit_scale().detach()
            parts += [_kl(t_logits, logits, 1), _kl(t_logits, logits, 0)]
        if target in ("both", "classification") and self.classifier is not None:
            w = F.normalize(batch["teacher_cls"], dim=-1)
            tc = self.classifier.temperature
            for t_emb, emb in ((t_img, img), (t_txt, txt)):
                parts.append(_kl(t_emb @ w.T / tc, self.classifier(emb), 1))
        return torch.stack(parts).mean() if parts else img.sum() * 0

    def set_schedule(self, steps_per_epoch: int) -> None:
        """Called by the trainer before training: the ramps are measured in epochs."""
        self.steps_per_epoch = max(1, steps_per_epoch)

    def on_step_end(self) -> None:
        """After each optimiser step: count it, update the teacher, clamp the log-variances."""
        self.step += 1
        self.weighting.clamp_()
        if self.teacher is not None:
            # μ ramps from 0.99 to its final value over the first epoch
            final = self.cfg.ema_decay
            frac = min(1.0, float(self.step) / self.steps_per_epoch)
            self.teacher.update(0.99 + frac * (final - 0.99) if final > 0.99 else final)

    def on_epoch_end(self) -> None:
        """DWA needs per-epoch loss means."""
        self.weighting.end_epoch()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Everything trainable is adapter-side (``head``): the towers stay frozen."""
        return {"backbone": [], "head": [p for p in self.parameters() if p.requires_grad]}

    def report_figures(self, corpus: Any, folder: str | Path, **kwargs: Any) -> list[Path]:
        """The paper's Fig. 1 motivation plot, before and after adaptation; see
        :func:`rsitr.models.methods._rdb_figures.write_embedding_plot`."""
        from rsitr.models.methods._rdb_figures import write_embedding_plot

        return write_embedding_plot(self, corpus, Path(folder), **kwargs)

    def trainable_summary(self) -> dict[str, int]:
        """Trainable parameter counts by part (logged at start-up)."""
        parts = {
            "image_adapters": _count(p for ins in self.image_tower.insertions for p in ins.parameters()),
            "text_adapters": _count(p for ins in self.text_tower.insertions for p in ins.parameters()),
            "shared": sum(p.numel() for p in self.shared.parameters()),
            "heads": sum(p.numel() for m in (self.image_head, self.text_head) for p in m.parameters()),
            "classifier": sum(p.numel() for p in self.classifier.parameters()) if self.classifier else 0,
        }
        parts["total"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return parts


def _count(params: Any) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def _as_float(feats: Features) -> Features:
    """Cached features may be stored in half precision; compute in float32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in feats.items()}
