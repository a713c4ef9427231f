"""Token-mixing modules used inside the bottleneck adapters (RDB spec §1.2–1.5).

All work on bottleneck tokens ``z`` (B, N, r) with an optional validity mask (B, N), True for
real tokens; padded keys are never attended to. Each module includes its own residual, so the
adapter stays stable from random init (spec §1.3 [REC]: ``z + DA(LN(z))``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError


def attention_bias(mask: Tensor | None, n: int, causal: bool, device: torch.device) -> Tensor | None:
    """Boolean (B, 1, N, N) attention mask (True = may attend) from key validity and causality."""
    if mask is None and not causal:
        return None
    allowed = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].bool()
    return allowed


def lambda_init_schedule(layer: int) -> float:
    """Differential Transformer's depth schedule: λ_init(l) = 0.8 − 0.6·exp(−0.3(l − 1)), l ≥ 1."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


class _Heads(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"adapter: bottleneck width {dim} is not divisible by {heads} heads")
        self.dim, self.heads = dim, heads

    def split(self, x: Tensor, heads: int) -> Tensor:
        """(B, N, D) → (B, heads, N, D/heads)."""
        b, n, _ = x.shape
        return x.view(b, n, heads, -1).transpose(1, 2)


class SelfAttention(_Heads):
    """Standard multi-head self-attention with a pre-LN residual: z + MHA(LN(z)) (HarMA's adapter).

    Args:
        dim: token width r.
        heads: number of heads.
        causal: token i attends only to tokens ≤ i.
    """

    def __init__(self, dim: int, heads: int = 4, causal: bool = False) -> None:
        super().__init__(dim, heads)
        self.causal = causal
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(self.norm(z)).chunk(3, dim=-1)
        bias = attention_bias(mask, z.shape[1], self.causal, z.device)
        h = F.scaled_dot_product_attention(
            self.split(q, self.heads), self.split(k, self.heads), self.split(v, self.heads), attn_mask=bias
        )
        return z + self.out(h.transpose(1, 2).flatten(2))


class DifferentialAttention(_Heads):
    """Differential attention (Ye et al. 2024; RDB spec §1.3), with a pre-LN residual.

    Per head i: ``(softmax(Q1K1ᵀ/√d_h) − λ·softmax(Q2K2ᵀ/√d_h)) V_i``, then a per-head RMSNorm
    scaled by ``(1 − λ_init)``; ``λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init``. Sub-head size
    ``d_h = r / (2h)``; V heads are ``2 d_h`` wide. Output: ``z + W_O · concat(heads)``.

    Args:
        dim: token width r (divisible by 2·heads).
        heads: number of differential heads h.
        layer: 1-based depth of the adapted block, for the λ_init schedule.
        lambda_init: ``"schedule"`` (the depth schedule) or a constant.
        causal: causal masking (text towers).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        layer: int = 1,
        lambda_init: float | str = "schedule",
        causal: bool = False,
    ) -> None:
        super().__init__(dim, 2 * heads)
        self.n_heads = heads
        self.head_dim = dim // (2 * heads)
        self.causal = causal
        if lambda_init == "schedule":
            self.lambda_init = lambda_init_schedule(layer)
        elif isinstance(lambda_init, (int, float)):
            self.lambda_init = float(lambda_init)
        else:
            raise ConfigError(f"model.lambda_init: {lambda_init!r} is neither 'schedule' nor a number")
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.head_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5)

    def lam(self) -> Tensor:
        """The re-parameterised scalar λ."""
        return (
            torch.exp((self.lambda_q1 * self.lambda_k1).sum())
            - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
            + self.lambda_init
        )

    def attend(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The differential heads on normalised tokens x: (B, N, r) → (B, N, r), before W_O."""
        b, n, _ = x.shape
        q = self.split(self.q(x), 2 * self.n_heads)  # (B, 2h, N, d_h)
        k = self.split(self.k(x), 2 * self.n_heads)
        v = self.split(self.v(x), self.n_heads)  # (B, h, N, 2 d_h)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        bias = attention_bias(mask, n, self.causal, x.device)
        if bias is not None:
            logits = logits.masked_fill(~bias, float("-inf"))
        a = logits.softmax(-1).view(b, self.n_heads, 2, n, n)
        attn = a[:, :, 0] - self.lam() * a[:, :, 1]
        heads = self.head_norm(attn @ v) * (1 - self.lambda_init)
        return heads.transpose(1, 2).reshape(b, n, -1)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return z + self.out(self.attend(self.norm(z), mask))


