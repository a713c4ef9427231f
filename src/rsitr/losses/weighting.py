"""Adaptive weighting of several loss terms (RDB spec §2.4).

* ``uncertainty`` (default; Kendall et al. 2018): ``Σ_k r_k·[exp(−s_k)·L_k + s_k]`` with learnable
  log-variances ``s_k`` initialised to 0 and clamped to ``[−c, c]``;
* ``anchored``: the same, but the first term (the retrieval loss) keeps weight 1 (``s_0 = 0``):
  only the auxiliary terms are adapted, so their weights cannot drain the retrieval term;
* ``normalised``: the ``s_k`` learn by the uncertainty objective on detached losses, and the
  model's loss is ``Σ_k r_k·w_k·L_k`` with ``w = K·softmax(−s)``: the weights always sum to K;
* ``ratio``: ``w_k = K·(1/L_k) / Σ_j (1/L_j)`` on detached losses (each term contributes about
  equally);
* ``dwa`` (Liu et al. 2019): ``w_k = K·softmax_k(ρ_k / T)``, ``ρ_k = L̄_k(e−1) / L̄_k(e−2)`` from
  the last two epochs' mean losses (``w = 1`` for the first two epochs);
* ``fixed``: constant weights.

``r_k`` is a per-term ramp factor (the mean-teacher ramp-up of the EMA term).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rsitr.errors import ConfigError

WEIGHTINGS = ("uncertainty", "anchored", "normalised", "ratio", "dwa", "fixed")
_LEARNED = ("uncertainty", "anchored", "normalised")


class LossWeighting(nn.Module):
    """Combines named loss terms into one scalar.

    Args:
        names: the term names, in a fixed order.
        mode: one of :data:`WEIGHTINGS`.
        fixed: the weights for ``mode="fixed"`` (one per name).
        clamp: the bound c on the log-variances (``uncertainty``).
        temperature: DWA's T.
    """

    def __init__(
        self,
        names: Sequence[str],
        mode: str = "uncertainty",
        fixed: Sequence[float] | None = None,
        clamp: float = 4.0,
        temperature: float = 2.0,
    ) -> None:
        super().__init__()
        if mode not in WEIGHTINGS:
            raise ConfigError(f"model.weighting: {mode!r} is not one of {', '.join(WEIGHTINGS)}")
        self.names = list(names)
        self.mode = mode
        self.clamp = clamp
        self.temperature = temperature
        k = len(self.names)
        fixed = [1.0] * k if fixed is None else list(fixed)
        if len(fixed) != k:
            raise ConfigError(f"model.fixed_weights: {len(fixed)} weights for {k} terms ({', '.join(names)})")
        self.register_buffer("fixed", torch.tensor(fixed, dtype=torch.float32))
        self.log_vars = nn.Parameter(torch.zeros(k), requires_grad=mode in _LEARNED)
        # ``anchored``: the first term's log-variance is held at 0
        free = torch.ones(k)
        if mode == "anchored":
            free[0] = 0.0
        self.register_buffer("free", free, persistent=False)
        # DWA: per-epoch loss sums and the two previous epochs' means.
        self.register_buffer("epoch_sum", torch.zeros(k))
        self.register_buffer("epoch_count", torch.zeros(()))
        self.register_buffer("history", torch.full((2, k), float("nan")))

    def weights(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The current multiplicative weight (detached) of each term present in ``terms``.

        ``ratio`` normalises over the present terms only, so an absent term takes no share.
        """
        present = [n for n in self.names if n in terms]
        idx = [self.names.index(n) for n in present]
        if self.mode in ("uncertainty", "anchored"):
            w = torch.exp(-self._s().detach())[idx]
        elif self.mode == "normalised":
            w = len(self.names) * torch.softmax(-self._s().detach(), 0)[idx]
        elif self.mode == "ratio":
            inv = 1.0 / torch.stack([terms[n].detach() for n in present]).clamp_min(1e-8)
            w = len(present) * inv / inv.sum()
        elif self.mode == "dwa" and not torch.isnan(self.history).any():
            rho = self.history[1] / self.history[0].clamp_min(1e-8)
            w = (len(self.names) * torch.softmax(rho / self.temperature, 0))[idx]
        elif self.mode == "dwa":
            w = torch.ones(len(idx), device=self.fixed.device)
        else:
            w = self.fixed[idx]
        return dict(zip(present, w, strict=True))

    def forward(self, terms: dict[str, Tensor], ramps: dict[str, float] | None = None) -> Tensor:
        """``Σ_k r_k·w_k·L_k`` (plus ``r_k·s_k`` for ``uncertainty``) over the present terms."""
        ramps = ramps or {}
        present = [n for n in self.names if n in terms]
        idx = torch.tensor([self.names.index(n) for n in present], device=self.fixed.device)
        losses = torch.stack([terms[n] for n in present])
        r = torch.tensor([float(ramps.get(n, 1.0)) for n in present], device=losses.device)
        if self.training and self.mode == "dwa":
            self.epoch_sum.index_add_(0, idx, losses.detach().float())
            self.epoch_count += 1
        if self.mode in ("uncertainty", "anchored"):
            s = self._s()[idx]
            return (r * (torch.exp(-s) * losses + s)).sum()
        w = torch.stack(list(self.weights(terms).values()))
        total = (r * w * losses).sum()
        if self.mode == "normalised":  # the log-variances learn from detached losses only
            s = self._s()[idx]
            total = total + (r * (torch.exp(-s) * losses.detach() + s)).sum()
        return total

    def _s(self) -> Tensor:
        """The clamped log-variances (0 for an anchored term)."""
        return self.log_vars.clamp(-self.clamp, self.clamp) * self.free

    @torch.no_grad()
    def end_epoch(self) -> None:
        """DWA bookkeeping: push this epoch's mean losses into the two-epoch history."""
        if self.mode != "dwa" or self.epoch_count == 0:
            return
        self.history[0] = self.history[1]
        self.history[1] = self.epoch_sum / self.epoch_count
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the log-variances inside their clamp (after an optimiser step)."""
        self.log_vars.clamp_(-self.clamp, self.clamp)
