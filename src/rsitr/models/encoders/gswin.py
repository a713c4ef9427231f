"""``gswin`` / ``gswin-tiny``: the Gswin transformer of CMPAGL (§III-B, Eq. 1–6, Fig. 2–3).

A Swin-like hierarchy: a patch embedding (patch 4, Eq. 1), four stages with patch merging between
them (Eq. 2) and depths (1, 1, 3, 1), window 8. Each Gswin block (Eq. 6) runs

* F_L = LW-MSA(x): window self-attention over the local windows;
* F_SL = SLW-MSA(F_L): the same over windows shifted by half a window, with Swin's mask so that
  tokens that the cyclic shift brought together from different image regions do not attend to
  each other;
* F_GL = GLW-CA(F_L, F_W) + GLW-CA(F_SL, F_W): cross-attention from every local window to the
  global window F_W that the GWG (Eq. 4–5) pools from the block's input;

with pre-LayerNorms, residuals and an MLP as in Swin: z = F_SL + F_GL, out = z + MLP(LN(z)).
One Gswin block holds Swin's pair of blocks (W-MSA, SW-MSA), so depths (1, 1, 3, 1) have the
attention layers of Swin-T's (2, 2, 6, 2); :func:`load_swin_weights` uses that to start from
timm Swin-T weights where shapes match (``gswin@/path/swin_t.safetensors``).

Maps whose sides are not multiples of the window are zero-padded inside each block; padded keys
are masked and padded positions are cropped after the block. The ablation switches are
``no_global_window`` (no GWG, no GLW-CA: F_GL = 0) and ``no_shifted_window`` (no SLW-MSA:
F_GL = GLW-CA(F_L, F_W), z = F_L + F_GL). ``pool`` is ``first`` (the paper's "0-th token",
Eq. 3) or ``mean``. Weights are random unless a Swin checkpoint is given: the paper trains Gswin
on the retrieval data (CPU training from scratch is slow; see the method's notes).

:class:`GswinOnMap` runs the same stages on a frozen CNN's feature map instead of on pixels (no
patch embedding; CMPAGL's ``gswin_on_map``, which caches the map and trains only the stages).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsitr.errors import ConfigError, DataError
from rsitr.hashing import file_sha256_memo
from rsitr.models.encoders._factory import EncoderSpec, register_image_encoder
from rsitr.models.encoders._weights import (
    WeightsSource,
    is_path,
    load_state_dict_file,
    log_random_init,
    resolve_file,
    timm_pretrained,
)
from rsitr.models.encoders.base import ImageEncoder, ImageOutput

__all__ = [
    "GlobalWindowGenerator",
    "GswinBlock",
    "GswinEncoder",
    "GswinOnMap",
    "attention",
    "build_stages",
    "last_block_attention",
    "load_swin_weights",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

_logger = logging.getLogger(__name__)


# --- windows ----------------------------------------------------------------------------------------
def window_partition(x: Tensor, window: int) -> Tensor:
    """Split a (B, H, W, C) map into non-overlapping windows: (B·nW, window², C), row-major.

    H and W must be multiples of ``window``; :func:`window_reverse` is the exact inverse.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Merge (B·nW, window², C) windows back into a (B, H, W, C) map (inverse of the partition)."""
    c = windows.shape[-1]
    nh, nw = height // window, width // window
    x = windows.view(-1, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def shifted_window_mask(
    height: int,
    width: int,
    window: int,
    shift: int,
    valid: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Which key each query of each window may *not* attend to: (nW, window², window²) bool.

    Swin's mask for the cyclic shift by ``shift``: the map *after* rolling by ``-shift`` is cut
    into 3×3 regions at ``-window`` and ``-shift`` along each side, so the windows on the last row
    and column hold tokens that the roll brought together from opposite image borders; attention
    across regions is blocked. Keys in the zero padding beyond ``valid = (H, W)`` (in image
    coordinates, so rolled with the map) are blocked too. A token may always attend to itself, so
    no row is fully blocked (padded queries are cropped afterwards).

    Args:
        height: padded map height (a multiple of ``window``).
        width: padded map width (a multiple of ``window``).
        window: window side.
        shift: cyclic shift (0: plain windows, only padding is masked).
        valid: the unpadded (H, W); ``None``: no padding.
        device: where to build the mask.
    """
    region = torch.zeros(height, width, dtype=torch.long, device=device)
    if shift > 0:
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, hs in enumerate(cuts):
            for j, ws in enumerate(cuts):
                region[hs, ws] = 3 * i + j
    ok = torch.ones(height, width, dtype=torch.bool, device=device)
    if valid is not None:
        ok[valid[0] :, :] = False
        ok[:, valid[1] :] = False
    if shift > 0:
        ok = ok.roll((-shift, -shift), (0, 1))
    reg = window_partition(region[None, :, :, None], window)[..., 0]  # (nW, N)
    keep = window_partition(ok[None, :, :, None].long(), window)[..., 0].bool()  # (nW, N)
    blocked = (reg[:, :, None] != reg[:, None, :]) | ~keep[:, None, :]
    eye = torch.eye(window * window, dtype=torch.bool, device=device)
    return blocked & ~eye


