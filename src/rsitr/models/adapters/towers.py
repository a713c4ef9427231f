"""Adapter insertion into frozen towers, split at the first adapter into a cacheable prefix.

A tower wraps a frozen encoder, inserts a :class:`GatedInsertion` into the last ``k`` blocks,
and splits the forward pass in two:

* ``prefix(inputs)``: everything the adapters cannot change, up to and including the frozen
  module whose output the first adapter modifies (frozen, computed once, cacheable on disk);
* ``suffix(feats)``: the first adapter, the rest of its block, the later adapted blocks and the
  pooling, in the encoder's own output space.

``suffix(prefix(x))`` equals the encoder's ``pooled`` output while the adapters are fresh.
Supported: open_clip ViT and text towers (adapter on each block's MLP output), BERT-like
transformers models such as MiniLM-L6 (on each layer's FFN output projection) and
EfficientNet-Lite0 (on each inverted-residual block's projection, over its spatial tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rsitr.errors import ConfigError
from rsitr.models.adapters.bottleneck import AdapterContext, BottleneckAdapter, GatedInsertion
from rsitr.models.encoders.base import Encoder, masked_mean
from rsitr.models.encoders.hf_text import additive_mask

Features = dict[str, Tensor]
#: ``make_adapter(layer, dim, from_end)``: the adapter for 1-based block ``layer`` of width
#: ``dim``; ``from_end`` is 0 for the last block (pairs the two towers' shared layers).
AdapterFactory = Callable[[int, int, int], BottleneckAdapter]


class AdaptedTower(nn.Module):
    """Base class: owns the context and the insertions; subclasses define prefix/suffix.

    Args:
        encoder: the frozen encoder (kept frozen).
        layers: adapt the last ``layers`` blocks (``None``: all).
        make_adapter: see :data:`AdapterFactory`.
        gate_init: initial value of each insertion's gate g.
        placement: ``mlp_out_gated`` or ``parallel_mlp`` (transformer towers only).
        site: ``blocks`` (the last ``layers`` blocks) or, where the tower has one (``sites``),
            ``head``: one adapter on the output of the tower's last frozen layer.
    """

    modality = ""

    def __init__(
        self,
        encoder: Encoder,
        layers: int | None,
        make_adapter: AdapterFactory,
        gate_init: float = 0.6,
        placement: str = "mlp_out_gated",
        site: str = "blocks",
    ) -> None:
        super().__init__()
        if site not in self.sites:
            allowed = ", ".join(self.sites)
            raise ConfigError(
                f"model.{self.modality}_site: {site!r} is not one of {allowed} for {encoder.name}"
            )
        self.site = site
        self.encoder = encoder
        self.ctx = AdapterContext()
        blocks = self.blocks()
        n = len(blocks)
        k = n if layers is None else layers
        if not 1 <= k <= n:
            raise ConfigError(
                f"model.{self.modality}_layers: {layers} is not within 1..{n} for {encoder.name}"
            )
        if placement not in ("mlp_out_gated", "parallel_mlp"):
            raise ConfigError(f"model.placement: {placement!r} is not one of mlp_out_gated, parallel_mlp")
        self.first = n - k
        self.insertions = nn.ModuleList()
        for i in range(self.first, n):
            parent, attr, dim = self.insertion_point(blocks[i])
            if placement == "parallel_mlp" and not self.supports_parallel:
                raise ConfigError(f"model.placement=parallel_mlp is not supported for {encoder.name}")
            ins = GatedInsertion(
                getattr(parent, attr), make_adapter(i + 1, dim, n - 1 - i), self.ctx, gate_init, placement,
                layout=self.layout,
            )  # fmt: skip
            setattr(parent, attr, ins)
            self.insertions.append(ins)

    supports_parallel = False
    layout = "nlc"
    sites: tuple[str, ...] = ("blocks",)

    def blocks(self) -> list[nn.Module]:
        """The encoder's blocks in order."""
        raise NotImplementedError

    def insertion_point(self, block: nn.Module) -> tuple[nn.Module, str, int]:
        """``(parent, attribute, width)`` of the frozen module the adapter wraps in ``block``."""
        raise NotImplementedError

    def _adapt_first(self, feats: Features) -> Tensor:
        ins = self.insertions[0]
        y = feats["y"]
        return y + ins.delta(feats["x"] if ins.placement == "parallel_mlp" else y)

    def forward(self, *inputs: Tensor) -> Tensor:
        """``suffix(prefix(inputs))``."""
        return self.suffix(self.prefix(*inputs))

    def prefix(self, *inputs: Tensor) -> Features:
        raise NotImplementedError

    def suffix(self, feats: Features) -> Tensor:
        """The adapted part: cached prefix features → the encoder's pooled output space."""
        try:
            return self._suffix(feats)
        finally:
            self.ctx.mask = None  # a later direct call of the encoder must not see a stale mask

    def frozen_suffix(self, feats: Features) -> Tensor:
        """:meth:`suffix` with every adapter bypassed: the frozen encoder's pooled output."""
        self.ctx.off = True
        try:
            return self.suffix(feats)
        finally:
            self.ctx.off = False

    def _suffix(self, feats: Features) -> Tensor:
        raise NotImplementedError


