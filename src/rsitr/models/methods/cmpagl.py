"""``cmpagl``: Cross-Modal Pre-Aligned method with Global and Local information (Sun et al., TGRS 2024;
``../shared/papers/004_bab8e7ccfbbc55f6.txt``).

Three parts (§III-A, Fig. 1):

* the image encoder, Gswin (§III-B, :mod:`rsitr.models.encoders.gswin`), or any registered tower for
  the baseline rows; F_i is its pooled feature (Eq. 3) and F_i^token its final tokens;
* the text encoder, the first N₀/2 layers of a BERT-like model (§III-C, Eq. 7–9; G_i is the 0-th
  token), e.g. ``minilm-l6`` (3 + 3) or ``hf:bert-base-uncased`` (6 + 6);
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

``pre_aligned: false`` (Std-MI) is rsitr's reading of the paper's one-sentence description: the
same number of multimodal layers split into a text-query branch (the BERT half, cross-attending to
the image) and an image-query branch (new layers, cross-attending to the text), each fed the
*unimodal* tokens; ITM uses both branches' first tokens, MLM the text branch. The pre-alignment
terms (ITC, O-Tri) still train the retrieval embeddings, which are needed for dual-stream
retrieval in both architectures.
"""

from __future__ import annotations

import logging
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
from rsitr.models.methods.base import Features, RetrievalMethod, merge_preset
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
#: the parts that have momentum copies (the rest is training-only and has none)
MOMENTUM_PARTS = ("image_encoder", "text_encoder", "image_proj", "text_proj")
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
        freeze_image: freeze the image tower (the paper trains it).
        freeze_text: freeze the text half (the multimodal half is always trained).
        text_layers: layers of the text encoder; the rest form the multimodal encoder
            (``None``: half, N₀/2).
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
    """

    preset: str | None = None
    image_encoder: str = "gswin-tiny"
    text_encoder: str = "minilm-l6"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    text_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze_image: bool = False
    freeze_text: bool = False
    text_layers: int | None = None
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

    @classmethod
    def resolve(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` over its ``preset``'s settings (image encoder options are merged too)."""
        merged = merge_preset(values, PRESETS)
        base = PRESETS.get(values.get("preset") or "", {})
        if "image_encoder_kwargs" in base:
            merged["image_encoder_kwargs"] = {
                **base["image_encoder_kwargs"],
                **(values.get("image_encoder_kwargs") or {}),
            }
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
class Attention(nn.Module):
    """Multi-head (cross-)attention with BERT's q/k/v/output projections and a key padding mask."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim or dim, dim)
        self.value = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None = None) -> Tensor:
        """(B, L, D) queries over (B, S, D_kv) keys/values, ``ctx_mask`` (B, S) True = valid → (B, L, D)."""
        b, n, d = x.shape
        h = self.heads
        q = self.query(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.key(ctx).view(b, ctx.shape[1], h, d // h).transpose(1, 2)
        v = self.value(ctx).view(b, ctx.shape[1], h, d // h).transpose(1, 2)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class FusionLayer(nn.Module):
    """A multimodal layer (§III-D): BERT's post-LN layer with a cross-attention after self-attention.

    x ← LN(x + SelfAttn(x)); x ← LN(x + CrossAttn(x, context)); x ← LN(x + FFN(x)), as ALBEF's
    fusion layers. :meth:`load_bert_layer` copies a BERT layer's self-attention and FFN.

    Args:
        dim: hidden width.
        heads: attention heads.
        ffn_dim: FFN hidden width.
        ctx_dim: width of the context tokens (image tokens, or text tokens for Std-MI's image branch).
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
        ctx_dim: int,
        act: nn.Module,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=attn_dropout)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, heads, kv_dim=ctx_dim, dropout=attn_dropout)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.act = act
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None, ctx: Tensor, ctx_mask: Tensor | None = None) -> Tensor:
        """(B, L, D) tokens with mask (B, L), context (B, S, D_ctx) with mask (B, S) → (B, L, D)."""
        x = self.self_norm(x + self.drop(self.self_attn(x, x, mask)))
        x = self.cross_norm(x + self.drop(self.cross_attn(x, ctx, ctx_mask)))
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
        upper = list(layers[k:])
        text_encoder.model.encoder.layer = nn.ModuleList(layers[:k])  # type: ignore[attr-defined]
        text_encoder.model.config.num_hidden_layers = k  # type: ignore[attr-defined]
        self.num_text_layers, self.num_fusion_layers = k, n - k
        tok = text_encoder.tokenizer  # type: ignore[attr-defined]
        if cfg.mlm_weight > 0 and tok.mask_token_id is None:
            raise ConfigError(f"model.mlm_weight > 0 needs a [MASK] token; {text_encoder.name} has none")
        self.mask_id = tok.mask_token_id
        self.register_buffer("special_ids", torch.tensor(sorted(set(tok.all_special_ids))), persistent=False)
        from transformers.activations import ACT2FN

        h = bert.hidden_size

        def fusion_layer(ctx_dim: int) -> FusionLayer:
            return FusionLayer(
                h, bert.num_attention_heads, bert.intermediate_size, ctx_dim, ACT2FN[bert.hidden_act],
                bert.hidden_dropout_prob, bert.attention_probs_dropout_prob, bert.layer_norm_eps,
            )  # fmt: skip

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
                fl = fusion_layer(image_encoder.token_dim)
                fl.load_bert_layer(layer)
                self.fusion.append(fl)
            self.image_fusion.extend(fusion_layer(h) for _ in range(n_image))
            if n_image:
                self.image_fusion_in = nn.Sequential(nn.Linear(image_encoder.token_dim, h), nn.LayerNorm(h))
        self.image_proj = nn.Linear(image_encoder.num_features, cfg.embed_dim)
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

    # --- the four hooks (inference: the two towers and their projections only) --------------------------
    def image_features(self, images: Tensor) -> Features:
        """``pooled`` F_i (Eq. 3) and ``tokens`` F_i^token (B, N, C)."""
        out = self.image_encoder(images)
        return {"pooled": out.pooled, "tokens": out.tokens}

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """``pooled`` G_i (Eq. 9), ``tokens`` G_i^token (Eq. 8), and the ids/mask MLM re-masks."""
        out = self.text_encoder(input_ids, attention_mask)
        pooled = out.tokens[:, 0] if self.cfg.text_pool == "cls" else masked_mean(out.tokens, out.mask)
        return {
            "pooled": pooled,
            "tokens": out.tokens,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }

    def embed_image(self, feats: Features) -> Tensor:
        return self.image_proj(feats["pooled"].float())

    def embed_text(self, feats: Features) -> Tensor:
        return self.text_proj(feats["pooled"].float())

    def cache_identity(self) -> dict[str, Any]:
        """The text features are the first ``text_layers`` layers, pooled by ``text_pool``."""
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
        img = F.normalize(self.embed_image(img_feats), dim=-1)
        txt = F.normalize(self.embed_text(txt_feats), dim=-1)
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
            terms["itm"] = self.itm_loss(img, txt, ids, img_feats, txt_feats, scale.detach(), tids)
        if cfg.mlm_weight > 0:
            terms["mlm"] = self.mlm_loss(img_feats, txt_feats)
        out = {f"{k}_loss": getattr(cfg, f"{k}_weight") * v for k, v in terms.items()}
        out.update({k: v.detach() for k, v in terms.items()})
        out["logit_scale"] = scale.detach()
        return out

    @torch.no_grad()
    def momentum_embeddings(
        self, batch: dict[str, Any], img_feats: Features, txt_feats: Features
    ) -> tuple[Tensor, Tensor]:
        """Normalised momentum embeddings of the batch (no gradient); frozen towers are shared."""
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

    def fuse(self, img_tok: Tensor, txt_tok: Tensor, txt_mask: Tensor) -> Tensor:
        """The multimodal encoder's text-query stream: (B, L, H) text states conditioned on the image."""
        x = txt_tok
        for layer in self.fusion:
            x = layer(x, txt_mask, img_tok)
        return x

    def fused_pair(self, img_tok: Tensor, txt_tok: Tensor, txt_mask: Tensor) -> Tensor:
        """The ITM feature of each pair: the fused [CLS] (PA-MI), or [CLS] ⊕ the image-query branch's
        first token (Std-MI)."""
        cls = self.fuse(img_tok, txt_tok, txt_mask)[:, 0]
        if self.image_fusion_in is None:
            return cls
        y = self.image_fusion_in(img_tok)
        for layer in self.image_fusion:
            y = layer(y, None, txt_tok, txt_mask)
        return torch.cat([cls, y[:, 0]], dim=-1)

    def itm_loss(
        self, img: Tensor, txt: Tensor, ids: Tensor, img_feats: Features, txt_feats: Features, scale: Tensor,
        text_ids: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """L_ITM (Eq. 21): the B matching pairs, plus for every caption a hard negative image and for
        every image a hard negative caption (:func:`hard_negatives`); the multimodal encoder scores
        all of them in one pass."""
        b = ids.numel()
        neg_img, neg_txt, has_img, has_txt = hard_negatives(
            (img @ txt.T).detach().float() * scale, ids, text_ids=text_ids
        )
        ar = torch.arange(b, device=ids.device)
        img_idx = torch.cat([ar, neg_img[has_img], ar[has_txt]])
        txt_idx = torch.cat([ar, ar[has_img], neg_txt[has_txt]])
        labels = (torch.arange(img_idx.numel(), device=ids.device) < b).long()  # 1: match, 0: negative
        txt_mask = txt_feats["attention_mask"].bool()
        assert self.itm_head is not None
        logits = self.itm_head(
            self.fused_pair(
                img_feats["tokens"][img_idx].float(), txt_feats["tokens"][txt_idx].float(), txt_mask[txt_idx]
            )
        )
        return F.cross_entropy(logits, labels)

    def mlm_loss(self, img_feats: Features, txt_feats: Features) -> Tensor:
        """L_MLM (Eq. 20): −(1/B) Σᵢ Σ_t [m_t = 1] log P(w_t | masked caption, image), predicted from
        the multimodal encoder's text states."""
        assert self.mlm_head is not None
        ids, att = txt_feats["input_ids"], txt_feats["attention_mask"]
        vocab = self.mlm_head.bias.numel()
        masked, labels = mask_tokens(
            ids, att, self.mask_id, vocab, self.special_ids, self.cfg.mlm_probability
        )
        sel = labels != IGNORE
        if not sel.any():  # nothing masked in this batch (tiny batches of short captions)
            return self.mlm_head.bias.sum() * 0.0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_encoder.frozen):
            tokens = self.text_features(masked, att)["tokens"]
        x = self.fuse(img_feats["tokens"].float(), tokens.float(), att.bool())
        logits = self.mlm_head(x[sel])  # only the masked positions: (n_masked, vocab)
        return F.cross_entropy(logits, labels[sel], reduction="sum") / ids.shape[0]

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
        """``backbone``: pretrained weights (the text half, the BERT parts of the fusion layers, an image
        tower loaded from weights); ``head``: everything new (a random Gswin included)."""
        pretrained_image = getattr(getattr(self.image_encoder, "weights", None), "kind", "random") != "random"
        backbone: set[int] = {id(p) for p in self.text_encoder.parameters()}
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
    def parameter_counts(self) -> dict[str, int]:
        """Table VIII's counts: ``inference`` (the towers and projections that retrieval runs),
        ``training`` (every parameter, the multimodal encoder and heads included) and ``momentum``
        (the EMA copies, buffers used in training only)."""
        inference = sum(
            p.numel() for m in (self.image_encoder, self.text_encoder, self.image_proj, self.text_proj)
            for p in m.parameters()
        )  # fmt: skip
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
            "text_encoder": count([self.text_encoder]),
            "projections": count([self.image_proj, self.text_proj]),
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
            image_feats: :meth:`image_features` of the N images (``tokens`` is used).
            text_feats: :meth:`text_features` of the M captions (``tokens``, ``attention_mask``).
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
        img_tok = image_feats["tokens"]
        txt_tok, txt_mask = text_feats["tokens"], text_feats["attention_mask"].bool()

        def rescore(s: Tensor, query_is_image: bool) -> Tensor:
            kk = min(k, s.shape[1])
            top = s.topk(kk, dim=1).indices  # (Q, k)
            q = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(top).reshape(-1)
            c = top.reshape(-1)
            ii, tt = (q, c) if query_is_image else (c, q)
            probs = []
            for a in range(0, ii.numel(), batch_size):
                i, t = ii[a : a + batch_size].cpu(), tt[a : a + batch_size].cpu()
                pair = self.fused_pair(
                    img_tok[i].to(dev).float(), txt_tok[t].to(dev).float(), txt_mask[t].to(dev)
                )
                probs.append(self.itm_head(pair).softmax(-1)[:, 1].to(s.device, s.dtype))
            out = s - 1e3
            if probs:
                out[q, c] = torch.cat(probs)
            return out

        try:
            return rescore(scores, True), rescore(scores.T, False).T
        finally:
            self.train(was)

    def report_figures(
        self, corpus: Any, folder: str | Path, features: Any = None, **kwargs: Any
    ) -> list[Path]:
        """Fig. 7 (attention of the last Gswin block over the images) for ``rsitr evaluate --report``;
        see :func:`rsitr.models.methods._cmpagl_figures.write_attention_figure` (it reads the images
        itself, so ``features`` is not needed)."""
        from rsitr.models.methods._cmpagl_figures import write_attention_figure

        return write_attention_figure(self, corpus, Path(folder), **kwargs)
