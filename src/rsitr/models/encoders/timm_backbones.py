"""timm ImageNet backbones: ``resnet18``, ``resnet50``, ``resnet101``, ``vit-b-16``, ``swin-t``.

Weights (``name[@weights]``):

* no ``@``: the family's default ImageNet weights through the hub: torchvision's V1 weights for
  the ResNets (``tv_in1k``, what the MSA and AMFMN reference code load), timm's default tag
  otherwise. If they cannot be fetched (offline, not cached), building fails with one line that
  names the weights and how to get them; nothing falls back to random weights.
* ``@/path/w.safetensors`` (or ``.pth``/``.pt``/``.bin``): a local state dict, timm or torchvision
  key names (identical for ResNets), optionally wrapped in ``"state_dict"`` and prefixed ``module.``.
  The classifier may be present; it is dropped.
* ``@tag``: a timm pretrained tag (``resnet50@a1_in1k``); failing to fetch it is an error.
* ``pretrained: false`` (written out in the config): random initialisation, no weights at all.

Maps: four taps at strides 4/8/16/32 (ResNet C2–C5, Swin's 4 stages); the plain ViT has a single
stride (16), so it taps 4 evenly spaced blocks (3, 6, 9, 12 of 12) reshaped to stride-16 maps.
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import Tensor, nn

from rsitr.hashing import file_sha256_memo
from rsitr.models.encoders._factory import EncoderSpec, register_image_encoder
from rsitr.models.encoders._weights import (
    WeightsSource,
    is_path,
    load_into,
    load_state_dict_file,
    log_random_init,
    resolve_file,
    timm_pretrained,
)
from rsitr.models.encoders.base import ImageEncoder, ImageOutput

__all__ = ["TimmImageEncoder", "even_taps"]

_logger = logging.getLogger(__name__)


def even_taps(depth: int, num: int = 4) -> list[int]:
    """``num`` evenly spaced block indices ending at the last block: 12 → [2, 5, 8, 11]."""
    return [max(0, (k + 1) * depth // num - 1) for k in range(num)]


def _stride_taps(feature_info: list[dict[str, Any]]) -> list[int]:
    """Indices of the last feature at each stride 4/8/16/32, or 4 even blocks if all share a stride."""
    strides = [f["reduction"] for f in feature_info]
    if len(set(strides)) == 1:
        return even_taps(len(strides))
    return [max(i for i, s in enumerate(strides) if s == r) for r in (4, 8, 16, 32)]


class TimmImageEncoder(ImageEncoder):
    """A timm backbone as an image tower.

    ``pooled`` is timm's pre-logits feature (average pool for ResNet and Swin, CLS for ViT),
    ``tokens`` the final feature map or patch tokens (after the final norm), flattened to (B, L, C).

    Args:
        name: the registry name.
        model: a timm model created with ``num_classes=0``.
        weights: where its weights came from.
    """

    def __init__(self, name: str, model: nn.Module, weights: WeightsSource) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.weights = weights
        info = model.feature_info
        self._taps = _stride_taps(info)
        self.feature_info = [
            {"num_chs": info[i]["num_chs"], "reduction": info[i]["reduction"]} for i in self._taps
        ]
        cfg = model.pretrained_cfg
        self.image_size = cfg["input_size"][-1]
        self.mean = tuple(cfg["mean"])
        self.std = tuple(cfg["std"])
        self.num_features = model.num_features
        self.token_dim = info[-1]["num_chs"]

    def forward(self, images: Tensor) -> ImageOutput:
        """Encode (B, 3, H, W) images normalised with :attr:`mean`/:attr:`std`."""
        taken = sorted(set(self._taps))
        final, inter = self.model.forward_intermediates(images, indices=taken)
        maps = [inter[taken.index(i)] for i in self._taps]
        pooled = self.model.forward_head(final, pre_logits=True)
        if final.ndim == 3:  # ViT: (B, prefix + HW, C)
            tokens = final[:, getattr(self.model, "num_prefix_tokens", 0) :]
        elif getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # Swin: (B, H, W, C)
            tokens = final.flatten(1, 2)
        else:  # CNN: (B, C, H, W)
            tokens = final.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageOutput(pooled=pooled, tokens=tokens, mask=mask, maps=maps)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "weights": self.weights.as_dict()}


def _create(
    name: str, arch: str, spec: EncoderSpec, pretrained: bool, default_tag: str | None = None
) -> TimmImageEncoder:
    if not pretrained:
        log_random_init(_logger, name)
        return TimmImageEncoder(
            name, timm.create_model(arch, pretrained=False, num_classes=0), WeightsSource("random")
        )
    if spec.weights is not None and is_path(spec.weights):
        path = resolve_file(spec.weights, spec.spec)
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        classifier = model.pretrained_cfg.get("classifier") or "fc"
        load_into(model, load_state_dict_file(path), path, ignore_unexpected=[f"{classifier}."])
        _logger.info("%s: loaded weights from %s", name, path)
        return TimmImageEncoder(name, model, WeightsSource("file", str(path), file_sha256_memo(path)))
    tag = spec.weights or default_tag
    full = f"{arch}.{tag}" if tag else arch
    model = timm_pretrained(full, spec.spec, f"{name}@/path/to/weights.safetensors")
    _logger.info("%s: loaded timm/%s", name, full)
    return TimmImageEncoder(name, model, WeightsSource("tag", _tag(model)))


def _tag(model: nn.Module) -> str:
    cfg = model.pretrained_cfg
    return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]


@register_image_encoder("resnet18")
def resnet18(spec: EncoderSpec, pretrained: bool = True) -> TimmImageEncoder:
    """ResNet-18 (512-d pooled, C2–C5 taps)."""
    return _create("resnet18", "resnet18", spec, pretrained, default_tag="tv_in1k")


@register_image_encoder("resnet50")
def resnet50(spec: EncoderSpec, pretrained: bool = True) -> TimmImageEncoder:
    """ResNet-50 (2048-d pooled, C2–C5 taps)."""
    return _create("resnet50", "resnet50", spec, pretrained, default_tag="tv_in1k")


@register_image_encoder("resnet101")
def resnet101(spec: EncoderSpec, pretrained: bool = True) -> TimmImageEncoder:
    """ResNet-101 (2048-d pooled, C2–C5 taps)."""
    return _create("resnet101", "resnet101", spec, pretrained, default_tag="tv_in1k")


@register_image_encoder("vit-b-16")
def vit_b_16(spec: EncoderSpec, pretrained: bool = True) -> TimmImageEncoder:
    """ViT-B/16 at 224 (768-d CLS pooled, blocks 3/6/9/12 as stride-16 maps)."""
    return _create("vit-b-16", "vit_base_patch16_224", spec, pretrained)


@register_image_encoder("swin-t")
def swin_t(spec: EncoderSpec, pretrained: bool = True) -> TimmImageEncoder:
    """Swin-T at 224 (768-d average pooled, 4 stages at strides 4–32)."""
    return _create("swin-t", "swin_tiny_patch4_window7_224", spec, pretrained)