def _trim(feats: Features, mask: Tensor) -> tuple[Features, Tensor]:
    """Drop trailing positions that are padding in every row (exact for padding-masked towers)."""
    n = int(mask.sum(1).max())
    if n == mask.shape[1]:
        return feats, mask
    return {
        k: v[:, :n] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v for k, v in feats.items()
    }, mask[:, :n]


class ClipVisualTower(AdaptedTower):
    """open_clip ViT visual tower; adapters on the MLP output of each residual block."""

    modality = "image"
    supports_parallel = True

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.visual.transformer.resblocks)

    def insertion_point(self, block: nn.Module) -> tuple[nn.Module, str, int]:
        return block, "mlp", self.encoder.visual.transformer.width

    def prefix(self, images: Tensor) -> Features:
        v = self.encoder.visual
        x = v._embeds(images)
        blocks = self.blocks()
        for blk in blocks[: self.first]:
            x = blk(x)
        blk = blocks[self.first]
        resid = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x)))
        h = blk.ln_2(resid)
        return {"resid": resid, "x": h, "y": blk.mlp.inner(h)}

    def _suffix(self, feats: Features) -> Tensor:
        v = self.encoder.visual
        self.ctx.mask = None
        blocks = self.blocks()
        x = feats["resid"] + blocks[self.first].ls_2(self._adapt_first(feats))
        for blk in blocks[self.first + 1 :]:
            x = blk(x)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled


class ClipTextTower(AdaptedTower):
    """open_clip text transformer (causal, EOT pooling); adapters on each block's MLP output."""

    modality = "text"
    supports_parallel = True

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.transformer.resblocks)

    def insertion_point(self, block: nn.Module) -> tuple[nn.Module, str, int]:
        return block, "mlp", self.encoder.transformer.width

    def _attn_mask(self, n: int) -> Tensor | None:
        m = self.encoder.attn_mask
        return None if m is None else m[:n, :n]

    def prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        e = self.encoder
        n = input_ids.shape[1]
        cast = e.transformer.get_cast_dtype()
        x = e.token_embedding(input_ids).to(cast) + e.positional_embedding[:n].to(cast)
        blocks = self.blocks()
        for blk in blocks[: self.first]:
            x = blk(x, attn_mask=self._attn_mask(n))
        blk = blocks[self.first]
        resid = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x), attn_mask=self._attn_mask(n)))
        h = blk.ln_2(resid)
        if e.pool_type == "argmax":
            eot = input_ids.argmax(dim=-1)
        else:
            eot = (input_ids == e.eos_id).int().argmax(dim=-1)
        return {"resid": resid, "x": h, "y": blk.mlp.inner(h), "mask": attention_mask.bool(), "eot": eot}

    def _suffix(self, feats: Features) -> Tensor:
        e = self.encoder
        feats, mask = _trim(feats, feats["mask"])  # causal: positions after EOT never matter
        self.ctx.mask = mask
        blocks = self.blocks()
        n = mask.shape[1]
        x = feats["resid"] + blocks[self.first].ls_2(self._adapt_first(feats))
        for blk in blocks[self.first + 1 :]:
            x = blk(x, attn_mask=self._attn_mask(n))
        x = e.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), feats["eot"]]
        proj = e.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


