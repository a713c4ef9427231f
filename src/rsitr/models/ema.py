"""Mean teacher: an exponential moving average of a module's *trainable* parameters only.

``θ' ← μ·θ' + (1 − μ)·θ`` after each optimiser step (RDB spec §2.3). Frozen parameters are shared
with the student, so only the trainable tensors are stored (as buffers, saved with checkpoints
and restored on resume). :meth:`swapped` runs code with the teacher's values in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class MeanTeacher(nn.Module):
    """EMA copies of ``module``'s parameters that require grad.

    Args:
        module: the student (its trainable parameters are tracked by name).
        exclude: name prefixes to leave out (e.g. the loss weights).
    """

    def __init__(self, module: nn.Module, exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._module = [module]  # not a submodule: the teacher does not own the student
        self.names = [
            n for n, p in module.named_parameters() if p.requires_grad and not n.startswith(exclude)
        ]
        for i, n in enumerate(self.names):
            self.register_buffer(f"p{i}", dict(module.named_parameters())[n].detach().clone())

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(self._module[0].named_parameters())
        for i, n in enumerate(self.names):
            yield getattr(self, f"p{i}"), params[n]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """θ' ← decay·θ' + (1 − decay)·θ."""
        teacher, student = zip(*self._pairs(), strict=True) if self.names else ((), ())
        if teacher:
            torch._foreach_lerp_(list(teacher), [p.detach() for p in student], 1.0 - decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, the student's parameters hold the teacher's values."""
        pairs = list(self._pairs())
        saved = [p.data for _, p in pairs]
        try:
            for t, p in pairs:
                p.data = t
            yield
        finally:
            for (_, p), d in zip(pairs, saved, strict=True):
                p.data = d
