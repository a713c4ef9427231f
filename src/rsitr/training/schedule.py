"""Learning-rate schedules: linear warm-up, then cosine, linear, constant, step or multistep.

Every schedule is a multiplier of the base learning rate per optimiser step. ``floor`` is the
lowest multiplier: a decay reaches it at ``decay_epochs`` (default: the end of training) and
then holds it, as CMPAGL's 1e-5 → 1e-6 by epoch 30 (``floor: 0.1``, ``decay_epochs: 30``).
``step`` multiplies by ``gamma`` every ``milestones[0]`` epochs, ``multistep`` at each listed
epoch (torch's StepLR/MultiStepLR conventions), never below ``floor``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch

from rsitr.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "step", "multistep")


def lr_lambda(
    step: int,
    total: int,
    warmup: int,
    kind: str,
    *,
    steps_per_epoch: int = 1,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    floor: float = 0.0,
    decay_steps: int | None = None,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind in ("step", "multistep"):
        epoch = step // max(1, steps_per_epoch)
        n = epoch // milestones[0] if kind == "step" else bisect.bisect_right(sorted(milestones), epoch)
        return max(floor, gamma**n)
    end = total if decay_steps is None else min(total, decay_steps)
    if end <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, end - warmup))
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: float,
    kind: str,
    *,
    steps_per_epoch: int = 1,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    floor: float = 0.0,
    decay_epochs: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with ``warmup`` steps (a fraction of ``total_steps`` when < 1).

    Raises:
        ConfigError: an unknown kind, ``step``/``multistep`` without milestones, or a floor
            outside [0, 1].
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {kind!r} is not one of {', '.join(SCHEDULES)}")
    if kind in ("step", "multistep") and (not milestones or min(milestones) < 1):
        raise ConfigError(f"optim.milestones: {kind} needs epochs >= 1 (e.g. [15, 25]), got {milestones}")
    if not 0.0 <= floor <= 1.0:
        raise ConfigError(f"optim.lr_floor: expected a multiplier in [0, 1], got {floor}")
    w = int(round(warmup * total_steps)) if 0 < warmup < 1 else int(warmup)
    decay_steps = None if decay_epochs is None else decay_epochs * steps_per_epoch
    kw = dict(steps_per_epoch=steps_per_epoch, milestones=tuple(milestones), gamma=gamma, floor=floor,
              decay_steps=decay_steps)  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, w, kind, **kw))