class BertTower(AdaptedTower):
    """A BERT-like transformers encoder (MiniLM-L6, BERT); adapters on each layer's FFN output
    projection (``output.dense``), before its residual and LayerNorm."""

    modality = "text"

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.layers)

    def insertion_point(self, block: nn.Module) -> tuple[nn.Module, str, int]:
        return block.output, "dense", self.encoder.model.config.hidden_size

    def prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        model = self.encoder.model
        h = model.embeddings(input_ids=input_ids)
        ext = additive_mask(attention_mask, h.dtype)
        layers = self.blocks()
        for layer in layers[: self.first]:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        layer = layers[self.first]
        attn = layer.attention(h, ext)[0]
        inter = layer.intermediate(attn)
        return {"resid": attn, "y": layer.output.dense.inner(inter), "mask": attention_mask.bool()}

    def _suffix(self, feats: Features) -> Tensor:
        feats, mask = _trim(feats, feats["mask"])
        self.ctx.mask = mask
        layers = self.blocks()
        out = layers[self.first].output
        h = out.LayerNorm(out.dropout(self._adapt_first(feats)) + feats["resid"])
        ext = additive_mask(mask, h.dtype)
        for layer in layers[self.first + 1 :]:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return h[:, 0] if self.encoder.pool == "cls" else masked_mean(h, mask)


