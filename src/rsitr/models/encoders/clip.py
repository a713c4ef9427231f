"""``clip:<arch>[@<tag or checkpoint>]``: the image and text towers of an open_clip model.

``arch`` is an open_clip architecture name (``ViT-B-32`` or ``ViT-B/32``, ``RN50``: open_clip.list_models())
or the path of an open_clip model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``), e.g.
``clip:/cfg/tiny.json@/ckpt/tiny.pt``. ``weights`` is an open_clip pretrained tag (``openai``,
``laion2b_s34b_b79k``; fetched or taken from the cache) or a checkpoint path. A GeoRSCLIP or
RemoteCLIP checkpoint is a plain state dict (open_clip's loader unwraps a ``"state_dict"`` key and a
``module.`` prefix). Without ``@weights`` the model is randomly initialised, with a warning.

Image tower: ``pooled`` is the projected image embedding (``encode_image``); ViT towers tap 4 evenly
spaced blocks as maps at stride = patch size and return the final patch tokens (after ``ln_post``);
ModifiedResNet towers tap their 4 stages (strides 4–32) and return the last stage as tokens.
Text tower: ``pooled`` is the projected EOT embedding (``encode_text``), ``tokens`` the per-token
features after ``ln_final``, ``mask`` True up to and including the EOT token; context length 77.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import Tensor, nn

from rsitr.errors import ConfigError, DataError, MissingDependencyError
from rsitr.hashing import file_sha256_memo
from rsitr.models.encoders._factory import EncoderSpec, register_image_encoder, register_text_encoder
from rsitr.models.encoders._weights import WeightsSource, is_path, log_random_init, resolve_file
from rsitr.models.encoders.base import ImageEncoder, ImageOutput, TextEncoder, TextOutput
from rsitr.models.encoders.timm_backbones import even_taps

__all__ = ["ClipImageEncoder", "ClipTextEncoder", "build_clip"]

_logger = logging.getLogger(__name__)


def build_clip(spec: EncoderSpec, pretrained: bool = True) -> tuple[nn.Module, WeightsSource, Any]:
    """Build the whole open_clip model of a ``clip:`` spec, with its weights and tokenizer.

    Args:
        spec: a parsed ``clip:<arch>[@weights]`` spec.
        pretrained: load the weights (False: random init, ``@weights`` ignored).

    Returns:
        ``(model, weights source, tokenizer)``.

    Raises:
        ConfigError: unknown architecture or tag.
        MissingDependencyError: missing checkpoint file, or a tag whose weights are not available offline.
        DataError: the checkpoint does not fit the architecture.
    """
    assert spec.arch is not None
    arch, weights = spec.arch, spec.weights if pretrained else None
    path = resolve_file(weights, spec.spec) if weights and is_path(weights) else None
    if arch.endswith(".json"):
        if weights and path is None:
            raise ConfigError(
                f"{spec.spec}: a config-file architecture takes a checkpoint path, not tag {weights!r}"
            )
        model, tokenizer = _from_json(resolve_file(arch, spec.spec), path)
    else:
        arch = arch.replace("/", "-")  # open_clip's own spelling: "ViT-B/32" is "ViT-B-32"
        if arch not in open_clip.list_models():
            raise ConfigError(
                f"{spec.spec}: unknown open_clip architecture {arch!r}; see open_clip.list_models()"
            )
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if weights and path is None and weights not in tags:
            raise ConfigError(
                f"{spec.spec}: unknown pretrained tag {weights!r} for {arch}; known: {', '.join(tags)}"
            )
        try:
            model = open_clip.create_model(arch, pretrained=str(path) if path else weights)
        except Exception as e:  # loading errors: unpickling, key/shape mismatch, download
            if path is not None:
                raise DataError(f"cannot load into {arch}: {_summary(e)}", path=path) from None
            raise MissingDependencyError(
                f"{spec.spec}: open_clip weights {arch}@{weights} are not available offline; "
                "download them or pass a local checkpoint path"
            ) from None
        tokenizer = open_clip.get_tokenizer(arch)
    if path is not None:
        source = WeightsSource("file", str(path), file_sha256_memo(path))
    elif weights:
        source = WeightsSource("tag", f"{arch}@{weights}")
    elif pretrained:
        raise ConfigError(
            f"{spec.spec}: names no weights; add @<open_clip tag> (e.g. @openai) or @/path/to/checkpoint, "
            "or write pretrained: false for random weights"
        )
    else:
        source = WeightsSource("random")
        log_random_init(_logger, spec.spec)
    return model, source, tokenizer


def _from_json(cfg_path: Path, path: Path | None) -> tuple[nn.Module, Any]:
    # Built directly rather than through open_clip.add_model_config, which would change
    # open_clip's global registry (and could shadow a built-in name).
    cfg = json.loads(cfg_path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise DataError(
            "not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)", path=cfg_path
        )
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    if path is not None:
        try:
            open_clip.load_checkpoint(model, str(path))
        except Exception as e:  # unpickling, key or shape mismatch
            raise DataError(f"cannot load into {cfg_path.name}: {_summary(e)}", path=path) from None
    context_length = cfg["text_cfg"].get("context_length", 77)
    return model, open_clip.SimpleTokenizer(context_length=context_length)


def _summary(e: Exception) -> str:
    """One informative line of a loading error (``load_state_dict`` puts the details on later lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    keyed = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (keyed or lines)[0][:300]


def _identity_arch(arch: str) -> str:
    # A config file is identified by its content, not its location; names by open_clip's spelling.
    if arch.endswith(".json"):
        return f"{Path(arch).name}#sha256={file_sha256_memo(Path(arch).expanduser())[:16]}"
    return arch.replace("/", "-")


class ClipImageEncoder(ImageEncoder):
    """The visual tower of an open_clip model (ViT or ModifiedResNet).

    Args:
        name: ``clip:<arch>``.
        model: the whole open_clip model (only ``model.visual`` is kept).
        weights: where its weights came from.

    Raises:
        ConfigError: an unsupported visual tower (timm-backed, attentional pooling).
    """

    def __init__(self, name: str, model: nn.Module, weights: WeightsSource) -> None:
        super().__init__()
        self.name = name
        self.weights = weights
        visual = model.visual
        self.visual = visual
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", visual.image_size)
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean = tuple(pp.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(pp.get("std") or open_clip.OPENAI_DATASET_STD)
        self.num_features = visual.output_dim
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None or visual.final_ln_after_pool:
                raise ConfigError(
                    f"{name}: ViT towers with attentional pooling or final_ln_after_pool are unsupported"
                )
            self._taps = even_taps(len(visual.transformer.resblocks))
            patch = visual.patch_size[0]
            self.token_dim = visual.transformer.width
            self.feature_info = [{"num_chs": self.token_dim, "reduction": patch} for _ in self._taps]
        elif isinstance(visual, ModifiedResNet):
            self._taps = [1, 2, 3, 4]  # layer1..layer4 (index 0 is the stem)
            stages = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
            chs = [stage[-1].conv3.out_channels for stage in stages]
            self.token_dim = chs[-1]
            self.feature_info = [{"num_chs": c, "reduction": 4 * 2**i} for i, c in enumerate(chs)]
        else:
            raise ConfigError(f"{name}: unsupported CLIP visual tower {type(visual).__name__}")

    def forward(self, images: Tensor) -> ImageOutput:
        """Encode (B, 3, H, W) images normalised with :attr:`mean`/:attr:`std`."""
        taken = sorted(set(self._taps))
        if isinstance(self.visual, VisionTransformer):
            out = self.visual.forward_intermediates(images, indices=taken, output_fmt="NLC")
            inter = out["image_intermediates"]  # each (B, HW, width), class token removed
            patch = self.feature_info[0]["reduction"]
            grid = (images.shape[-2] // patch, images.shape[-1] // patch)
            maps = [inter[taken.index(i)].transpose(1, 2).unflatten(2, grid) for i in self._taps]
            tokens = self.visual.ln_post(inter[-1])  # the last tap is the last block
        else:
            out = self.visual.forward_intermediates(images, indices=taken)
            maps = [out["image_intermediates"][taken.index(i)] for i in self._taps]
            tokens = maps[-1].flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageOutput(pooled=out["image_features"], tokens=tokens, mask=mask, maps=maps)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "weights": self.weights.as_dict()}


class ClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model (``CLIP`` or ``CustomTextCLIP`` with a ``TextTransformer``).

    Args:
        name: ``clip:<arch>``.
        model: the whole open_clip model (only the text modules are kept).
        weights: where its weights came from.
        tokenizer: the open_clip tokenizer of the model.

    Raises:
        ConfigError: an unsupported text tower (Hugging Face text models, class-token pooling).
    """

    def __init__(self, name: str, model: nn.Module, weights: WeightsSource, tokenizer: Any) -> None:
        super().__init__()
        self.name = name
        self.weights = weights
        src = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text
        if not hasattr(src, "token_embedding") or getattr(src, "cls_emb", None) is not None:
            raise ConfigError(
                f"{name}: unsupported CLIP text tower {type(src).__name__}; use an hf: text encoder"
            )
        self.pool_type = getattr(src, "text_pool_type", None) or src.pool_type
        self.eos_id = getattr(src, "text_eos_id", None) or getattr(src, "eos_id", None)
        if self.pool_type not in ("argmax", "eos"):
            raise ConfigError(f"{name}: unsupported text pooling {self.pool_type!r} (need 'argmax' or 'eos')")
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)
        self.tokenizer = tokenizer
        self.max_length = int(self.positional_embedding.shape[0])
        self.token_dim = self.transformer.width
        proj = self.text_projection
        self.num_features = proj.out_features if isinstance(proj, nn.Linear) else int(proj.shape[1])

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """open_clip tokenization padded to the context length; the mask covers SOT…EOT."""
        ids = self.tokenizer(list(texts), context_length=self.max_length)
        # EOT has the largest id of the CLIP vocabulary; other tokenizers name their eos id
        eot = ids.argmax(dim=-1) if self.pool_type == "argmax" else (ids == self.eos_id).int().argmax(dim=-1)
        mask = torch.arange(ids.shape[1]) <= eot[:, None]
        return {"input_ids": ids, "attention_mask": mask.long()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        """Encode (B, L) token ids, L ≤ 77 (the causal mask makes trailing padding irrelevant)."""
        length = input_ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        attn_mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        tokens = self.ln_final(self.transformer(x, attn_mask=attn_mask))  # (B, L, width)
        pooled = text_global_pool(tokens, input_ids, self.pool_type, eos_token_id=self.eos_id)
        proj = self.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return TextOutput(pooled=pooled, tokens=tokens, mask=attention_mask.bool())

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "weights": self.weights.as_dict(), "tokenizer": "open_clip"}


@register_image_encoder("clip:")
def clip_image(spec: EncoderSpec, pretrained: bool = True) -> ClipImageEncoder:
    """``clip:<arch or config.json>[@<tag or checkpoint>]`` image tower."""
    model, source, _ = build_clip(spec, pretrained)
    return ClipImageEncoder(f"clip:{_identity_arch(spec.arch or '')}", model, source)


@register_text_encoder("clip:")
def clip_text(spec: EncoderSpec, pretrained: bool = True) -> ClipTextEncoder:
    """``clip:<arch or config.json>[@<tag or checkpoint>]`` text tower."""
    model, source, tokenizer = build_clip(spec, pretrained)
    return ClipTextEncoder(f"clip:{_identity_arch(spec.arch or '')}", model, source, tokenizer)