# --- attention --------------------------------------------------------------------------------------
def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """softmax(q kᵀ / √d + mask) v: :func:`torch.nn.functional.scaled_dot_product_attention`, except
    for bfloat16 on CPU, where the same formula is spelled out as two matmuls and a softmax.

    torch's fused CPU kernel runs 3–5× slower in bfloat16 than the explicit form at these sizes
    (windows of 49–196 tokens, captions of ~24, head width 32; fp32 the two are even), and under
    CPU autocast the inputs are bfloat16. ``attn_mask``: bool (True = attend) or additive float,
    broadcastable to (…, L, S).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(-1)
    return F.dropout(probs, dropout_p) @ v if dropout_p > 0 else probs @ v


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with Swin's relative position bias (LW-/SLW-MSA).

    Args:
        dim: channels C.
        num_heads: heads (C must be divisible by them).
        window: window side.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
        coords = coords.flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], False)
        #: when set, :meth:`forward` computes the softmax explicitly and keeps it in ``last_attention``
        self.keep_attention = False
        self.last_attention: Tensor | None = None

    def bias(self) -> Tensor:
        """(heads, N, N) relative position bias."""
        n = self.window * self.window
        idx = self.relative_position_index.reshape(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, blocked: Tensor | None = None) -> Tensor:
        """Attend within windows.

        Args:
            x: (B·nW, N, C) window tokens, windows of one image consecutive.
            blocked: (nW, N, N) bool mask from :func:`shifted_window_mask`, or ``None``.

        Returns:
            (B·nW, N, C).
        """
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # 3 × (B·nW, h, N, d)
        mask = self.bias().to(q.dtype)[None]  # (1, h, N, N)
        if blocked is not None:
            nw = blocked.shape[0]
            mask = mask.masked_fill(blocked[:, None], float("-inf"))  # (nW, h, N, N)
            q, k, v = (t.view(bw // nw, nw, h, n, c // h) for t in (q, k, v))  # (B, nW, h, N, d)
        if self.keep_attention:  # (for figures) the same result as the fused kernel, with the weights
            attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5 + mask).softmax(-1)
            self.last_attention = attn.detach().reshape(bw, h, n, n)
            out = attn @ v
        else:
            out = attention(q, k, v, attn_mask=mask)
        return self.proj(out.reshape(bw, h, n, c // h).transpose(1, 2).reshape(bw, n, c))


class GlobalCrossAttention(nn.Module):
    """GLW-CA: queries from local-window tokens, keys and values from the global window F_W.

    Every local window (plain or shifted) attends to the same global window, so partitioning the
    queries into windows does not change the result: all tokens of a map are queried at once.

    Args:
        dim: channels C.
        num_heads: heads.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        """(B, L, C) queries, (B, G, C) global-window tokens → (B, L, C)."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)  # (B, h, L, d)
        k, v = self.kv(g).view(b, g.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)  # (B, h, G, d)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


# --- global window generation ------------------------------------------------------------------------
class GWGLayer(nn.Module):
    """One GWG layer (Eq. 4–5), channels kept at C.

    x₁ = Conv3×3⁽²⁾(GELU(Conv3×3⁽¹⁾(Conv1×1⁽¹⁾(F)))), x̂ = Concat(x₁, Conv1×1⁽²⁾(F)) (Eq. 4);
    F_W = Pool₂ₓ(Conv1×1⁽³⁾(x̂) + F) (Eq. 5), a 2× average pooling (odd sides rounded up).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1)  # Conv1×1⁽¹⁾
        self.conv3a = nn.Conv2d(dim, dim, 3, padding=1)  # Conv3×3⁽¹⁾
        self.act = nn.GELU()
        self.conv3b = nn.Conv2d(dim, dim, 3, padding=1)  # Conv3×3⁽²⁾
        self.skip = nn.Conv2d(dim, dim, 1)  # Conv1×1⁽²⁾
        self.fuse = nn.Conv2d(2 * dim, dim, 1)  # Conv1×1⁽³⁾

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)."""
        x1 = self.conv3b(self.act(self.conv3a(self.conv1(x))))
        xh = torch.cat([x1, self.skip(x)], dim=1)  # Eq. 4
        return F.avg_pool2d(self.fuse(xh) + x, 2, ceil_mode=True)  # Eq. 5


class GlobalWindowGenerator(nn.Module):
    """N_GWG stacked GWG layers: a (B, C, H, W) map → a window-sized (B, C, ws, ws) global window.

    N_GWG = ⌊log₂(side / ws)⌋ for the map side the stage sees at the encoder's configured input
    size (the paper's 256 px: 3, 2, 1, 0 for the four stages). At other sizes, or when the sides are
    not ws·2ⁿ, a final adaptive average pooling gives exactly ws × ws.

    Args:
        dim: channels C.
        window: the window side ws.
        num_layers: N_GWG.
    """

    def __init__(self, dim: int, window: int, num_layers: int) -> None:
        super().__init__()
        self.window = window
        self.layers = nn.ModuleList(GWGLayer(dim) for _ in range(num_layers))

    @staticmethod
    def layers_for(size: int, window: int) -> int:
        """N_GWG for a square map of side ``size``: halvings until it fits in one window."""
        return int(math.floor(math.log2(size / window))) if size > window else 0

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, ws, ws)."""
        for layer in self.layers:
            x = layer(x)
        if x.shape[-2:] != (self.window, self.window):
            x = F.adaptive_avg_pool2d(x, self.window)
        return x


# --- blocks and stages ---------------------------------------------------------------------------------
class Mlp(nn.Module):
    """Linear → GELU → Linear (Swin's MLP, ratio 4)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
    return x * keep.bernoulli_(1 - p) / (1 - p)


class GswinBlock(nn.Module):
    """One Gswin transformer block (Eq. 6, Fig. 3).

    Args:
        dim: channels C.
        num_heads: heads of LW-MSA, SLW-MSA and GLW-CA.
        window: window side ws.
        gwg_layers: N_GWG of this block's global window generator.
        mlp_ratio: MLP hidden width / C.
        drop_path: stochastic-depth probability of each residual branch.
        global_window: use the GWG and GLW-CA (``False``: the "w/o GW" ablation).
        shifted_window: use SLW-MSA (``False``: the "w/o SLW" ablation).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        gwg_layers: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        global_window: bool = True,
        shifted_window: bool = True,
    ) -> None:
        super().__init__()
        self.window, self.drop_path = window, drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)  # LW-MSA
        self.shift_norm = nn.LayerNorm(dim) if shifted_window else None
        self.shift_attn = WindowAttention(dim, num_heads, window) if shifted_window else None  # SLW-MSA
        if global_window:
            self.gwg: GlobalWindowGenerator | None = GlobalWindowGenerator(dim, window, gwg_layers)
            self.global_norm: nn.Module | None = nn.LayerNorm(dim)  # on F_W
            self.cross_norm: nn.Module | None = nn.LayerNorm(dim)  # on F_L / F_SL
            self.cross_attn: GlobalCrossAttention | None = GlobalCrossAttention(dim, num_heads)  # GLW-CA
        else:
            self.gwg = self.global_norm = self.cross_norm = self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _window_attn(self, attn: WindowAttention, x: Tensor, shift: int, valid: tuple[int, int]) -> Tensor:
        """Window attention over a padded (B, Hp, Wp, C) map, cyclically shifted by ``shift``."""
        _, hp, wp, _ = x.shape
        ws = self.window
        padded = valid != (hp, wp)
        blocked = None
        if shift or padded:
            blocked = shifted_window_mask(hp, wp, ws, shift, valid if padded else None, x.device)
        if shift:
            x = x.roll((-shift, -shift), (1, 2))
        out = window_reverse(attn(window_partition(x, ws), blocked), ws, hp, wp)
        return out.roll((shift, shift), (1, 2)) if shift else out

    def global_window(self, x: Tensor) -> Tensor:
        """F_W (Eq. 4–5) of a (B, H, W, C) map as (B, ws², C) tokens."""
        assert self.gwg is not None and self.global_norm is not None
        g = self.gwg(x.permute(0, 3, 1, 2))  # (B, C, ws, ws)
        return self.global_norm(g.flatten(2).transpose(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        b, h, w, c = x.shape
        ws = self.window
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        xp = F.pad(x, (0, 0, 0, wp - w, 0, hp - h)) if (hp, wp) != (h, w) else x
        shift = ws // 2 if max(hp, wp) > ws else 0  # a single window has nothing to shift (Swin)
        p = self.drop_path if self.training else 0.0
        f_l = xp + drop_path(self._window_attn(self.attn, self.norm1(xp), 0, (h, w)), p, self.training)
        z = f_l
        if self.shift_attn is not None:
            assert self.shift_norm is not None
            f_sl = f_l + drop_path(
                self._window_attn(self.shift_attn, self.shift_norm(f_l), shift, (h, w)), p, self.training
            )
            z = f_sl
        if self.cross_attn is not None:
            assert self.cross_norm is not None
            g = self.global_window(x)
            f_gl = self.cross_attn(self.cross_norm(f_l).reshape(b, hp * wp, c), g)
            if self.shift_attn is not None:  # + GLW-CA(F_SL, F_W)
                f_gl = f_gl + self.cross_attn(self.cross_norm(z).reshape(b, hp * wp, c), g)
            z = z + drop_path(f_gl.view(b, hp, wp, c), p, self.training)
        z = z + drop_path(self.mlp(self.norm2(z)), p, self.training)
        return z[:, :h, :w] if (hp, wp) != (h, w) else z


class PatchEmbed(nn.Module):
    """Eq. 1: non-overlapping p×p patches linearly embedded to C channels, then LayerNorm."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, ⌈H/p⌉, ⌈W/p⌉, C); sides that are not multiples of p are zero-padded."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.patch, (-w) % self.patch
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Eq. 2's PM: 2×2 neighbours concatenated (4C), LayerNorm, Linear to 2C (odd sides padded)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class GswinStage(nn.Module):
    """Optional patch merging, then ``depth`` Gswin blocks."""

    def __init__(self, downsample: PatchMerging | None, blocks: list[GswinBlock]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


def build_stages(
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window: int | tuple[int, ...],
    side: int,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.0,
    no_global_window: bool = False,
    no_shifted_window: bool = False,
) -> list[GswinStage]:
    """The Gswin stages: widths C·2ⁱ, patch merging (Eq. 2) before every stage but the first.

    Args:
        embed_dim: C, the first stage's width.
        depths: Gswin blocks per stage.
        num_heads: heads per stage.
        window: window side ws, or one per stage.
        side: the first stage's map side at the configured input size; it halves (rounded up)
            per stage and sets each stage's N_GWG (:meth:`GlobalWindowGenerator.layers_for`).
        mlp_ratio: MLP width / C.
        drop_path: stochastic depth at the last block (linearly increasing from 0).
        no_global_window: the "w/o GW" ablation.
        no_shifted_window: the "w/o SLW" ablation.
    """
    windows = (window,) * len(depths) if isinstance(window, int) else tuple(window)
    dims = [embed_dim * 2**i for i in range(len(depths))]
    rates = torch.linspace(0, drop_path, sum(depths)).tolist()
    stages, k = [], 0
    for i, (dim, depth, heads, ws) in enumerate(zip(dims, depths, num_heads, windows, strict=True)):
        if i > 0:
            side = math.ceil(side / 2)
        n_gwg = GlobalWindowGenerator.layers_for(side, ws)
        blocks = [
            GswinBlock(
                dim,
                heads,
                ws,
                n_gwg,
                mlp_ratio,
                rates[k + j],
                global_window=not no_global_window,
                shifted_window=not no_shifted_window,
            )
            for j in range(depth)
        ]
        k += depth
        stages.append(GswinStage(PatchMerging(dims[i - 1], dim) if i > 0 else None, blocks))
    return stages


@torch.no_grad()
def last_block_attention(layers: nn.ModuleList, run: Callable[[], list[Tensor]]) -> Tensor:
    """Attention of the last Gswin block's LW-MSA (Fig. 7): (B, h', w') maps in [0, 1].

    ``run()`` runs the stages and returns their output maps (NCHW, the last one (B, C, h', w')).
    Each token's value is the attention it receives inside its window, averaged over heads and
    queries (padded keys receive none), min-max normalised per image.
    """
    attn = layers[-1].blocks[-1].attn
    attn.keep_attention = True
    try:
        maps = run()
        weights = attn.last_attention
    finally:
        attn.keep_attention, attn.last_attention = False, None
    assert weights is not None
    h, w = maps[-1].shape[-2:]
    ws = attn.window
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    received = weights.mean(dim=(1, 2))[..., None]  # (B·nW, N, 1)
    m = window_reverse(received, ws, hp, wp)[:, :h, :w, 0]  # (B, h', w')
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


# --- the encoder -------------------------------------------------------------------------------------------
class GswinEncoder(ImageEncoder):
    """The Gswin image tower.

    ``pooled`` is the final map's first token (``pool="first"``, Eq. 3) or its mean, after the
    final LayerNorm; ``tokens`` the final map flattened (B, h'·w', 8C); ``maps`` the four stage
    outputs at strides 4/8/16/32 (B, C_k, H_k, W_k).

    Args:
        embed_dim: C, the first stage's width (widths C, 2C, 4C, 8C).
        depths: Gswin blocks per stage (the paper: 1, 1, 3, 1).
        num_heads: heads per stage.
        window: window side ws (the paper: 8).
        patch_size: patch side (the paper: 4).
        image_size: the default input side (preprocessing, and N_GWG per stage).
        mlp_ratio: MLP width / C.
        drop_path: stochastic depth at the last block (linearly increasing from 0).
        no_global_window: the "w/o GW" ablation (no GWG / GLW-CA).
        no_shifted_window: the "w/o SLW" ablation (no SLW-MSA).
        pool: ``first`` or ``mean``.
        name: registry name (for :meth:`identity`).

    Raises:
        ConfigError: inconsistent widths, heads, depths or an unknown ``pool``.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (1, 1, 3, 1),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window: int = 8,
        patch_size: int = 4,
        image_size: int = 256,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        no_global_window: bool = False,
        no_shifted_window: bool = False,
        pool: Literal["first", "mean"] = "first",
        name: str = "gswin",
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        _check(name, embed_dim, depths, num_heads, window, patch_size, image_size, mlp_ratio, drop_path, pool)
        self.name = name
        self.image_size = image_size
        self.pool = pool
        self.window = window
        self.options = {
            "embed_dim": embed_dim, "depths": list(depths), "num_heads": list(num_heads), "window": window,
            "patch_size": patch_size, "mlp_ratio": mlp_ratio, "no_global_window": no_global_window,
            "no_shifted_window": no_shifted_window, "pool": pool,
        }  # fmt: skip
        self.weights = WeightsSource("random")
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList(
            build_stages(
                embed_dim, depths, num_heads, window, math.ceil(image_size / patch_size), mlp_ratio,
                drop_path, no_global_window, no_shifted_window,
            )
        )  # fmt: skip
        self.norm = nn.LayerNorm(dims[-1])
        self.num_features = self.token_dim = dims[-1]
        self.feature_info = [{"num_chs": d, "reduction": patch_size * 2**i} for i, d in enumerate(dims)]
        self.apply(_init_weights)

    def forward_maps(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The normalised final map (B, h', w', 8C) and the four stage outputs (NCHW)."""
        x = self.patch_embed(images)
        maps = []
        for stage in self.layers:
            x = stage(x)
            maps.append(x.permute(0, 3, 1, 2))
        return self.norm(x), maps

    def forward(self, images: Tensor) -> ImageOutput:
        """Encode (B, 3, H, W) images normalised with :attr:`mean`/:attr:`std`."""
        final, maps = self.forward_maps(images)
        tokens = final.flatten(1, 2)  # (B, h'w', 8C)
        pooled = tokens[:, 0] if self.pool == "first" else tokens.mean(1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageOutput(pooled=pooled, tokens=tokens, mask=mask, maps=maps)

    @torch.no_grad()
    def attention_maps(self, images: Tensor) -> Tensor:
        """Attention of the last Gswin block's LW-MSA (Fig. 7): (B, h', w') maps in [0, 1].

        Each token's value is the attention it receives inside its window, averaged over heads
        and queries (padded keys receive none), min-max normalised per image.
        """
        return last_block_attention(self.layers, lambda: self.forward_maps(images)[1])

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), **self.options, "weights": self.weights.as_dict()}


class GswinOnMap(nn.Module):
    """Gswin on a frozen CNN feature map: the map's cells are the tokens, in place of Eq. 1's patches.

    A CPU-sized reading of §III-B: a frozen, cacheable CNN (EfficientNet-Lite0: the 14×14 map of
    112 channels at stride 16, 224 px) does the early, local feature extraction that Gswin's first
    stages would learn from pixels, and the trainable Gswin stages run on top of it. The stem is
    Eq. 1 on the map's cells: LayerNorm over the input channels (the frozen channels' scales
    differ), a linear projection to C, LayerNorm. Then the Gswin stages (Eq. 2–6, LW-MSA, SLW-MSA,
    GWG and GLW-CA, :func:`build_stages`), with patch merging before each stage after the first
    (e.g. 14×14 → 7×7, window 7: N_GWG = 1, 0), and the final LayerNorm. ``pooled`` is the final
    map's first token (Eq. 3) or its mean, ``tokens`` the final map flattened (B, h'·w', C·2ⁿ⁻¹).

    ``global_attention`` gives every stage a single window over its whole map (no shift exists
    then): ViT-like global self-attention, the baseline row's image encoder with GW and SLW off.

    Args:
        in_chs: channels of the input map.
        map_size: the map's side at the configured input size (sets N_GWG per stage).
        embed_dim: C, the first stage's width.
        depths: Gswin blocks per stage.
        num_heads: heads per stage.
        window: window side ws.
        mlp_ratio: MLP width / C.
        drop_path: stochastic depth at the last block.
        no_global_window: the "w/o GW" ablation (no GWG / GLW-CA).
        no_shifted_window: the "w/o SLW" ablation (no SLW-MSA).
        global_attention: one window per stage over the whole map.
        pool: ``first`` (Eq. 3) or ``mean``.

    Raises:
        ConfigError: inconsistent widths, heads, depths or an unknown ``pool``.
    """

    def __init__(
        self,
        in_chs: int,
        map_size: int,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (1, 1),
        num_heads: tuple[int, ...] = (3, 6),
        window: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        no_global_window: bool = False,
        no_shifted_window: bool = False,
        global_attention: bool = False,
        pool: Literal["first", "mean"] = "first",
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        name = "model.gswin_kwargs"
        _check(name, embed_dim, depths, num_heads, window, 1, map_size, mlp_ratio, drop_path, pool)
        if in_chs < 1:
            raise ConfigError(f"{name}: the input map has {in_chs} channels")
        self.pool, self.window = pool, window
        sides = [map_size]
        for _ in depths[1:]:
            sides.append(math.ceil(sides[-1] / 2))
        windows = tuple(sides) if global_attention else window
        self.stem = nn.Sequential(nn.LayerNorm(in_chs), nn.Linear(in_chs, embed_dim), nn.LayerNorm(embed_dim))
        self.layers = nn.ModuleList(
            build_stages(
                embed_dim, depths, num_heads, windows, map_size, mlp_ratio, drop_path, no_global_window,
                no_shifted_window,
            )
        )  # fmt: skip
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.norm = nn.LayerNorm(dims[-1])
        self.num_features = self.token_dim = dims[-1]
        self.apply(_init_weights)

    def forward_maps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(B, C_in, H, W) map → the normalised final map (B, h', w', C') and the stage outputs (NCHW)."""
        x = self.stem(x.permute(0, 2, 3, 1))
        maps = []
        for stage in self.layers:
            x = stage(x)
            maps.append(x.permute(0, 3, 1, 2))
        return self.norm(x), maps

    def forward(self, x: Tensor) -> ImageOutput:
        """Encode a (B, C_in, H, W) feature map (any floating dtype; computed in the module's)."""
        final, maps = self.forward_maps(x.to(self.norm.weight.dtype))
        tokens = final.flatten(1, 2)  # (B, h'w', C')
        pooled = tokens[:, 0] if self.pool == "first" else tokens.mean(1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ImageOutput(pooled=pooled, tokens=tokens, mask=mask, maps=maps)

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> Tensor:
        """Fig. 7's attention of the last block over a (B, C_in, H, W) map: (B, h', w') in [0, 1]."""
        return last_block_attention(self.layers, lambda: self.forward_maps(x.to(self.norm.weight.dtype))[1])


def _check(
    name: str,
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window: int,
    patch_size: int,
    image_size: int,
    mlp_ratio: float,
    drop_path: float,
    pool: str,
) -> None:
    if pool not in ("first", "mean"):
        raise ConfigError(f"{name}: pool={pool!r}; allowed: 'first', 'mean'")
    if len(depths) != len(num_heads) or not depths or min(depths) < 1:
        raise ConfigError(
            f"{name}: depths={list(depths)} and num_heads={list(num_heads)} need one positive entry per stage"
        )
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if heads < 1 or dim % heads:
            raise ConfigError(f"{name}: stage {i + 1} width {dim} is not divisible by num_heads={heads}")
    for field, value in (("window", window), ("patch_size", patch_size), ("image_size", image_size)):
        if value < 1:
            raise ConfigError(f"{name}: {field}={value} must be >= 1")
    if mlp_ratio <= 0 or not 0 <= drop_path < 1:
        raise ConfigError(f"{name}: mlp_ratio={mlp_ratio} must be > 0 and drop_path={drop_path} in [0, 1)")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- Swin-T initialisation ----------------------------------------------------------------------------------
_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")


def swin_key_map(key: str) -> str | None:
    """The Gswin parameter a timm Swin key initialises (``None``: unused).

    Gswin block j of a stage holds Swin blocks 2j (W-MSA → LW-MSA: ``norm1``, ``attn``) and
    2j+1 (SW-MSA → SLW-MSA: ``shift_norm``, ``shift_attn``; its ``norm2``/``mlp`` → the block's
    MLP). The MLP of Swin block 2j has no counterpart. Patch embedding, merging and the final norm
    keep their names.
    """
    m = _SWIN_BLOCK.match(key)
    if m is None:
        return key if key.startswith(("patch_embed.", "norm.")) or ".downsample." in key else None
    stage, block, rest = int(m[1]), int(m[2]), m[3]
    j, odd = divmod(block, 2)
    prefix = f"layers.{stage}.blocks.{j}."
    if not odd:
        return prefix + rest if rest.startswith(("norm1.", "attn.")) else None
    if rest.startswith("norm1."):
        return prefix + "shift_norm." + rest.removeprefix("norm1.")
    if rest.startswith("attn."):
        return prefix + "shift_attn." + rest.removeprefix("attn.")
    return prefix + rest  # norm2., mlp.


def load_swin_weights(model: GswinEncoder, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy timm Swin weights into ``model`` where a mapped key exists with the same shape.

    Relative position bias tables of another window size (Swin-T's window 7 → Gswin's 8) are
    resampled with timm's ``resize_rel_pos_bias_table``, not left random.

    Args:
        model: the Gswin encoder.
        state: a timm ``swin_*`` state dict (e.g. ``swin_tiny_patch4_window7_224``).

    Returns:
        ``(loaded, skipped)`` Gswin / Swin key lists (unmatched keys and other shape mismatches
        are skipped).
    """
    from timm.layers import resize_rel_pos_bias_table

    own = model.state_dict()
    loaded, skipped, updates = [], [], {}
    for key, value in state.items():
        target = swin_key_map(key)
        resample = (
            target is not None and target.endswith("relative_position_bias_table") and target in own
            and own[target].shape != value.shape and value.shape[1:] == own[target].shape[1:]
        )  # fmt: skip
        if resample:  # another window size: resample the (2w−1)² table
            w = model.window
            value = resize_rel_pos_bias_table(value, (w, w), tuple(own[str(target)].shape))
        if target is not None and target in own and own[target].shape == value.shape:
            updates[target] = value
            loaded.append(target)
        else:
            skipped.append(key)
    model.load_state_dict(updates, strict=False)
    return loaded, skipped


#: the ImageNet Swin-T that ``gswin`` starts from by default (timm name and tag, on the HF hub)
SWIN_T = "swin_tiny_patch4_window7_224.ms_in1k"


def _swin_state(spec: EncoderSpec) -> tuple[dict[str, Tensor], WeightsSource]:
    """The Swin state dict named by ``gswin@…``: a local file, or a timm name (default Swin-T)."""
    weights = spec.weights or SWIN_T
    if is_path(weights):
        path = resolve_file(weights, spec.spec)
        return load_state_dict_file(Path(path)), WeightsSource("file", str(path), file_sha256_memo(path))
    swin = timm_pretrained(weights, spec.spec, "gswin@/path/to/swin_t.safetensors")
    return swin.state_dict(), WeightsSource("tag", weights)


def _create(spec: EncoderSpec, pretrained: bool, options: dict[str, Any]) -> GswinEncoder:
    model = GswinEncoder(**options, name=spec.name)
    if not pretrained:
        log_random_init(_logger, spec.name)
        return model
    if spec.name == "gswin-tiny" and spec.weights is None:  # no ImageNet weights exist at this width
        _logger.info("gswin-tiny: no pretrained weights exist at this size; trained from random init")
        return model
    state, source = _swin_state(spec)
    loaded, skipped = load_swin_weights(model, state)
    if not loaded:
        raise DataError(
            "no Swin weights match this Gswin's shapes (expected a timm swin_* state dict)", source.ref
        )
    _logger.info(
        "%s: %d tensors from Swin weights %s (%d skipped: name or shape mismatch)",
        spec.name, len(loaded), source.ref, len(skipped),
    )  # fmt: skip
    model.weights = source
    return model


@register_image_encoder("gswin")
def gswin(
    spec: EncoderSpec,
    pretrained: bool = True,
    embed_dim: int = 96,
    depths: tuple[int, ...] = (1, 1, 3, 1),
    num_heads: tuple[int, ...] = (3, 6, 12, 24),
    window: int = 8,
    image_size: int = 256,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.1,
    no_global_window: bool = False,
    no_shifted_window: bool = False,
    pool: Literal["first", "mean"] = "first",
) -> GswinEncoder:
    """Gswin with Swin-T widths (C = 96, heads 3/6/12/24), 256 px, initialised from ImageNet Swin-T:
    ``gswin`` loads timm's ``swin_tiny_patch4_window7_224.ms_in1k`` by name, ``gswin@<timm name>``
    another Swin, ``gswin@/path/swin_t.safetensors`` a local state dict (where shapes match;
    window-7 position tables resampled to window 8)."""
    opts = {k: v for k, v in locals().items() if k not in ("spec", "pretrained")}
    return _create(spec, pretrained, opts)


@register_image_encoder("gswin-tiny")
def gswin_tiny(
    spec: EncoderSpec,
    pretrained: bool = True,
    embed_dim: int = 32,
    depths: tuple[int, ...] = (1, 1, 3, 1),
    num_heads: tuple[int, ...] = (1, 2, 4, 8),
    window: int = 8,
    image_size: int = 128,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.0,
    no_global_window: bool = False,
    no_shifted_window: bool = False,
    pool: Literal["first", "mean"] = "first",
) -> GswinEncoder:
    """A CPU-sized Gswin: C = 32, heads 1/2/4/8, 128 px (maps 32/16/8/4), same depths and window."""
    opts = {k: v for k, v in locals().items() if k not in ("spec", "pretrained")}
    return _create(spec, pretrained, opts)