class EfficientNetTower(AdaptedTower):
    """EfficientNet-Lite (0/1/2); adapters on the projection (``bn3``) output of the last inverted-
    residual blocks, over their HW spatial tokens (the last stage is 7×7 at 224 px).

    ``site="head"`` puts one adapter on the head's output instead (``bn2``: the 1×1 head
    convolution's 1280-channel map after BN and ReLU6, 7×7 tokens), after the last frozen layer.
    Nothing frozen then runs in the suffix, and the pooled output is
    ``mean(y) + σ(g)·W_up mean(z)`` (:meth:`GatedInsertion.delta` with ``pool``), so a training step
    costs the adapter's down-projection and attention only, not the head convolution forwards and
    backwards that the ``blocks`` site needs; the cached prefix is the head map (4× the last
    block's)."""

    modality = "image"
    layout = "nchw"
    sites = ("blocks", "head")

    def blocks(self) -> list[nn.Module]:
        if self.site == "head":
            return [self.encoder.model]  # one "block": its head (conv_head + bn2)
        return self._ir_blocks()

    def _ir_blocks(self) -> list[nn.Module]:
        return [b for stage in self.encoder.model.blocks for b in stage][1:]  # the stem DS conv has no bn3

    def insertion_point(self, block: nn.Module) -> tuple[nn.Module, str, int]:
        if self.site == "head":
            return block, "bn2", block.bn2.num_features
        return block, "bn3", block.bn3.num_features

    def _stage_of(self) -> list[int]:
        return [s for s, stage in enumerate(self.encoder.model.blocks) for _ in stage][1:]

    def _autocast(self, device: torch.device) -> torch.autocast:
        """bfloat16 autocast when the encoder's ``precision`` is ``bf16`` (the prefix and the
        adapted suffix, adapters included; outputs are float32 again)."""
        bf16 = getattr(self.encoder, "precision", "fp32") == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def prefix(self, images: Tensor) -> Features:
        with self._autocast(images.device):
            out = self._head_prefix(images) if self.site == "head" else self._prefix(images)
        return {k: v.float() for k, v in out.items()}

    def _stem(self, images: Tensor) -> Tensor:
        m, fold = self.encoder.model, self.encoder.folded  # frozen parts: BatchNorm folded
        return fold(m.conv_stem, m.bn1, m.blocks[0])(images.contiguous(memory_format=torch.channels_last))

    def _head_prefix(self, images: Tensor) -> Features:
        """The whole frozen tower: the head map ``y`` and the stage averages from stride 4 on."""
        m, fold = self.encoder.model, self.encoder.folded
        x, pooled = self._stem(images), []
        for stage in fold(m.blocks)[1:]:
            x = stage(x)
            pooled.append(x.mean((2, 3)))
        return {"y": fold(m.conv_head, m.bn2.inner)(x), "pooled_prefix": torch.cat(pooled, 1)}

    def _prefix(self, images: Tensor) -> Features:
        x = self._stem(images)
        stage_of, blocks = self._stage_of(), self._ir_blocks()
        pooled = []
        for i in range(self.first):
            x = blocks[i](x)
            if stage_of[i + 1] != stage_of[i] and stage_of[i] >= 1:  # a stage ends
                pooled.append(x.mean((2, 3)))
        self.ctx.capture = True
        try:
            blocks[self.first](x)
        finally:
            self.ctx.capture = False
        _, y = self.ctx.captured  # type: ignore[misc]
        self.ctx.captured = None
        out = {"y": y}
        if blocks[self.first].has_skip:
            out["resid"] = x
        if pooled:
            out["pooled_prefix"] = torch.cat(pooled, 1)
        return out

    def _suffix(self, feats: Features) -> Tensor:
        with self._autocast(feats["y"].device):
            if self.site == "head":
                y = feats["y"]
                head = y.mean((2, 3)) + self.insertions[0].delta(y, pool=True)
                pooled = [feats["pooled_prefix"]]
            else:
                pooled, head = self._adapted(feats)
            if self.encoder.pool == "multi":
                return torch.cat(pooled + [head], 1).float()
            return head.float()

    def _adapted(self, feats: Features) -> tuple[list[Tensor], Tensor]:
        """The adapted blocks and the frozen head: (the stage averages, the pooled head)."""
        m = self.encoder.model
        self.ctx.mask = None
        stage_of, blocks = self._stage_of(), self._ir_blocks()
        cl = torch.channels_last  # the encoder's layout (cached maps come back contiguous)
        feats = {k: v.contiguous(memory_format=cl) if v.dim() == 4 else v for k, v in feats.items()}
        x = self._adapt_first(feats)
        if "resid" in feats:
            x = x + feats["resid"]
        pooled = [feats["pooled_prefix"]] if "pooled_prefix" in feats else []
        for i in range(self.first, len(blocks)):
            if i > self.first:
                x = blocks[i](x)
            if i + 1 == len(blocks) or stage_of[i + 1] != stage_of[i]:
                pooled.append(x.mean((2, 3)))
        return pooled, m.bn2(m.conv_head(x)).mean((2, 3))


def adapted_tower(
    encoder: Encoder, layers: int | None, make_adapter: AdapterFactory, **kw: object
) -> AdaptedTower:
    """The tower class for ``encoder`` (by its type), with adapters inserted.

    Raises:
        ConfigError: an encoder with no adapter insertion defined.
    """
    from rsitr.models.encoders.clip import ClipImageEncoder, ClipTextEncoder
    from rsitr.models.encoders.efficientnet import EfficientNetLiteEncoder
    from rsitr.models.encoders.hf_text import HFTextEncoder

    table: list[tuple[type, type[AdaptedTower]]] = [
        (ClipImageEncoder, ClipVisualTower),
        (ClipTextEncoder, ClipTextTower),
        (HFTextEncoder, BertTower),
        (EfficientNetLiteEncoder, EfficientNetTower),
    ]
    for enc_cls, tower_cls in table:
        if isinstance(encoder, enc_cls):
            return tower_cls(encoder, layers, make_adapter, **kw)  # type: ignore[arg-type]
    raise ConfigError(
        f"adapters: no insertion defined for encoder {encoder.name!r}; "
        "supported: clip:<ViT>, minilm-l6, hf:<BERT-like>, efficientnet-lite0/1/2"
    )
