"""Gswin (CMPAGL §III-B): windows, shifted-window mask, GWG, blocks, ablation switches, Swin init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsitr.errors import ConfigError, DataError, MissingDependencyError
from rsitr.models.encoders import create_image_encoder, list_image_encoders
from rsitr.models.encoders.gswin import (
    GlobalWindowGenerator,
    GswinBlock,
    shifted_window_mask,
    swin_key_map,
    window_partition,
    window_reverse,
)

TINY = {"embed_dim": 8, "num_heads": (1, 1, 2, 2), "image_size": 64, "window": 4}


def _tiny(**kw: object):
    torch.manual_seed(0)
    return create_image_encoder("gswin-tiny", pretrained=False, **{**TINY, **kw})


# --- windows -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "ws"), [(8, 8, 4), (16, 8, 8), (12, 20, 4), (7, 7, 7)])
def test_window_partition_and_reverse_are_exact_inverses(h: int, w: int, ws: int) -> None:
    x = torch.randn(3, h, w, 5)
    win = window_partition(x, ws)
    assert win.shape == (3 * (h // ws) * (w // ws), ws * ws, 5)
    assert torch.equal(window_reverse(win, ws, h, w), x)
    assert torch.equal(window_partition(window_reverse(win, ws, h, w), ws), win)
    # window 0 of image 0 is the top-left ws×ws block, row-major; image 1 starts after image 0's windows
    assert torch.equal(win[0], x[0, :ws, :ws].reshape(-1, 5))
    assert torch.equal(win[(h // ws) * (w // ws)], x[1, :ws, :ws].reshape(-1, 5))


def _original_coords(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, N, 2) image coordinates of the tokens of each window after rolling the map by -shift."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows, cols], -1).roll((-shift, -shift), (0, 1))  # (H, W, 2)
    return window_partition(coords[None], ws)


@pytest.mark.parametrize(("h", "w"), [(16, 16), (24, 16), (16, 32)])
def test_shifted_window_mask_blocks_exactly_the_wrapped_pairs(h: int, w: int) -> None:
    ws, shift = 8, 4
    blocked = shifted_window_mask(h, w, ws, shift)
    assert blocked.shape == ((h // ws) * (w // ws), ws * ws, ws * ws)
    rc = _original_coords(h, w, ws, shift)
    # Two tokens of one shifted window are real neighbours unless the roll wrapped one of them
    # around from the opposite border (then they lie a full window or more apart in the image).
    far = ((rc[:, :, None] - rc[:, None, :]).abs() >= ws).any(-1)
    assert torch.equal(blocked, far)
    assert blocked.any()  # the last row/column of windows mixes regions
    assert not blocked[0].any()  # the first window holds one contiguous region
    assert not shifted_window_mask(h, w, ws, 0).any()  # plain windows: nothing blocked


def test_mask_blocks_padding_keys_but_never_self() -> None:
    ws = 4
    blocked = shifted_window_mask(8, 8, ws, 0, valid=(6, 7))
    rc = _original_coords(8, 8, ws, 0)
    pad_key = (rc[..., 0] >= 6) | (rc[..., 1] >= 7)  # (nW, N)
    eye = torch.eye(ws * ws, dtype=torch.bool)
    assert torch.equal(blocked, pad_key[:, None, :].expand_as(blocked) & ~eye)
    assert not (blocked & eye).any()


def test_block_output_ignores_padding_content() -> None:
    torch.manual_seed(0)
    blk = GswinBlock(8, 2, window=4, gwg_layers=0).eval()
    x = torch.randn(1, 8, 8, 8)
    for shift in (0, 2):
        y = blk._window_attn(blk.attn, x, shift, valid=(6, 7))
        x2 = x.clone()
        x2[:, 6:] = torch.randn(1, 2, 8, 8)  # the padding region only
        x2[:, :, 7:] = torch.randn(1, 8, 1, 8)
        y2 = blk._window_attn(blk.attn, x2, shift, valid=(6, 7))
        assert torch.allclose(y[:, :6, :7], y2[:, :6, :7], atol=1e-6), shift


# --- global window generation -------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "layers"), [(64, 3), (32, 2), (16, 1), (8, 0), (4, 0), (56, 2)])
def test_gwg_output_is_one_window(side: int, layers: int) -> None:
    assert GlobalWindowGenerator.layers_for(side, 8) == layers
    gwg = GlobalWindowGenerator(6, 8, layers)
    assert len(gwg.layers) == layers
    assert gwg(torch.randn(2, 6, side, side)).shape == (2, 6, 8, 8)
    assert gwg(torch.randn(2, 6, side, side + 8)).shape == (2, 6, 8, 8)  # other sizes: still one window


def test_gwg_layer_halves_and_stacks_per_stage() -> None:
    enc = create_image_encoder("gswin", pretrained=False, embed_dim=12, num_heads=(1, 2, 4, 8))
    # the paper's 256 px input: stage maps 64/32/16/8 → N_GWG 3/2/1/0
    assert [len(stage.blocks[0].gwg.layers) for stage in enc.layers] == [3, 2, 1, 0]
    x = torch.randn(1, 12, 64, 64)
    layer = enc.layers[0].blocks[0].gwg.layers[0]
    assert layer(x).shape == (1, 12, 32, 32)


# --- the encoder ----------------------------------------------------------------------------------------


def test_registered_and_contract() -> None:
    assert {"gswin", "gswin-tiny"} <= set(list_image_encoders())
    enc = _tiny()
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.pooled.shape == (2, 64) and out.tokens.shape == (2, 4, 64)
    assert [m.shape[1:] for m in out.maps] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    assert [f["reduction"] for f in enc.feature_info] == [4, 8, 16, 32]
    assert torch.equal(out.pooled, out.tokens[:, 0])  # pool="first": the 0-th token (Eq. 3)
    assert enc.identity()["no_global_window"] is False and enc.identity()["weights"]["kind"] == "random"


def test_default_widths_are_swin_t_like() -> None:
    enc = create_image_encoder("gswin", pretrained=False)
    assert [f["num_chs"] for f in enc.feature_info] == [96, 192, 384, 768]
    assert [len(s.blocks) for s in enc.layers] == [1, 1, 3, 1]
    assert enc.layers[0].blocks[0].window == 8 and enc.patch_embed.patch == 4 and enc.image_size == 256


@pytest.mark.parametrize("size", [64, 50, 37])
def test_sizes_that_are_not_window_multiples(size: int) -> None:
    enc = _tiny()
    out = enc(torch.randn(1, 3, size, size))
    assert torch.isfinite(out.tokens).all()
    side = -(-size // 4)
    assert out.maps[0].shape[-2:] == (side, side)


def _grad_params(enc: torch.nn.Module) -> set[str]:
    enc.train()
    enc.zero_grad()
    g = torch.Generator().manual_seed(1)
    # not .sum(): the sum of a LayerNorm's outputs (unit weight) is constant, so its gradient is zero
    pooled = enc(torch.randn(2, 3, 64, 64, generator=g)).pooled
    (pooled * torch.randn(pooled.shape, generator=g)).sum().backward()
    return {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize(
    ("switch", "gone"),
    [("no_global_window", (".gwg.", ".cross_attn.")), ("no_shifted_window", (".shift_attn.",))],
)
def test_each_ablation_switch_changes_the_graph(switch: str, gone: tuple[str, ...]) -> None:
    full, ablated = _tiny(), _tiny(**{switch: True})
    used_full, used_ablated = _grad_params(full), _grad_params(ablated)
    assert any(any(g in n for g in gone) for n in used_full)
    assert not any(any(g in n for g in gone) for n in used_ablated)
    assert used_ablated < used_full
    # with the weights they share, the outputs differ
    ablated.load_state_dict(full.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    full.eval(), ablated.eval()
    assert not torch.allclose(full(x).pooled, ablated(x).pooled, atol=1e-4)
    assert ablated.identity()[switch] is True


def test_pool_switch_changes_the_output() -> None:
    a, b = _tiny(), _tiny(pool="mean")
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(a(x).pooled, b(x).pooled)
    assert torch.allclose(a(x).tokens, b(x).tokens)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pool": "max"}, "pool='max'"),
        ({"num_heads": (3, 1, 1, 1)}, "not divisible by num_heads=3"),
        ({"depths": (1, 1)}, "one positive entry per stage"),
        ({"window": 0}, "window=0"),
        ({"drop_path": 1.5}, "drop_path"),
    ],
)
def test_bad_options_raise_one_line_config_errors(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _tiny(**kw)


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown option 'no_global'"):
        create_image_encoder("gswin-tiny", no_global=True)


# --- Swin-T initialisation ------------------------------------------------------------------------------


def test_swin_key_map() -> None:
    assert swin_key_map("layers.2.blocks.4.attn.qkv.weight") == "layers.2.blocks.2.attn.qkv.weight"
    assert swin_key_map("layers.2.blocks.5.attn.proj.bias") == "layers.2.blocks.2.shift_attn.proj.bias"
    assert swin_key_map("layers.2.blocks.5.norm1.weight") == "layers.2.blocks.2.shift_norm.weight"
    assert swin_key_map("layers.0.blocks.1.mlp.fc1.weight") == "layers.0.blocks.0.mlp.fc1.weight"
    assert swin_key_map("layers.0.blocks.0.mlp.fc1.weight") is None  # W-MSA block's MLP: no counterpart
    assert swin_key_map("layers.1.downsample.reduction.weight") == "layers.1.downsample.reduction.weight"
    assert swin_key_map("head.fc.weight") is None


def test_init_from_a_random_timm_swin_t(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in swin.state_dict().items()}
    path = tmp_path / "swin_t.safetensors"
    save_file(state, str(path))
    enc = create_image_encoder(f"gswin@{path}")
    own = enc.state_dict()
    assert torch.equal(own["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    assert torch.equal(own["layers.2.blocks.1.attn.qkv.weight"], state["layers.2.blocks.2.attn.qkv.weight"])
    assert torch.equal(
        own["layers.2.blocks.1.shift_attn.qkv.weight"], state["layers.2.blocks.3.attn.qkv.weight"]
    )
    assert torch.equal(own["layers.3.blocks.0.mlp.fc2.weight"], state["layers.3.blocks.1.mlp.fc2.weight"])
    assert torch.equal(
        own["layers.1.downsample.reduction.weight"], state["layers.1.downsample.reduction.weight"]
    )
    assert torch.equal(own["norm.weight"], state["norm.weight"])
    assert enc.identity()["weights"]["kind"] == "file"
    # window 7 relative-position tables (13², heads) are resampled to window 8 (15², heads)
    from timm.layers import resize_rel_pos_bias_table

    src = state["layers.0.blocks.0.attn.relative_position_bias_table"]
    table = own["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert src.shape[0] == 13 * 13 and table.shape[0] == 15 * 15
    assert torch.allclose(table, resize_rel_pos_bias_table(src, (8, 8), tuple(table.shape)))
    assert torch.allclose(table.view(15, 15, -1)[7, 7], src.view(13, 13, -1)[6, 6], atol=1e-6)  # centre
    # pretrained=False ignores the file (checkpoint reload)
    assert create_image_encoder(f"gswin@{path}", pretrained=False).identity()["weights"]["kind"] == "random"
    with pytest.raises(DataError, match="no Swin weights match"):
        create_image_encoder(f"gswin-tiny@{path}")


def test_gswin_starts_from_imagenet_swin_t_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gswin`` names timm's ImageNet Swin-T; offline without it, building stops with one line."""
    import timm

    real, asked = timm.create_model, []
    torch.manual_seed(0)
    swin = real("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)

    def hub(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            asked.append(name)
            return swin
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", hub)
    enc = create_image_encoder("gswin")
    assert asked == ["swin_tiny_patch4_window7_224.ms_in1k"]
    assert enc.identity()["weights"] == {"kind": "tag", "ref": "swin_tiny_patch4_window7_224.ms_in1k"}
    assert torch.equal(
        enc.state_dict()["patch_embed.proj.weight"], swin.state_dict()["patch_embed.proj.weight"]
    )

    def offline(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("cannot reach the hub")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(MissingDependencyError, match="timm/swin_tiny_patch4_window7_224.ms_in1k") as err:
        create_image_encoder("gswin")
    assert "\n" not in str(err.value) and "pretrained: false" in str(err.value)


# --- attention maps (Fig. 7) -------------------------------------------------------------------------------


def test_kept_attention_gives_the_fused_result() -> None:
    torch.manual_seed(0)
    blk = GswinBlock(8, 2, window=4, gwg_layers=0).eval()
    x = torch.randn(1, 8, 8, 8)
    ref = blk._window_attn(blk.attn, x, 2, valid=(6, 7))
    blk.attn.keep_attention = True
    out = blk._window_attn(blk.attn, x, 2, valid=(6, 7))
    assert torch.allclose(out, ref, atol=1e-5)
    w = blk.attn.last_attention
    assert w.shape == (4, 2, 16, 16) and torch.allclose(w.sum(-1), torch.ones(4, 2, 16))


def test_attention_maps_of_the_last_block() -> None:
    enc = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = enc(x).pooled.clone()
    maps = enc.attention_maps(x)
    assert maps.shape == (2, 2, 2) and maps.min() >= 0 and maps.max() <= 1
    last = enc.layers[-1].blocks[-1].attn
    assert not last.keep_attention and last.last_attention is None  # switched back off
    with torch.no_grad():
        assert torch.equal(enc(x).pooled, before)  # the normal path is unaffected


# --- Gswin on a frozen CNN map (CMPAGL's CPU mode) -------------------------------------------------------------


def test_gswin_on_map_stages_and_outputs() -> None:
    from rsitr.models.encoders.gswin import GswinOnMap

    torch.manual_seed(0)
    m = GswinOnMap(112, 14, embed_dim=16, num_heads=(2, 4), window=7).eval()  # EfficientNet-Lite0's map
    blocks = [stage.blocks[0] for stage in m.layers]
    assert [len(b.gwg.layers) for b in blocks] == [1, 0]  # N_GWG: 14 → 7 in one layer; 7 is one window
    assert m.layers[0].downsample is None and m.layers[1].downsample is not None  # 14×14 → 7×7
    x = torch.randn(2, 112, 14, 14).half()  # as cached
    out = m(x)
    assert out.tokens.shape == (2, 49, 32) and out.pooled.dtype == torch.float32
    assert torch.equal(out.pooled, out.tokens[:, 0])  # Eq. 3: the first token
    assert [tuple(f.shape) for f in out.maps] == [(2, 16, 14, 14), (2, 32, 7, 7)]
    maps = m.attention_maps(x)
    assert maps.shape == (2, 7, 7) and maps.min() >= 0 and maps.max() <= 1
    vit = GswinOnMap(112, 14, embed_dim=16, num_heads=(2, 4), global_attention=True,
                     no_global_window=True, no_shifted_window=True)  # fmt: skip
    assert [stage.blocks[0].window for stage in vit.layers] == [14, 7]  # one window: global attention
    assert vit(x).tokens.shape == (2, 49, 32)


def test_gswin_on_map_bad_options_raise_one_line_config_errors() -> None:
    from rsitr.models.encoders.gswin import GswinOnMap

    with pytest.raises(ConfigError, match="stage 2 width 32 is not divisible by num_heads=3") as err:
        GswinOnMap(112, 14, embed_dim=16, num_heads=(2, 3))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="need one positive entry per stage"):
        GswinOnMap(112, 14, depths=(1, 1), num_heads=(3,))
