"""Whether bfloat16 is fast here: on a CUDA GPU that supports it, or on a CPU with native bf16
arithmetic (AVX512-BF16 or AMX). On other CPUs (AVX2 only, e.g. many AMD EPYC and older Xeon
parts) bf16 is emulated: EfficientNet-Lite0 ran 14× slower in bf16 than in float32 on an AVX2 AMD
EPYC (``benchmarks/lite0_precision.py``), so ``auto`` means float32 there."""

from __future__ import annotations

import torch

from rsitr.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device_type: str | None = None) -> bool:
    """True when bf16 matmuls and convolutions run natively on ``device_type`` (``None``: CUDA
    when a GPU is present, else the CPU)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(value: str, field: str) -> str:
    """``fp32`` / ``bf16`` as given; ``auto`` → ``bf16`` where :func:`native_bf16`, else ``fp32``."""
    if value not in PRECISIONS:
        raise ConfigError(f"{field}={value!r}; allowed: {', '.join(map(repr, PRECISIONS))}")
    if value == "auto":
        return "bf16" if native_bf16() else "fp32"
    return value
