"""``cmpagl``: Cross-Modal Pre-Aligned method with Global and Local information (Sun et al., TGRS 2024;
``../shared/papers/004_bab8e7ccfbbc55f6.txt``).

Three parts (§III-A, Fig. 1):

* the image encoder, Gswin (§III-B, :mod:`rsitr.models.encoders.gswin`), or any registered tower for
  the baseline rows; F_i is its pooled feature (Eq. 3) and F_i^token its final tokens. With
  ``gswin_on_map`` the Gswin stages run on a frozen CNN's feature map instead of on pixels
  (:class:`~rsitr.models.encoders.gswin.GswinOnMap`, e.g. EfficientNet-Lite0's 14×14×112 map at
  stride 16): the CNN is the frozen, cacheable part (``image_features`` returns its map) and the
  Gswin on it the trainable part (``embed_image``);
* the text encoder, the first N₀/2 layers of a BERT-like model (§III-C, Eq. 7–9; G_i is the 0-th
  token), e.g. ``minilm-l6`` (3 + 3) or ``hf:bert-base-uncased`` (6 + 6). Frozen
  (``freeze_text``), its token states are cached; ``text_tune_layers = k`` then moves its top k
  layers out of the frozen part, so that they (and the projection) train on the cached prefix;
* the multimodal encoder (§III-D), the other N₀/2 layers with a new cross-attention from the text
  tokens to the image tokens after each self-attention (ALBEF's "fusion" layers: the BERT weights
  are copied, the cross-attention is new). It runs in training only: retrieval is dual-stream,
  cosine similarity of the projected F_i and G_i.

The objective is Eq. 17, L = L_ITC + L_Triplet + L_MLM + L_ITM, each term with a weight that can
switch it off (0): ITC (Eq. 18) against momentum encoders (μ = 0.995) and a feature queue, the
optimized triplet (Eq. 19) over the in-batch pairs, MLM (Eq. 20) predicted by the multimodal encoder
from masked captions and the image, and ITM (Eq. 21) on the multimodal [CLS] with hard negatives
sampled from the in-batch ITC similarities. SMR (§III-E) is the default reranker at evaluation
(``default_rerank``; ``rsitr evaluate --rerank auto``), and ``rsitr evaluate --report`` draws Fig. 7.

Presets (``preset``) are the ablation rows of Tables III–VI:

====================  ==============================  =====================================
preset                terms (weights > 0)             row
====================  ==============================  =====================================
``baseline``          ITC + MLM                       ViTᵖ (pick ``image_encoder``)
``no-gw``             ITC + MLM, Gswin w/o GW          Gswinᵖ w/o GW
``no-slw``            ITC + MLM, Gswin w/o SLW         Gswinᵖ w/o SLW
``gswin``             ITC + MLM                       Gswinᵖ
``gswin+itm``         ITC + MLM + ITM                 Gswinᵖ + ITM
``cmpagl``            ITC + MLM + ITM + O-Tri         Gswinᵖ + ITM + O-Tri (PA-MI); + SMR at eval
``std-mi``            as ``cmpagl``, Std-MI fusion     Std-MI (Tables V–VI)
====================  ==============================  =====================================

With ``gswin_on_map`` the Gswin switches of the presets go to ``gswin_kwargs``, and the baseline's
ViTᵖ is the same on-map transformer with global attention (one window per stage) and no GW / SLW.

Both towers frozen (``freeze_image``, ``freeze_text``), a training step reads cached features: the
map (fp16) and the text half's padded token states (fp16, with the ids and mask that MLM re-masks).
The momentum encoders then copy only the trainable parts (Gswin on the map, the tuned text layers,
the projections); the frozen ones are shared. MLM still re-encodes its masked captions through the
frozen text layers (no gradient), since masking changes every state above the masked tokens.

``pre_aligned: false`` (Std-MI) is rsitr's reading of the paper's one-sentence description: the
same number of multimodal layers split into a text-query branch (the BERT half, cross-attending to
the image) and an image-query branch (new layers, cross-attending to the text), each fed the
*unimodal* tokens; ITM uses both branches' first tokens, MLM the text branch. The pre-alignment
terms (ITC, O-Tri) still train the retrieval embeddings, which are needed for dual-stream
retrieval in both architectures.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError
from rsitr.losses.contrastive import LearnableTemperature, batch_positives, queue_infonce
from rsitr.losses.triplet import optimized_triplet
from rsitr.models.ema import MeanTeacher
from rsitr.models.encoders.base import ImageEncoder, TextEncoder, masked_mean
from rsitr.models.encoders.gswin import GswinOnMap, attention
from rsitr.models.methods.base import Features, RetrievalMethod, merge_preset
from rsitr.models.methods.dual import STRONG_BASE_HEAD, projection_head
from rsitr.models.precision import native_bf16
from rsitr.models.registry import register_method

_logger = logging.getLogger(__name__)

#: The ablation rows of Tables III–VI (see the module docstring); explicit keys override them.
PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {"itm_weight": 0.0, "triplet_weight": 0.0},
    "no-gw": {"itm_weight": 0.0, "triplet_weight": 0.0, "image_encoder_kwargs": {"no_global_window": True}},
    "no-slw": {"itm_weight": 0.0, "triplet_weight": 0.0, "image_encoder_kwargs": {"no_shifted_window": True}},
    "gswin": {"itm_weight": 0.0, "triplet_weight": 0.0},
    "gswin+itm": {"triplet_weight": 0.0},
    "cmpagl": {},
    "std-mi": {"pre_aligned": False},
}
#: with ``gswin_on_map``, the presets' Gswin switches go to ``gswin_kwargs``, plus these per preset
ON_MAP_PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {"global_attention": True, "no_global_window": True, "no_shifted_window": True},
}
#: the parts that have momentum copies of their trainable parameters (the rest is training-only)
MOMENTUM_PARTS = (
    "image_encoder",
    "text_encoder",
    "gswin",
    "text_top",
    "image_proj",
    "global_head",
    "text_proj",
)
IGNORE = -100  # MLM label of positions that are not predicted


@dataclass(frozen=True)
class CMPAGLConfig:
    """Configuration of ``cmpagl``.

    Attributes:
        preset: an ablation row (``PRESETS``); explicit keys override its settings.
        image_encoder: image tower spec (``gswin``, ``gswin-tiny``, ``gswin@/w/swin_t.safetensors``;
            any registered tower for the baseline row).
        text_encoder: a BERT-like ``hf:`` model or ``minilm-l6``; it is split in two.
        image_encoder_kwargs: image encoder options (``no_global_window``, ``pool``, ``embed_dim``…).
        text_encoder_kwargs: text encoder options (``max_length``).
        gswin_on_map: run trainable Gswin stages on the image tower's feature map ``map_index``
            (:class:`~rsitr.models.encoders.gswin.GswinOnMap`) instead of using the tower's outputs.
        gswin_kwargs: options of the Gswin on the map (``embed_dim``, ``depths``, ``num_heads``,
            ``window``, ``mlp_ratio``, ``drop_path``, ``pool``, ``no_global_window``,
            ``no_shifted_window``, ``global_attention``); the presets' switches are merged in.
        map_index: which of the image tower's ``maps`` (``feature_info``) Gswin runs on
            (EfficientNet-Lite0: 2, the stride-16 map of 112 channels).
        freeze_image: freeze the image tower (the paper trains it).
        freeze_text: freeze the text half (the multimodal half is always trained).
        text_layers: layers of the text encoder; the rest form the multimodal encoder
            (``None``: half, N₀/2).
        text_tune_layers: with ``freeze_text``, train the top k of the text half on the cached
            states of the frozen rest (they are pretrained: ``optim.backbone_lr``); 0: only the
            projection is trained on the frozen G_i.
        text_pool: G_i from the text tokens: ``cls`` (Eq. 9, the 0-th token) or ``mean``.
        embed_dim: the joint space of ITC / O-Tri / retrieval (ALBEF: 256).
        pre_aligned: ``true`` PA-MI (text-query fusion of the pre-aligned towers), ``false`` Std-MI.
        itc_weight: weight of L_ITC (Eq. 18); 0 switches it (and the momentum encoders) off.
        triplet_weight: weight of L_Triplet (Eq. 19).
        itm_weight: weight of L_ITM (Eq. 21).
        mlm_weight: weight of L_MLM (Eq. 20).
        temperature: initial ITC temperature τ (learned, CLIP-style clamp 1/τ ≤ 100).
        learn_temperature: learn τ.
        momentum: μ of the momentum encoders, θ' ← μθ' + (1 − μ)θ after each step.
        queue_size: momentum feature queue length M (the paper: 65,536); in training it is capped
            at the number of training pairs per epoch; 0: in-batch momentum keys only.
        margin: α of Eq. 19.
        triplet_reduction: ``sum`` (Eq. 19) or ``mean`` (divided by the batch size).
        mlm_probability: share of caption tokens masked for MLM (80% [MASK], 10% random, 10% kept).
        fusion_pairs: ITM and MLM on the first n pairs of each micro-batch only (the batch order
            is random; hard negatives are still drawn from the whole batch): an unbiased estimate
            of Eq. 20–21 at n/B of the multimodal encoder's cost; 0: every pair (the paper).
        global_head: with ``gswin_on_map``, add the strong base's image branch to the image
            embedding: ``dual``'s MLP head (standardised input, dropout 0.3, hidden 1024) on the
            frozen tower's cached ``pooled`` vector (EfficientNet-Lite0 with ``pool: multi``: its
            2,048-d multi-tap average), so F_i′ = W_i·F_i + MLP(BN(pooled)); it is part of the
            momentum encoders. Off: the paper's W_i·F_i alone.
        bf16: train the trainable encoders (Gswin on the map, tuned text layers, multimodal
            encoder) under bfloat16 autocast, on CPU too (AVX512-BF16 / AMX); the weights,
            projections, heads and losses stay float32, and evaluation runs in float32.
            ``"auto"``: only where bf16 is native on the training device (AVX512-BF16 / AMX, or
            a GPU); emulated bf16 on an AVX2-only CPU is slower than float32.
    """

    preset: str | None = None
    image_encoder: str = "gswin-tiny"
    text_encoder: str = "minilm-l6"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    text_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    gswin_on_map: bool = False
    gswin_kwargs: dict[str, Any] = field(default_factory=dict)
    map_index: int = 2
    freeze_image: bool = False
    freeze_text: bool = False
    text_layers: int | None = None
    text_tune_layers: int = 0
    text_pool: Literal["cls", "mean"] = "cls"
    embed_dim: int = 256
    pre_aligned: bool = True
    itc_weight: float = 1.0
    triplet_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    temperature: float = 0.07
    learn_temperature: bool = True
    momentum: float = 0.995
    queue_size: int = 65536
    margin: float = 0.2
    triplet_reduction: Literal["sum", "mean"] = "sum"
    mlm_probability: float = 0.15
    fusion_pairs: int = 0
    global_head: bool = False
    bf16: bool | Literal["auto"] = False

    @classmethod
    def resolve(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` over its ``preset``'s settings; the preset's Gswin switches are merged
        into ``image_encoder_kwargs``, or into ``gswin_kwargs`` with ``gswin_on_map``."""
        merged = dict(merge_preset(values, PRESETS))
        preset = values.get("preset") or ""
        on_map = values.get("gswin_on_map") is True
        switches = {**PRESETS.get(preset, {}).get("image_encoder_kwargs", {})}
        if on_map:
            switches.update(ON_MAP_PRESETS.get(preset, {}))
        for key in ("image_encoder_kwargs", "gswin_kwargs"):
            merged.pop(key, None)
            if key in values:
                merged[key] = dict(values[key] or {})
        if switches:
            key = "gswin_kwargs" if on_map else "image_encoder_kwargs"
            merged[key] = {**switches, **merged.get(key, {})}
        return merged

    def __post_init__(self) -> None:
        for name, allowed in (("text_pool", ("cls", "mean")), ("triplet_reduction", ("sum", "mean"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        weights = ("itc_weight", "triplet_weight", "itm_weight", "mlm_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"model.{name} must be >= 0 (0 switches the term off), got {getattr(self, name)}"
                )
        if self.itc_weight == 0 and self.triplet_weight == 0:
            raise ConfigError(
                "model.itc_weight and model.triplet_weight are both 0: nothing would train the retrieval "
                "embeddings; keep at least one of the pre-alignment terms"
            )
        if self.text_layers is not None and self.text_layers < 1:
            raise ConfigError(f"model.text_layers must be >= 1 (or null for half), got {self.text_layers}")
        if self.text_tune_layers < 0:
            raise ConfigError(f"model.text_tune_layers must be >= 0, got {self.text_tune_layers}")
        if self.text_tune_layers and not self.freeze_text:
            raise ConfigError(
                "model.text_tune_layers needs model.freeze_text: true (an unfrozen text half trains "
                "all its layers)"
            )
        if not isinstance(self.gswin_on_map, bool):
            raise ConfigError(f"model.gswin_on_map must be true or false, got {self.gswin_on_map!r}")
        if self.fusion_pairs < 0:
            raise ConfigError(f"model.fusion_pairs must be >= 0 (0: every pair), got {self.fusion_pairs}")
        if self.gswin_kwargs and not self.gswin_on_map:
            raise ConfigError("model.gswin_kwargs needs model.gswin_on_map: true")
        if self.global_head and not self.gswin_on_map:
            raise ConfigError("model.global_head needs model.gswin_on_map: true")
        if self.map_index < 0:
            raise ConfigError(f"model.map_index must be >= 0, got {self.map_index}")
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"model.momentum must lie in [0, 1), got {self.momentum}")
        if self.queue_size < 0:
            raise ConfigError(f"model.queue_size must be >= 0, got {self.queue_size}")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"model.mlm_probability must lie in (0, 1), got {self.mlm_probability}")
        if not 0 < self.temperature < 1:
            raise ConfigError(f"model.temperature must lie in (0, 1), got {self.temperature}")
        if self.margin < 0:
            raise ConfigError(f"model.margin must be >= 0, got {self.margin}")


# --- the momentum feature queue -------------------------------------------------------------------------
class FeatureQueue(nn.Module):
    """A ring buffer of momentum image/caption embeddings and their image ids (Eq. 18's M keys).

    Empty slots have id −1. The buffers are not saved in checkpoints (they are rebuilt within an
    epoch of training), so inference checkpoints stay small and the length can be capped after
    construction (:meth:`resize`).

    Args:
        size: capacity M (0: no queue).
        dim: embedding dimension.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("image", torch.zeros(size, dim), persistent=False)
        self.register_buffer("text", torch.zeros(size, dim), persistent=False)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("text_ids", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def size(self) -> int:
        """Capacity M."""
        return self.ids.numel()

    def resize(self, size: int) -> None:
        """Empty the queue and set its capacity."""
        dev = self.ids.device
        self.image = torch.zeros(size, self.dim, device=dev)
        self.text = torch.zeros(size, self.dim, device=dev)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=dev)
        self.text_ids = torch.full((size,), -1, dtype=torch.long, device=dev)
        self.ptr = torch.zeros((), dtype=torch.long, device=dev)

    @torch.no_grad()
    def push(self, image: Tensor, text: Tensor, ids: Tensor, text_ids: Tensor | None = None) -> None:
        """Enqueue (n, D), (n, D), (n,) [and (n,) caption text ids] over the oldest entries (the
        newest M when n > M)."""
        m = self.size
        if m == 0:
            return
        image, text, ids = image[-m:], text[-m:], ids[-m:]
        slots = (self.ptr + torch.arange(ids.numel(), device=ids.device)) % m
        self.image[slots] = image.detach().to(self.image.dtype)
        self.text[slots] = text.detach().to(self.text.dtype)
        self.ids[slots] = ids
        self.text_ids[slots] = -1 if text_ids is None else text_ids[-m:]
        self.ptr.copy_((self.ptr + ids.numel()) % m)


# --- the multimodal encoder -----------------------------------------------------------------------------
@dataclass
class TokenLayout:
    """Where the valid tokens of a right-padded (B, L) batch sit.

    The multimodal layers run their token-wise parts (projections, FFN, norms) on the T valid
    tokens only, packed as (T, …) rows; attention pads them back to (B, L, …) and masks the rest.
    RSICD captions average 14 tokens against a batch's longest of about 24.

    Attributes:
        mask: (B, L) bool, True = valid.
        index: (T,) flat positions b·L + t of the valid tokens, in order.
        seq: (T,) the sequence b of each valid token.
    """

    mask: Tensor
    index: Tensor
    seq: Tensor

    @classmethod
    def of(cls, mask: Tensor) -> TokenLayout:
        """The layout of a (B, L) mask."""
        index = mask.flatten().nonzero().squeeze(1)
        return cls(mask, index, torch.div(index, mask.shape[1], rounding_mode="floor"))

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, …) → (T, …)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(T, …) → (B, L, …), zeros at padded positions."""
        b, n = self.mask.shape
        out = x.new_zeros(b * n, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(b, n, *x.shape[1:])

    def rows(self, flat: Tensor) -> Tensor:
        """Packed row numbers of flat positions b·L + t (which must be valid)."""
        where = torch.full((self.mask.numel(),), -1, dtype=torch.long, device=flat.device)
        where[self.index] = torch.arange(self.index.numel(), device=flat.device)
        return where[flat]


class Attention(nn.Module):
    """Multi-head (cross-)attention with BERT's q/k/v/output projections (used part by part by
    :class:`FusionLayer`, on packed tokens)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim or dim, dim)
        self.value = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:
        """(N, S, D) → (N, heads, S, D / heads)."""
        n, s, d = x.shape
        return x.view(n, s, self.heads, d // self.heads).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q kᵀ / √d) v: (N, h, L, d) over (N, h, S, d) with mask (N, 1, 1, S) True = valid
        → (N, L, D), heads merged (before the output projection)."""
        p = self.dropout if self.training else 0.0
        return attention(q, k, v, attn_mask=mask, dropout_p=p).transpose(1, 2).flatten(2)


class FusionLayer(nn.Module):
    """A multimodal layer (§III-D): BERT's post-LN layer with a cross-attention after self-attention.

    x ← LN(x + SelfAttn(x)); x ← LN(x + CrossAttn(x, context)); x ← LN(x + FFN(x)), as ALBEF's
    fusion layers. :meth:`load_bert_layer` copies a BERT layer's self-attention and FFN. Without a
    context (``ctx_dim=None``) it is a plain BERT layer (the tuned top of a frozen text half).

    Args:
        dim: hidden width.
        heads: attention heads.
        ffn_dim: FFN hidden width.
        ctx_dim: width of the context tokens (image tokens, or text tokens for Std-MI's image
            branch); ``None``: no cross-attention.
        act: the FFN activation.
        dropout: hidden dropout.
        attn_dropout: attention-probability dropout.
        eps: LayerNorm epsilon.
    """

    #: submodules whose weights come from a pretrained BERT layer
    BERT_PARTS: ClassVar[tuple[str, ...]] = ("self_attn.", "self_norm.", "ffn_in.", "ffn_out.", "ffn_norm.")

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        ctx_dim: int | None,
        act: nn.Module,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=attn_dropout)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn: Attention | None = None
        self.cross_norm: nn.LayerNorm | None = None
        if ctx_dim is not None:
            self.cross_attn = Attention(dim, heads, kv_dim=ctx_dim, dropout=attn_dropout)
            self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.act = act
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        layout: TokenLayout,
        ctx: Tensor | None = None,
        ctx_mask: Tensor | None = None,
        ctx_index: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Packed (T, D) tokens of ``layout``'s B sequences → (T, D), or (N, D) for ``rows``.

        Args:
            x: (T, D) the valid tokens, packed.
            layout: where they sit in the (B, L) batch.
            ctx: (B_ctx, S, D_ctx) context tokens (``None`` without cross-attention).
            ctx_mask: (B_ctx, S) bool, True = valid (``None``: all valid).
            ctx_index: (B,) the context row of each sequence (``None``: the same row); the keys
                and values are projected once per context row.
            rows: packed rows whose outputs are needed (the last layer under ITM, which reads the
                [CLS] states, and MLM, which reads the masked ones): the self-attention still
                attends over every token, but only these rows are queried and carried on.
        """
        a = self.self_attn
        k, v = a.split(layout.pad(a.key(x))), a.split(layout.pad(a.value(x)))  # (B, h, L, d)
        mask = layout.mask[:, None, None, :]
        at = None  # the sequence of each query row, when not all of them
        if rows is None:
            h = layout.pack(a.attend(a.split(layout.pad(a.query(x))), k, v, mask))
        else:
            x, at = x.index_select(0, rows), layout.seq[rows]
            k, v, mask = (t.index_select(0, at) for t in (k, v, mask))
            h = a.attend(a.split(a.query(x)[:, None]), k, v, mask)[:, 0]
        x = self.self_norm(x + self.drop(a.out(h)))
        if self.cross_attn is not None:
            assert ctx is not None and self.cross_norm is not None
            c = self.cross_attn
            ck, cv = c.split(c.key(ctx)), c.split(c.value(ctx))  # (B_ctx, h, S, d): once per context
            cmask = None if ctx_mask is None else ctx_mask[:, None, None, :]
            if ctx_index is not None:
                at = ctx_index if at is None else ctx_index[at]
            if at is not None:  # index_select: its backward is a vectorised index_add
                ck, cv = ck.index_select(0, at), cv.index_select(0, at)
                cmask = None if cmask is None else cmask.index_select(0, at)
            if rows is None:
                h = layout.pack(c.attend(c.split(layout.pad(c.query(x))), ck, cv, cmask))
            else:
                h = c.attend(c.split(c.query(x)[:, None]), ck, cv, cmask)[:, 0]
            x = self.cross_norm(x + self.drop(c.out(h)))
        return self.ffn_norm(x + self.drop(self.ffn_out(self.act(self.ffn_in(x)))))

    @torch.no_grad()
    def load_bert_layer(self, layer: nn.Module) -> None:
        """Copy a transformers ``BertLayer``'s self-attention, its output norm and the FFN."""
        src = dict(layer.named_parameters())
        pairs = {
            "self_attn.query": "attention.self.query", "self_attn.key": "attention.self.key",
            "self_attn.value": "attention.self.value", "self_attn.out": "attention.output.dense",
            "self_norm": "attention.output.LayerNorm", "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
        }  # fmt: skip
        own = dict(self.named_parameters())
        for mine, theirs in pairs.items():
            for kind in ("weight", "bias"):
                if f"{theirs}.{kind}" not in src:
                    raise ConfigError(f"text encoder layer has no {theirs}.{kind}: not a BERT-like layer")
                own[f"{mine}.{kind}"].copy_(src[f"{theirs}.{kind}"])


class MLMHead(nn.Module):
    """BERT's MLM head: Dense → act → LayerNorm → logits tied to the word embeddings (+ bias).

    The word-embedding matrix stays owned by the text encoder (not a submodule here).
    """

    def __init__(self, dim: int, act: nn.Module, eps: float, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = act
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self._embeddings = [word_embeddings]

    def forward(self, h: Tensor) -> Tensor:
        """(…, D) hidden states → (…, vocab) logits."""
        return F.linear(self.norm(self.act(self.dense(h))), self._embeddings[0].weight, self.bias)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Tensor,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking for Eq. 20: choose ``probability`` of the real, non-special tokens.

    Of the chosen tokens 80% become [MASK], 10% a random token and 10% stay; the labels hold the
    original ids at the chosen positions and −100 (ignored) everywhere else.

    Args:
        input_ids: (B, L) token ids.
        attention_mask: (B, L), nonzero for real tokens.
        mask_id: the [MASK] id.
        vocab_size: size of the vocabulary (random replacements).
        special_ids: (S,) ids never masked ([CLS], [SEP], [PAD]…).
        probability: share of eligible tokens chosen (the paper: 15%).
        generator: optional RNG (tests).
        text_ids: (B,) caption text ids: a pair with the same caption text is no negative either.

    Returns:
        ``(masked_ids, labels)``, both (B, L).
    """
    dev = input_ids.device
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(dev))
    chosen = eligible & (torch.rand(input_ids.shape, generator=generator, device=dev) < probability)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    r = torch.rand(input_ids.shape, generator=generator, device=dev)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev)
    ids = input_ids.masked_fill(chosen & (r < 0.8), mask_id)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
    return ids, labels


@torch.no_grad()
def hard_negatives(
    sim: Tensor, ids: Tensor, generator: torch.Generator | None = None, text_ids: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ITM hard negatives (ALBEF): for every caption an image, for every image a caption, sampled
    ∝ softmax of the ITC similarities over the in-batch *negatives* (pairs of another image).

    Args:
        sim: (B, B) scaled similarities, rows images and columns captions.
        ids: (B,) image id of each pair.
        generator: optional RNG (tests).

    Returns:
        ``(neg_img, neg_txt, has_img, has_txt)``: (B,) the sampled image for each caption and caption
        for each image, and (B,) bool whether the caption / image had any negative at all (where
        not, the sample is meaningless and must be dropped).
    """
    neg = ids[:, None] != ids[None, :]  # (B, B) image i vs caption j
    if text_ids is not None:
        neg = neg & (text_ids[:, None] != text_ids[None, :])
    has_txt, has_img = neg.any(1), neg.any(0)
    w_txt = sim.masked_fill(~neg, float("-inf")).softmax(1)  # for each image, over captions
    w_img = sim.T.masked_fill(~neg.T, float("-inf")).softmax(1)  # for each caption, over images
    w_txt = torch.where(has_txt[:, None], w_txt, torch.ones_like(w_txt))  # rows without negatives
    w_img = torch.where(has_img[:, None], w_img, torch.ones_like(w_img))
    neg_txt = torch.multinomial(w_txt, 1, generator=generator).squeeze(1)
    neg_img = torch.multinomial(w_img, 1, generator=generator).squeeze(1)
    return neg_img, neg_txt, has_img, has_txt


def _bert_config(text_encoder: TextEncoder) -> Any:
    model = getattr(text_encoder, "model", None)
    cfg = getattr(model, "config", None)
    emb = getattr(getattr(model, "embeddings", None), "word_embeddings", None)
    if cfg is None or emb is None or not hasattr(text_encoder, "layers"):
        raise ConfigError(
            f"cmpagl splits a BERT-like text encoder (minilm-l6, hf:bert-base-uncased); "
            f"{text_encoder.name!r} is not one"
        )
    return cfg


@register_method("cmpagl")
class CMPAGL(RetrievalMethod):
    """Gswin + half-BERT towers, pre-aligned by ITC/O-Tri, fused by the other BERT half (training only)."""

    name = "cmpagl"
    Config = CMPAGLConfig
    #: ``rsitr evaluate --rerank auto`` uses SMR (§III-E) for this method
    default_rerank: ClassVar[str] = "smr"

    def __init__(self, cfg: CMPAGLConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__(cfg, image_encoder, text_encoder)
        bert = _bert_config(text_encoder)
        layers = text_encoder.layers  # type: ignore[attr-defined]
        n = len(layers)
        k = n // 2 if cfg.text_layers is None else cfg.text_layers
        if not 1 <= k < n:
            raise ConfigError(
                f"model.text_layers: {k} is not within 1..{n - 1} for {text_encoder.name} ({n} layers)"
            )
        # Split the stack: the first k layers stay in the text encoder (Eq. 8), the others move into
        # the multimodal encoder (copied into fusion layers, so the text encoder holds only its half).
        upper = text_encoder.truncate(k)  # type: ignore[attr-defined]
        self.num_text_layers, self.num_fusion_layers = k, n - k
        from transformers.activations import ACT2FN

        h = bert.hidden_size

        def fusion_layer(ctx_dim: int | None) -> FusionLayer:
            return FusionLayer(
                h, bert.num_attention_heads, bert.intermediate_size, ctx_dim, ACT2FN[bert.hidden_act],
                bert.hidden_dropout_prob, bert.attention_probs_dropout_prob, bert.layer_norm_eps,
            )  # fmt: skip

        # The top text_tune_layers of a frozen half move out of it (copied into plain layers that
        # run on packed tokens) and train on the cached states of the layers below.
        self.text_top: nn.ModuleList | None = None
        t = cfg.text_tune_layers
        if t:
            if not t < k:
                raise ConfigError(
                    f"model.text_tune_layers: {t} is not within 1..{k - 1} (the text half has {k} layers; "
                    "at least one stays frozen)"
                )
            self.text_top = nn.ModuleList()
            for layer in layers[k - t : k]:
                self.text_top.append(fusion_layer(None))
                self.text_top[-1].load_bert_layer(layer)
            text_encoder.truncate(k - t)  # type: ignore[attr-defined]
        # Cached text features are the padded token states (with the ids and mask MLM re-masks):
        # extraction trims them per batch and pads them back; a frozen half is stored in fp16.
        self.padded_text_keys = ("tokens", "input_ids", "attention_mask")
        if text_encoder.frozen:
            self.text_cache_dtype = torch.float16
        self.gswin: GswinOnMap | None = None
        if cfg.gswin_on_map:
            self.gswin = _gswin_on_map(cfg, image_encoder)
            self.cache_dtype = torch.float16  # the cached map
        img_dim = image_encoder.num_features if self.gswin is None else self.gswin.num_features
        img_tok_dim = image_encoder.token_dim if self.gswin is None else self.gswin.token_dim
        tok = text_encoder.tokenizer  # type: ignore[attr-defined]
        if cfg.mlm_weight > 0 and tok.mask_token_id is None:
            raise ConfigError(f"model.mlm_weight > 0 needs a [MASK] token; {text_encoder.name} has none")
        self.mask_id = tok.mask_token_id
        self.register_buffer("special_ids", torch.tensor(sorted(set(tok.all_special_ids))), persistent=False)
        m = n - k
        n_text = m if cfg.pre_aligned else (m + 1) // 2
        n_image = 0 if cfg.pre_aligned else m // 2
        if not cfg.pre_aligned and n_image == 0:
            raise ConfigError(
                f"model.pre_aligned=false (Std-MI) needs >= 2 multimodal layers; {text_encoder.name} "
                f"leaves {m} with text_layers={k}"
            )
        needs_fusion = cfg.itm_weight > 0 or cfg.mlm_weight > 0
        self.fusion = nn.ModuleList()
        self.image_fusion = nn.ModuleList()
        self.image_fusion_in: nn.Module | None = None
        if needs_fusion:
            for layer in upper[:n_text]:
                fl = fusion_layer(img_tok_dim)
                fl.load_bert_layer(layer)
                self.fusion.append(fl)
            self.image_fusion.extend(fusion_layer(h) for _ in range(n_image))
            if n_image:
                self.image_fusion_in = nn.Sequential(nn.Linear(img_tok_dim, h), nn.LayerNorm(h))
        self.image_proj = nn.Linear(img_dim, cfg.embed_dim)
        self.global_head = (
            projection_head(image_encoder.num_features, cfg.embed_dim, **STRONG_BASE_HEAD)
            if cfg.global_head
            else None
        )
        self.text_proj = nn.Linear(h, cfg.embed_dim)
        self.logit_scale = LearnableTemperature(cfg.temperature)
        self.logit_scale.log_scale.requires_grad_(cfg.learn_temperature)
        self.itm_head = nn.Linear(h if cfg.pre_aligned else 2 * h, 2) if cfg.itm_weight > 0 else None
        self.mlm_head: MLMHead | None = None
        if cfg.mlm_weight > 0:
            emb = text_encoder.model.embeddings.word_embeddings  # type: ignore[attr-defined]
            self.mlm_head = MLMHead(h, ACT2FN[bert.hidden_act], bert.layer_norm_eps, emb)
        self.queue = FeatureQueue(cfg.queue_size if cfg.itc_weight > 0 else 0, cfg.embed_dim)
        self.steps_per_epoch: int | None = None
        self._queue_capped = False
        self._pairs_this_step = 0  # pairs enqueued since the last optimiser step (all micro-batches)
        self.momentum: MeanTeacher | None = None
        if cfg.itc_weight > 0:  # last: it tracks the parameters that exist now
            other = tuple(f"{name}." for name, _ in self.named_children() if name not in MOMENTUM_PARTS)
            self.momentum = MeanTeacher(self, exclude=other)

    def _autocast(self) -> AbstractContextManager[Any]:
        """bfloat16 autocast of the trainable encoders in training when ``bf16`` is set (the
        weights stay float32; evaluation embeds in float32)."""
        device = self.text_proj.weight.device.type
        on = native_bf16(device) if self.cfg.bf16 == "auto" else self.cfg.bf16
        if not (on and self.training):
            return nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)

    # --- the four hooks (inference: the two towers and their projections only) --------------------------
    def image_features(self, images: Tensor) -> Features:
        """The frozen part: ``pooled`` F_i (Eq. 3) and ``tokens`` F_i^token (B, N, C), or with
        ``gswin_on_map`` the tower's ``map`` (B, C_map, H, W) that Gswin runs on."""
        out = self.image_encoder(images)
        if self.gswin is not None:
            pooled = {"pooled": out.pooled} if self.global_head is not None else {}
            return {"map": out.maps[self.cfg.map_index], **pooled}
        return {"pooled": out.pooled, "tokens": out.tokens}

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """The frozen part: ``tokens`` G_i^token (Eq. 8; with ``text_tune_layers`` the states below
        the tuned layers), the ids and mask MLM re-masks, and ``pooled`` G_i (Eq. 9) unless tuned
        layers come after."""
        out = self.text_encoder(input_ids, attention_mask)
        feats = {"tokens": out.tokens, "input_ids": input_ids, "attention_mask": attention_mask}
        if self.text_top is None:
            feats["pooled"] = self._text_pool(out.tokens, out.mask)
        return feats

    def image_states(self, feats: Features) -> tuple[Tensor, Tensor]:
        """F_i (Eq. 3) and F_i^token (B, N, C) from :meth:`image_features`: the Gswin on the map
        (trainable) runs here."""
        if self.gswin is None:
            return feats["pooled"].float(), feats["tokens"].float()
        with self._autocast():
            out = self.gswin(feats["map"])
        return out.pooled.float(), out.tokens.float()

    def text_states(self, feats: Features) -> tuple[Tensor, Tensor, Tensor]:
        """G_i (Eq. 9), G_i^token (B, L, H) and the mask (B, L) from :meth:`text_features`, cut to
        the batch's longest caption (cached features are padded to the tokenizer's length); the
        tuned top layers of the text half (trainable) run here."""
        mask = feats["attention_mask"]
        n = max(1, int(mask.ne(0).sum(1).max()))
        tokens, mask = feats["tokens"][:, :n].float(), mask[:, :n].bool()
        if self.text_top is not None:
            layout = TokenLayout.of(mask)
            x = layout.pack(tokens)
            with self._autocast():
                for layer in self.text_top:
                    x = layer(x, layout)
            tokens = layout.pad(x.float())
        return self._text_pool(tokens, mask), tokens, mask

    def _text_pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return tokens[:, 0] if self.cfg.text_pool == "cls" else masked_mean(tokens, mask)

    def embed_image(self, feats: Features) -> Tensor:
        return self.project_image(self.image_states(feats)[0], feats)

    def project_image(self, pooled: Tensor, feats: Features) -> Tensor:
        """W_i·F_i, plus the strong base's MLP head on the frozen pooled vector (``global_head``)."""
        out = self.image_proj(pooled)
        if self.global_head is not None:
            out = out + self.global_head(feats["pooled"].float())
        return out

    def embed_text(self, feats: Features) -> Tensor:
        return self.text_proj(self.text_states(feats)[0])

    def cache_identity(self) -> dict[str, Any]:
        """The cached features: the tower's map ``map_index`` (``gswin_on_map``), and the first
        ``text_layers`` − ``text_tune_layers`` text layers."""
        return {**self.image_cache_identity(), **self.text_cache_identity()}

    def image_cache_identity(self) -> dict[str, Any]:
        if self.gswin is None:
            return {}
        pooled = {"pooled": True} if self.global_head is not None else {}
        return {"map_index": self.cfg.map_index, **pooled}

    def text_cache_identity(self) -> dict[str, Any]:
        if self.text_top is not None:  # the pooling runs after the tuned layers, not in the cache
            return {"text_layers": self.num_text_layers, "text_tune_layers": self.cfg.text_tune_layers}
        return {"text_layers": self.num_text_layers, "text_pool": self.cfg.text_pool}

    # --- training ---------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The weighted terms of Eq. 17 (``itc_loss``, ``triplet_loss``, ``itm_loss``, ``mlm_loss``)
        plus the unweighted values (``itc``, ``triplet``, ``itm``, ``mlm``) and ``logit_scale``.

        ITC and O-Tri use the (gathered) batch; ITM and MLM run the multimodal encoder on this
        rank's pairs. The queue is updated only in training mode.
        """
        cfg = self.cfg
        img_feats, txt_feats = self._image_feats(batch), self._text_feats(batch)
        img_pooled, img_tok = self.image_states(img_feats)
        txt_pooled, txt_tok, txt_mask = self.text_states(txt_feats)
        img = F.normalize(self.project_image(img_pooled, img_feats), dim=-1)
        txt = F.normalize(self.text_proj(txt_pooled), dim=-1)
        g = self.gather
        ids, tids = batch["image_id"], batch.get("text_id")  # text_id: duplicate_captions=positive
        img_g, txt_g, ids_g = g(img), g(txt), g(ids)
        tids_g = None if tids is None else g(tids)
        scale = self.logit_scale()
        terms: dict[str, Tensor] = {}
        if cfg.itc_weight > 0:
            img_m, txt_m = (g(t) for t in self.momentum_embeddings(batch, img_feats, txt_feats))
            q = self.queue
            key_tids = None if tids_g is None else torch.cat([tids_g, q.text_ids])
            terms["itc"] = queue_infonce(
                img_g, txt_g, ids_g,
                torch.cat([img_m, q.image]), torch.cat([txt_m, q.text]), torch.cat([ids_g, q.ids]), scale,
                text_ids=tids_g, key_text_ids=key_tids,
            )  # fmt: skip
            if self.training:
                q.push(img_m, txt_m, ids_g, tids_g)
                self._pairs_this_step += ids_g.numel()
        if cfg.triplet_weight > 0:
            pos = batch_positives({"image_id": ids_g} | ({} if tids_g is None else {"text_id": tids_g}))
            terms["triplet"] = optimized_triplet(img_g @ txt_g.T, pos, cfg.margin, cfg.triplet_reduction)
        if cfg.itm_weight > 0:
            terms["itm"] = self.itm_loss(img, txt, ids, img_tok, txt_tok, txt_mask, scale.detach(), tids)
        if cfg.mlm_weight > 0:
            terms["mlm"] = self.mlm_loss({"tokens": img_tok}, txt_feats)
        out = {f"{k}_loss": getattr(cfg, f"{k}_weight") * v for k, v in terms.items()}
        out.update({k: v.detach() for k, v in terms.items()})
        out["logit_scale"] = scale.detach()
        return out

    @torch.no_grad()
    def momentum_embeddings(
        self, batch: dict[str, Any], img_feats: Features, txt_feats: Features
    ) -> tuple[Tensor, Tensor]:
        """Normalised momentum embeddings of the batch (no gradient): the momentum copies of the
        trainable parts run on the frozen parts' features, which are shared."""
        assert self.momentum is not None
        with self.momentum.swapped():
            fi = img_feats if self.image_encoder.frozen else self.image_features(batch["image"])
            ft = txt_feats
            if not self.text_encoder.frozen:
                ft = self.text_features(batch["input_ids"], batch["attention_mask"])
            return F.normalize(self.embed_image(fi), dim=-1), F.normalize(self.embed_text(ft), dim=-1)

    def _cap_queue(self, pairs_per_step: int) -> None:
        """After the first optimiser step: M ≤ the training pairs per epoch (steps × pairs per step).

        Capping empties the queue, which then loses only the first step's keys.
        """
        self._queue_capped = True
        cap = (self.steps_per_epoch or 0) * pairs_per_step
        if 0 < cap < self.queue.size:
            _logger.info(
                "cmpagl: queue_size %d capped to %d (training pairs per epoch)", self.queue.size, cap
            )
            self.queue.resize(cap)

    def fuse(
        self,
        img_tok: Tensor,
        txt_tok: Tensor,
        txt_mask: Tensor,
        img_index: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """The multimodal encoder's text-query stream: (B, L, H) text states conditioned on the image.

        Args:
            img_tok: (B_img, N, C) image tokens.
            txt_tok: (B, L, H) text tokens.
            txt_mask: (B, L) bool.
            img_index: (B,) the image of each caption (``None``: caption b with image b); the
                cross-attention keys are projected once per image.
            rows: flat indices into the B·L positions that are read (ITM's [CLS], MLM's masked
                tokens): the last layer computes only those, and the result is (N, H).
        """
        layout = TokenLayout.of(txt_mask)
        x = layout.pack(txt_tok)
        packed_rows = None if rows is None else layout.rows(rows)
        with self._autocast():
            for i, layer in enumerate(self.fusion):
                last = i == len(self.fusion) - 1
                x = layer(x, layout, img_tok, ctx_index=img_index, rows=packed_rows if last else None)
        return layout.pad(x.float()) if rows is None else x.float()

    def fused_pair(
        self,
        img_tok: Tensor,
        txt_tok: Tensor,
        txt_mask: Tensor,
        img_index: Tensor | None = None,
        txt_index: Tensor | None = None,
    ) -> Tensor:
        """The ITM feature of each pair (``img_index[p]``, ``txt_index[p]``), default pair b = (b, b):
        the fused [CLS] (PA-MI), or [CLS] ⊕ the image-query branch's first token (Std-MI).
        Each image's and caption's own projections are computed once however many pairs share it."""
        if txt_index is not None:
            txt_tok_p, txt_mask_p = txt_tok.index_select(0, txt_index), txt_mask.index_select(0, txt_index)
        else:
            txt_tok_p, txt_mask_p = txt_tok, txt_mask
        p, n_txt, n_img = txt_tok_p.shape[0], txt_tok_p.shape[1], img_tok.shape[1]
        first = torch.arange(p, device=txt_tok.device)
        cls = self.fuse(img_tok, txt_tok_p, txt_mask_p, img_index, rows=first * n_txt)
        if self.image_fusion_in is None:
            return cls
        with self._autocast():
            y = self.image_fusion_in(img_tok)  # (B_img, N, H), once per image
            y = y if img_index is None else y.index_select(0, img_index)
            layout = TokenLayout.of(torch.ones(y.shape[:2], dtype=torch.bool, device=y.device))
            y = layout.pack(y)
            for i, layer in enumerate(self.image_fusion):
                rows = first * n_img if i == len(self.image_fusion) - 1 else None
                y = layer(y, layout, txt_tok, txt_mask, ctx_index=txt_index, rows=rows)
        return torch.cat([cls, y.float()], dim=-1)

    def itm_loss(
        self, img: Tensor, txt: Tensor, ids: Tensor, img_tok: Tensor, txt_tok: Tensor, txt_mask: Tensor,
        scale: Tensor, text_ids: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """L_ITM (Eq. 21): the B matching pairs, plus for every caption a hard negative image and for
        every image a hard negative caption (:func:`hard_negatives`); the multimodal encoder scores
        all of them in one pass. With ``fusion_pairs`` = n, only the first n pairs are anchors
        (their negatives are still drawn from the whole batch).

        Args:
            img: (B, D) normalised image embeddings (the hard negatives' ITC similarities).
            txt: (B, D) normalised caption embeddings.
            ids: (B,) image ids (pairs of one image are no negatives).
            img_tok: (B, N, C) F_i^token.
            txt_tok: (B, L, H) G_i^token.
            txt_mask: (B, L) bool.
            scale: the ITC logit scale.
            text_ids: (B,) caption text ids (equal captions are no negatives either).
        """
        b = min(self.cfg.fusion_pairs or ids.numel(), ids.numel())
        neg_img, neg_txt, has_img, has_txt = (
            t[:b] for t in hard_negatives((img @ txt.T).detach().float() * scale, ids, text_ids=text_ids)
        )
        ar = torch.arange(b, device=ids.device)
        img_idx = torch.cat([ar, neg_img[has_img], ar[has_txt]])
        txt_idx = torch.cat([ar, ar[has_img], neg_txt[has_txt]])
        labels = (torch.arange(img_idx.numel(), device=ids.device) < b).long()  # 1: match, 0: negative
        # only the images and captions that take part (all of them unless fusion_pairs < B)
        imgs, img_idx = img_idx.unique(return_inverse=True)
        txts, txt_idx = txt_idx.unique(return_inverse=True)
        pair = self.fused_pair(img_tok[imgs], txt_tok[txts], txt_mask[txts], img_idx, txt_idx)
        assert self.itm_head is not None
        return F.cross_entropy(self.itm_head(pair), labels)

    def mlm_loss(self, img_feats: Features, txt_feats: Features) -> Tensor:
        """L_MLM (Eq. 20): −(1/B) Σᵢ Σ_t [m_t = 1] log P(w_t | masked caption, image), predicted from
        the multimodal encoder's text states at the masked positions.

        The masked captions run through the whole text half again (the frozen layers without a
        gradient). ``img_feats`` holds F_i^token as ``tokens`` or the frozen ``map``. With
        ``fusion_pairs`` = n, only the first n captions are masked and predicted.
        """
        assert self.mlm_head is not None
        b = self.cfg.fusion_pairs or txt_feats["attention_mask"].shape[0]
        att = txt_feats["attention_mask"][:b]
        n = max(1, int(att.ne(0).sum(1).max()))
        ids, att = txt_feats["input_ids"][:b, :n], att[:, :n]
        vocab = self.mlm_head.bias.numel()
        masked, labels = mask_tokens(
            ids, att, self.mask_id, vocab, self.special_ids, self.cfg.mlm_probability
        )
        rows = (labels != IGNORE).flatten().nonzero().squeeze(1)  # the masked positions of B·L
        if rows.numel() == 0:  # nothing masked in this batch (tiny batches of short captions)
            return self.mlm_head.bias.sum() * 0.0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_encoder.frozen):
            feats = self.text_features(masked, att)
        _, tokens, mask = self.text_states(feats)
        img_feats = {k: v[:b] for k, v in img_feats.items()}
        img_tok = img_feats["tokens"].float() if "tokens" in img_feats else self.image_states(img_feats)[1]
        x = self.fuse(img_tok, tokens, mask, rows=rows)  # (n_masked, H)
        logits = self.mlm_head(x)  # float32: the tied (frozen) embedding matrix is not cast each step
        return F.cross_entropy(logits, labels.flatten()[rows], reduction="sum") / ids.shape[0]

    def set_schedule(self, steps_per_epoch: int) -> None:
        """Called by the trainer before training: the queue is capped at steps × pairs per step."""
        self.steps_per_epoch = max(1, steps_per_epoch)

    def on_step_end(self) -> None:
        """θ' ← μθ' + (1 − μ)θ for the momentum encoders and projections; the queue cap after step 1."""
        if self.momentum is not None:
            self.momentum.update(self.cfg.momentum)
        if not self._queue_capped and self._pairs_this_step:
            self._cap_queue(self._pairs_this_step)
        self._pairs_this_step = 0

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone``: pretrained weights (the text half and its tuned layers, the BERT parts of the
        fusion layers, an image tower loaded from weights); ``head``: everything new (a random Gswin
        included)."""
        pretrained_image = getattr(getattr(self.image_encoder, "weights", None), "kind", "random") != "random"
        backbone: set[int] = {id(p) for p in self.text_encoder.parameters()}
        if self.text_top is not None:
            backbone |= {id(p) for p in self.text_top.parameters()}
        if pretrained_image:
            backbone |= {id(p) for p in self.image_encoder.parameters()}
        for layer in self.fusion:
            backbone |= {id(p) for n, p in layer.named_parameters() if n.startswith(FusionLayer.BERT_PARTS)}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for p in self.parameters():
            if p.requires_grad:
                groups["backbone" if id(p) in backbone else "head"].append(p)
        return groups

    # --- reporting --------------------------------------------------------------------------------------
    def _towers(self) -> list[nn.Module]:
        """The modules retrieval runs: the towers (with the Gswin on the map and the tuned text
        layers) and the projections."""
        mods = (self.image_encoder, self.gswin, self.text_encoder, self.text_top)
        return [m for m in (*mods, self.image_proj, self.global_head, self.text_proj) if m is not None]

    def parameter_counts(self) -> dict[str, int]:
        """Table VIII's counts: ``inference`` (the towers and projections that retrieval runs),
        ``training`` (every parameter, the multimodal encoder and heads included) and ``momentum``
        (the EMA copies, buffers used in training only)."""
        inference = sum(p.numel() for m in self._towers() for p in m.parameters())
        momentum = sum(b.numel() for b in self.momentum.buffers()) if self.momentum is not None else 0
        return {
            "inference": inference,
            "training": sum(p.numel() for p in self.parameters()),
            "momentum": momentum,
        }

    def trainable_summary(self) -> dict[str, int]:
        """Parameter counts by part (logged by the trainer at start-up)."""

        def count(mods: Any) -> int:
            return sum(p.numel() for m in mods if m is not None for p in m.parameters() if p.requires_grad)

        return {
            "image_encoder": count([self.image_encoder]),
            "gswin_on_map": count([self.gswin]),
            "text_encoder": count([self.text_encoder, self.text_top]),
            "projections": count([self.image_proj, self.global_head, self.text_proj]),
            "multimodal": count([self.fusion, self.image_fusion, self.image_fusion_in]),
            "heads": count([self.itm_head, self.mlm_head]),
            **self.parameter_counts(),
        }

    @torch.no_grad()
    def itm_rescore(
        self, scores: Tensor, image_feats: Features, text_feats: Features, k: int = 16, batch_size: int = 256
    ) -> tuple[Tensor, Tensor]:
        """Optional ALBEF-style re-scoring of each query's top-``k`` ITC candidates by ITM (off by default).

        Slower than dual-stream retrieval: 2·k·(N + M) passes of the multimodal encoder for N images
        and M captions. Candidates outside the top k keep their ITC order below all re-scored ones.

        Args:
            scores: (N, M) ITC similarities (images × captions).
            image_feats: :meth:`image_features` of the N images.
            text_feats: :meth:`text_features` of the M captions.
            k: candidates re-scored per query.
            batch_size: pairs per multimodal pass.

        Returns:
            ``(i2t, t2i)`` (N, M) score matrices: the top k of each row (i2t) or column (t2i) hold the
            ITM match probability in [0, 1], the others ITC − 10³.

        Raises:
            ConfigError: the method was built without ITM (``itm_weight: 0``).
        """
        if self.itm_head is None:
            raise ConfigError(
                "itm_rescore needs the ITM head; this model was trained with model.itm_weight=0"
            )
        was = self.training
        self.eval()
        dev = self.text_proj.weight.device

        def rescore(s: Tensor, query_is_image: bool) -> Tensor:
            kk = min(k, s.shape[1])
            top = s.topk(kk, dim=1).indices  # (Q, k)
            q = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(top).reshape(-1)
            c = top.reshape(-1)
            ii, tt = (q, c) if query_is_image else (c, q)
            probs = []
            for a in range(0, ii.numel(), batch_size):
                # each image / caption of the chunk encoded once, then paired by index
                i, i_of = ii[a : a + batch_size].cpu().unique(return_inverse=True)
                t, t_of = tt[a : a + batch_size].cpu().unique(return_inverse=True)
                _, img_tok = self.image_states({n: v[i].to(dev) for n, v in image_feats.items()})
                _, txt_tok, txt_mask = self.text_states({n: v[t].to(dev) for n, v in text_feats.items()})
                pair = self.fused_pair(img_tok, txt_tok, txt_mask, i_of.to(dev), t_of.to(dev))
                probs.append(self.itm_head(pair).softmax(-1)[:, 1].to(s.device, s.dtype))
            out = s - 1e3
            if probs:
                out[q, c] = torch.cat(probs)
            return out

        try:
            return rescore(scores, True), rescore(scores.T, False).T
        finally:
            self.train(was)

    @torch.no_grad()
    def attention_maps(self, images: Tensor) -> Tensor | None:
        """Fig. 7: attention of the last Gswin block over (B, 3, H, W) images as (B, h', w') maps in
        [0, 1], from the Gswin tower or the Gswin on the map; ``None`` for other towers."""
        if self.gswin is not None:
            return self.gswin.attention_maps(self.image_features(images)["map"])
        if hasattr(self.image_encoder, "attention_maps"):
            return self.image_encoder.attention_maps(images)
        return None

    def report_figures(
        self, corpus: Any, folder: str | Path, features: Any = None, **kwargs: Any
    ) -> list[Path]:
        """Fig. 7 (attention of the last Gswin block over the images) for ``rsitr evaluate --report``;
        see :func:`rsitr.models.methods._cmpagl_figures.write_attention_figure` (it reads the images
        itself, so ``features`` is not needed)."""
        from rsitr.models.methods._cmpagl_figures import write_attention_figure

        return write_attention_figure(self, corpus, Path(folder), **kwargs)


def _gswin_on_map(cfg: CMPAGLConfig, image_encoder: ImageEncoder) -> GswinOnMap:
    """The trainable Gswin on the tower's map ``map_index`` (its side at the tower's input size).

    Raises:
        ConfigError: the tower has no such map, or an unknown ``gswin_kwargs`` option.
    """
    info = getattr(image_encoder, "feature_info", None) or []
    if not 0 <= cfg.map_index < len(info):
        maps = ", ".join(f"{i}: {m['num_chs']} ch at stride {m['reduction']}" for i, m in enumerate(info))
        raise ConfigError(
            f"model.map_index: {cfg.map_index} is not within 0..{len(info) - 1} for {image_encoder.name} "
            f"(its maps: {maps or 'none'})"
        )
    known = [n for n in inspect.signature(GswinOnMap).parameters if n not in ("in_chs", "map_size")]
    unknown = sorted(set(cfg.gswin_kwargs) - set(known))
    if unknown:
        raise ConfigError(f"model.gswin_kwargs: unknown option {unknown[0]!r}; known: {', '.join(known)}")
    tap = info[cfg.map_index]
    side = math.ceil(image_encoder.image_size / tap["reduction"])
    return GswinOnMap(tap["num_chs"], side, **cfg.gswin_kwargs)
