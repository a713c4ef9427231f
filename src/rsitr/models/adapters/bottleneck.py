"""The bottleneck adapter shared by VEA and TSA, and its gated insertion (RDB spec §1.1–1.2).

``z0 = GELU(W_down m)``; ``z1 = Attn(z0)`` (DA for images, HA for text, MHA for the symmetric
baseline); ``z2 = Shared_l(z1)``; ``z3 = Attn(z2)`` if ``attn_twice`` else ``z2``;
``z = σ(β)·z0 + (1 − σ(β))·z3``; ``Adapter(m) = m + W_up z`` with W_up zero-initialised.

Insertion on a block's MLP output with a sigmoid gate ``a = σ(g)``:
``m ← a·Adapter(m) + (1 − a)·m``, computed as ``m + a·W_up z`` (the same value, and exactly ``m``
while W_up is zero, so a fresh adapted model computes what the frozen model computes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.models.encoders.base import masked_mean


class AdapterContext:
    """Per-forward state shared by one tower's adapters.

    Attributes:
        mask: the token validity mask (B, N) of the current forward, or ``None``.
        capture: when True, insertions record ``(input, output)`` of their frozen module in
            ``captured`` and skip the adapter (used to compute the cacheable prefix).
        off: when True, every adapter is bypassed (the frozen tower's output, for comparisons).
    """

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.capture = False
        self.captured: tuple[Tensor, Tensor] | None = None
        self.off = False


class BottleneckAdapter(nn.Module):
    """A modality-specific bottleneck adapter: ``m ↦ W_up z`` (the residual is added by the caller).

    Args:
        dim: the tower's width d at the insertion point.
        bottleneck: r (common to both towers when a shared layer is used).
        attention: the modality attention module on (B, N, r) tokens.
        shared: the layer's shared interaction module, or ``None``.
        attn_twice: apply ``attention`` again after the shared module (HarMA).
        inner_gate_init: β's initial value.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        attention: nn.Module,
        shared: nn.Module | None = None,
        attn_twice: bool = False,
        inner_gate_init: float = 0.6,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.attention = attention
        self.shared = [shared] if shared is not None else []  # a plain list: owned by the method
        self.attn_twice = attn_twice
        self.beta = nn.Parameter(torch.tensor(float(inner_gate_init)))
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, m: Tensor, mask: Tensor | None = None, pool: bool = False) -> Tensor:
        """``W_up z`` per token, or with ``pool`` its mean over the tokens, ``W_up mean_n(z_n)``:
        W_up is affine, so the mean commutes with it and the up-projection runs once per row."""
        z0 = F.gelu(self.down(m))
        z = self.attention(z0, mask)
        if self.shared:
            z = self.shared[0](z, mask)
        if self.attn_twice:
            z = self.attention(z, mask)
        beta = torch.sigmoid(self.beta)
        z = beta * z0 + (1 - beta) * z
        if pool:
            z = z.mean(1) if mask is None else masked_mean(z, mask)
        return self.up(z)


class GatedInsertion(nn.Module):
    """Wraps a frozen module whose output is a token sequence and adds a gated adapter to it.

    ``placement="mlp_out_gated"``: ``y = f(x)``; ``y + σ(g)·A(y)`` (spec default).
    ``placement="parallel_mlp"``: ``f(x) + σ(g)·A(x)`` (PE-RSITR; needs equal in/out widths).

    ``layout`` says how the wrapped output holds tokens: ``"nlc"`` (B, N, C) or ``"nchw"``
    (B, C, H, W; the adapter sees the HW spatial tokens).

    Args:
        inner: the frozen module (an MLP, a projection, a BatchNorm ending a conv block).
        adapter: the :class:`BottleneckAdapter`.
        ctx: the tower's :class:`AdapterContext` (mask).
        gate_init: g's initial value.
        placement: see above.
        layout: see above.
    """

    def __init__(
        self,
        inner: nn.Module,
        adapter: BottleneckAdapter,
        ctx: AdapterContext,
        gate_init: float = 0.6,
        placement: str = "mlp_out_gated",
        layout: str = "nlc",
    ) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter
        self.ctx = ctx
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.placement = placement
        self.layout = layout

    def __getattr__(self, name: str) -> object:
        """Attributes the wrapped module had (e.g. ``mlp.c_fc``) stay reachable through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def delta(self, y: Tensor, pool: bool = False) -> Tensor:
        """``σ(g)·W_up z`` for tokens or maps ``y`` (zero while the context is ``off``); with
        ``pool``, its mean over the tokens as (B, C), so that ``mean(y + delta(y))`` is
        ``mean(y) + delta(y, pool=True)`` at one up-projection per row instead of one per token.

        The adapter always runs in float32, outside any autocast around the frozen tower (its
        attention in bfloat16 is slower on CPUs, and its small weights gain nothing from it); the
        result comes back in ``y``'s dtype."""
        nchw = self.layout == "nchw"
        tokens = y.flatten(2).transpose(1, 2) if nchw else y
        if self.ctx.off:
            return y.new_zeros(tokens.shape[0], tokens.shape[-1]) if pool else torch.zeros_like(y)
        mask = None if nchw else self.ctx.mask
        with torch.autocast(y.device.type, enabled=False):
            out = torch.sigmoid(self.gate) * self.adapter(tokens.float(), mask, pool)
        if nchw and not pool:
            out = out.transpose(1, 2).reshape(y.shape)
        return out.to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        if self.ctx.capture:  # the tower is computing its frozen prefix: record, don't adapt
            self.ctx.captured = (x, y)
            return y
        return y + self.delta(x if self.placement == "parallel_mlp" else y)