class HierarchicalAttention(nn.Module):
    """Hierarchical attention for text (RDB spec §1.4): word → phrase → sentence.

    ``Hw = MHA(z)`` (word level, padding masked, optionally causal); ``Hp = DWConv1d_k(Hw)``
    (phrase level, padded tokens zeroed first); ``c = Σ_i s_i Hp_i`` with
    ``s = softmax_valid(uᵀ tanh(W_s Hp + b))`` (sentence level, HAN-style additive pooling);
    output ``z + w1·Hw + w2·Hp + w3·c`` with ``w = softmax(ω)``, ω initialised to 0.
    ``mode="simple"``: only ``z + w1·Hw + w3·c`` with c pooled from Hw.

    Args:
        dim: token width r.
        heads: word-level attention heads.
        causal: causal word-level attention (matches the CLIP text tower).
        kernel: phrase window (odd).
        mode: ``"full"`` or ``"simple"``.
    """

    def __init__(
        self, dim: int, heads: int = 4, causal: bool = False, kernel: int = 3, mode: str = "full"
    ) -> None:
        super().__init__()
        if mode not in ("full", "simple"):
            raise ConfigError(f"model.tsa_mode: {mode!r} is not one of full, simple")
        self.mode = mode
        self.causal = causal
        self.kernel = kernel
        self.word = SelfAttention(dim, heads, causal)
        self.phrase = nn.Conv1d(dim, dim, kernel, groups=dim)
        self.score = nn.Linear(dim, dim)
        self.u = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.omega = nn.Parameter(torch.zeros(3))

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        valid = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if mask is None else mask.bool()
        hw = (self.word(z, mask) - z) * valid[..., None]  # the MHA branch alone, padding zeroed
        w = self.omega.softmax(0)
        if self.mode == "full":
            pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2, self.kernel // 2)
            hp = self.phrase(F.pad(hw.transpose(1, 2), pad)).transpose(1, 2) * valid[..., None]
        else:
            hp = hw
        e = torch.tanh(self.score(hp)) @ self.u  # (B, N)
        s = e.masked_fill(~valid, float("-inf")).softmax(-1)
        c = (s[..., None] * hp).sum(1, keepdim=True)
        out = z + w[0] * hw + w[2] * c
        return out + w[1] * hp if self.mode == "full" else out


class SharedInteraction(nn.Module):
    """Shared interaction layer (RDB spec §1.5, HarMA's BiShareAdapter): one module per layer
    whose weights serve both towers; tokens of the two modalities are never mixed.

    ``y = W1 z`` (r → r/2); ``a = MHA(y)``; ``y' = σ(γ)·a + (1 − σ(γ))·y``; ``S(z) = z + W2 y'``
    with W2 zero-initialised (so S is the identity at init).

    Args:
        dim: bottleneck width r (the same for both towers).
        heads: attention heads on the r/2 tokens.
        gate_init: γ's initial value.
    """

    def __init__(self, dim: int, heads: int = 8, gate_init: float = 0.6) -> None:
        super().__init__()
        half = dim // 2
        if half % heads:
            raise ConfigError(f"adapter: shared width {half} is not divisible by {heads} heads")
        self.heads = heads
        self.down = nn.Linear(dim, half)
        self.qkv = nn.Linear(half, 3 * half)
        self.proj = nn.Linear(half, half)
        self.gamma = nn.Parameter(torch.tensor(float(gate_init)))
        self.up = nn.Linear(half, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        y = self.down(z)
        b, n, d = y.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(y).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(mask, n, False, z.device))
        a = self.proj(a.transpose(1, 2).reshape(b, n, d))
        g = torch.sigmoid(self.gamma)
        return z + self.up(g * a + (1 - g) * y)
