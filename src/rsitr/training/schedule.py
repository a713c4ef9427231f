"""Learning-rate schedule: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with ``warmup`` steps (a fraction of ``total_steps`` when < 1)."""
    w = int(round(warmup * total_steps)) if 0 < warmup < 1 else int(warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, w, kind))
