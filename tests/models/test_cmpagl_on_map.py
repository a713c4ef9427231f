"""CMPAGL with Gswin on a frozen CNN map and a cached text half (``gswin_on_map``): the cached path
equals the raw one, what trains and what does not, every preset, ITM/MLM, the fusion shortcuts
(packed tokens, queried rows, one projection per image), and one-line config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rsitr.errors import ConfigError
from rsitr.models import build_config, create_method
from rsitr.models.checkpoint import load_method, save_method
from rsitr.models.encoders.gswin import GswinOnMap, attention
from rsitr.models.methods.cmpagl import CMPAGL, PRESETS, FusionLayer, TokenLayout
from rsitr.retrieval.embed import _storage, text_features

#: tiny-cnn at 128 px: its stride-16 map (index 2) is 8×8 with 32 channels
TOWER = {"image_encoder": "tiny-cnn", "image_encoder_kwargs": {"width": 8, "image_size": 128}}
GSWIN = {"embed_dim": 8, "num_heads": [1, 2], "window": 4}  # 8×8 (4 windows, N_GWG 1) → 4×4 (one)
ON_MAP = {
    **TOWER, "gswin_on_map": True, "gswin_kwargs": GSWIN, "freeze_image": True, "freeze_text": True,
    "text_tune_layers": 1, "text_encoder_kwargs": {"max_length": 16}, "embed_dim": 16, "queue_size": 32,
}  # fmt: skip
CAPTIONS = [
    "three white planes beside a terminal",
    "a river with a bridge",
    "green farmland",
    "a dense forest with a long winding road through it",
]


@pytest.fixture
def make(tiny_bert_spec: str):
    """``make(**overrides)``: the on-map method over the tiny BERT (2 + 2 layers: 1 frozen, 1 tuned)."""

    def build(**kw: object) -> CMPAGL:
        torch.manual_seed(0)
        return create_method("cmpagl", {**ON_MAP, "text_encoder": tiny_bert_spec, **kw}, pretrained=False)

    return build


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def _cached_batch(m: CMPAGL, ids: tuple[int, ...] = (0, 1, 2, 3)) -> dict:
    """A batch as the trainer serves it from the cache: stored dtypes, captions padded to max_length."""
    with torch.no_grad():
        img = {k: _storage(m, v) for k, v in m.image_features(_images(len(ids))).items()}
    return {
        "image_feats": img,
        "text_feats": text_features(m, CAPTIONS[: len(ids)]),
        "image_id": torch.tensor(ids),
    }


def _total(out: dict) -> torch.Tensor:
    return sum(v for k, v in out.items() if k.endswith("_loss"))


# --- the cached path -----------------------------------------------------------------------------------------


def test_raw_inputs_and_cached_features_give_the_same_embeddings(make) -> None:
    m = make().eval()
    assert m.cacheable and isinstance(m.gswin, GswinOnMap)
    imgs, tok = _images(), m.tokenize(CAPTIONS)
    feats = m.image_features(imgs)
    assert list(feats) == ["map"] and feats["map"].shape == (4, 32, 8, 8)  # the frozen map only
    raw = m.encode_image(imgs)
    assert torch.equal(m.encode_image(feats=feats), raw)  # the same function of the same map
    cached = m.encode_image(feats={k: _storage(m, v) for k, v in feats.items()})
    assert _storage(m, feats["map"]).dtype == torch.float16
    assert torch.allclose(cached, raw, atol=2e-3)  # fp16 storage only
    txt = text_features(m, CAPTIONS)  # trimmed per length-sorted batch, padded back, fp16 states
    assert txt["tokens"].dtype == torch.float16 and txt["tokens"].shape[1] == 16
    assert set(txt) == {"tokens", "input_ids", "attention_mask"}  # G_i comes from the tuned layer
    raw_txt = m.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(m.encode_text(feats=txt), raw_txt, atol=2e-3)
    # the padding columns (the cache pads to max_length) do not change anything
    short = {k: v[:, :12] for k, v in txt.items()}
    assert torch.allclose(m.encode_text(feats=short), m.encode_text(feats=txt), atol=1e-6)
    assert m.image_cache_identity() == {"map_index": 2}
    # the pooling runs after the tuned layer: the cached states do not depend on it
    assert m.text_cache_identity() == {"text_layers": 2, "text_tune_layers": 1}


def test_a_training_step_on_cached_features_trains_only_the_trainable_parts(make) -> None:
    m = make()
    m.train()
    out = m(_cached_batch(m))
    assert {k for k in out if k.endswith("_loss")} == {"itc_loss", "triplet_loss", "itm_loss", "mlm_loss"}
    assert all(torch.isfinite(v) for v in out.values())
    _total(out).backward()
    frozen = [*m.image_encoder.parameters(), *m.text_encoder.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    for part in (m.gswin, m.text_top, m.image_proj, m.text_proj, m.fusion, m.itm_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert len(m.text_encoder.layers) == 1 and len(m.text_top) == 1 and len(m.fusion) == 2
    # the momentum encoders copy only what trains: the Gswin on the map, the tuned layer, the projections
    parts = {n.split(".")[0] for n in m.momentum.names}
    assert parts == {"gswin", "text_top", "image_proj", "text_proj"}
    groups = {k: {id(p) for p in v} for k, v in m.param_groups().items()}
    assert all(id(p) in groups["backbone"] for p in m.text_top.parameters())  # pretrained
    assert all(id(p) in groups["head"] for p in m.gswin.parameters())  # new
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    i = m.momentum.names.index("gswin.stem.1.weight")
    teacher = getattr(m.momentum, f"p{i}").clone()
    opt.step()
    m.on_step_end()
    expected = 0.995 * teacher + 0.005 * m.gswin.stem[1].weight.detach()
    assert torch.allclose(getattr(m.momentum, f"p{i}"), expected, atol=1e-7)


def test_momentum_embeddings_run_the_momentum_gswin_on_the_shared_map(make) -> None:
    m = make()
    m.train()
    b = _cached_batch(m)
    with torch.no_grad():
        for p in m.gswin.parameters():
            p.add_(0.1)  # the student moves away from its momentum copy
    m.eval()
    img_m, txt_m = m.momentum_embeddings(b, b["image_feats"], b["text_feats"])
    assert not img_m.requires_grad
    student = m.encode_image(feats=b["image_feats"])
    assert not torch.allclose(img_m, student, atol=1e-3)  # the momentum weights, not the student's
    assert torch.allclose(txt_m, m.encode_text(feats=b["text_feats"]), atol=1e-6)  # text copy unchanged


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_steps_on_the_map(make, preset: str) -> None:
    m = make(preset=preset, mlm_probability=0.5)  # some tokens masked in 4 short captions
    m.train()
    blocks = [blk for stage in m.gswin.layers for blk in stage.blocks]
    assert (blocks[0].cross_attn is None) == (preset in ("no-gw", "baseline"))  # GWG + GLW-CA
    assert (blocks[0].shift_attn is None) == (preset in ("no-slw", "baseline"))  # SLW-MSA
    assert [blk.window for blk in blocks] == ([8, 4] if preset == "baseline" else [4, 4])  # global
    assert (len(m.image_fusion) == 1) == (preset == "std-mi")
    out = m(_cached_batch(m))
    cfg = m.cfg
    terms = {k for k in ("itc", "triplet", "itm", "mlm") if getattr(cfg, f"{k}_weight") > 0}
    assert {k.removesuffix("_loss") for k in out if k.endswith("_loss")} == terms
    _total(out).backward()
    assert m.gswin.stem[1].weight.grad is not None and m.fusion[0].cross_attn.key.weight.grad is not None
    assert all(p.grad is None for p in m.image_encoder.parameters())


def test_presets_put_their_gswin_switches_where_gswin_runs() -> None:
    on_map = build_config("cmpagl", {"preset": "no-gw", "gswin_on_map": True, "gswin_kwargs": {"window": 7}})
    assert (
        on_map.gswin_kwargs == {"no_global_window": True, "window": 7} and on_map.image_encoder_kwargs == {}
    )
    base = build_config("cmpagl", {"preset": "baseline", "gswin_on_map": True})
    assert base.gswin_kwargs == {
        "global_attention": True,
        "no_global_window": True,
        "no_shifted_window": True,
    }
    pixels = build_config("cmpagl", {"preset": "no-slw"})  # Gswin on pixels: as before
    assert pixels.image_encoder_kwargs == {"no_shifted_window": True} and pixels.gswin_kwargs == {}
    assert build_config("cmpagl", {"preset": "baseline"}).image_encoder_kwargs == {}


# --- ITM and MLM ---------------------------------------------------------------------------------------------


def test_itm_and_mlm_run_and_fusion_pairs_limits_them(make, monkeypatch: pytest.MonkeyPatch) -> None:
    m = make(mlm_probability=0.5)
    b = _cached_batch(m)
    _, img_tok = m.image_states(b["image_feats"])
    img, _ = m.image_states(b["image_feats"])
    pooled, txt_tok, txt_mask = m.text_states(b["text_feats"])
    assert txt_mask.shape[1] == int(b["text_feats"]["attention_mask"].sum(1).max())  # trimmed
    img_e, txt_e = F.normalize(m.image_proj(img), dim=-1), F.normalize(m.text_proj(pooled), dim=-1)
    seen: dict[str, list[int]] = {"pairs": [], "masked": []}
    fused, head = m.fused_pair, m.mlm_head.forward
    monkeypatch.setattr(m, "fused_pair", lambda *a: seen["pairs"].append(a[3].numel()) or fused(*a))
    monkeypatch.setattr(m.mlm_head, "forward", lambda h: seen["masked"].append(h.shape[0]) or head(h))
    ids, scale = torch.arange(4), torch.tensor(10.0)
    assert torch.isfinite(m.itm_loss(img_e, txt_e, ids, img_tok, txt_tok, txt_mask, scale))
    torch.manual_seed(0)
    assert torch.isfinite(m.mlm_loss({"tokens": img_tok}, b["text_feats"]))
    assert seen["pairs"] == [12] and 0 < seen["masked"][0] < int(txt_mask.sum())  # 3B pairs; masked rows
    small = make(mlm_probability=0.5, fusion_pairs=2)
    small.load_state_dict(m.state_dict())
    monkeypatch.setattr(small, "fused_pair", lambda *a: seen["pairs"].append(a[3].numel()) or fused(*a))
    small.itm_loss(img_e, txt_e, ids, img_tok, txt_tok, txt_mask, scale)
    assert seen["pairs"][-1] == 6  # 2 anchors, their 2 + 2 hard negatives
    monkeypatch.setattr(small.mlm_head, "forward", lambda h: seen["masked"].append(h.shape[0]) or head(h))
    torch.manual_seed(0)
    small.mlm_loss({"tokens": img_tok}, b["text_feats"])
    first_two = b["text_feats"]["attention_mask"][:2].sum()
    assert 0 < seen["masked"][-1] < first_two  # only the first two captions are masked


def test_itm_rescore_and_attention_maps_on_the_map(make) -> None:
    m = make().eval()
    imgs = _images(3)
    img = m.image_features(imgs)
    txt = text_features(m, CAPTIONS)
    scores = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    i2t, t2i = m.itm_rescore(scores, img, txt, k=2, batch_size=5)
    j = int(scores[0].argmax())
    with torch.no_grad():
        _, img_tok = m.image_states({"map": img["map"][:1]})
        _, tok, mask = m.text_states({k: v[j : j + 1] for k, v in txt.items()})
        p = m.itm_head(m.fused_pair(img_tok, tok, mask)).softmax(-1)[0, 1]
    assert i2t[0, j].item() == pytest.approx(p.item(), abs=1e-4) and t2i.shape == (3, 4)
    maps = m.attention_maps(imgs)
    assert maps.shape == (3, 4, 4) and maps.min() >= 0 and maps.max() <= 1  # the last block: 4×4


def test_checkpoint_round_trip_on_the_map(make, tmp_path: Path) -> None:
    m = make().eval()
    feats = m.image_features(_images())
    path = save_method(m, tmp_path / "model.safetensors")
    m2 = load_method(path)
    assert isinstance(m2, CMPAGL) and m2.gswin is not None and m2.text_top is not None
    assert torch.allclose(m2.encode_image(feats=feats), m.encode_image(feats=feats), atol=1e-6)
    tok = m.tokenize(CAPTIONS)
    ref = m.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(m2.encode_text(tok["input_ids"], tok["attention_mask"]), ref, atol=1e-6)


def test_bf16_autocast_in_training_only(make) -> None:
    no_drop = {**GSWIN, "drop_path": 0.0}  # training mode without randomness
    ref, m = make(gswin_kwargs=no_drop).eval(), make(bf16=True, gswin_kwargs=no_drop).eval()
    b = _cached_batch(m)
    assert torch.equal(m.encode_image(feats=b["image_feats"]), ref.encode_image(feats=b["image_feats"]))
    m.train()
    pooled, tokens = m.image_states(b["image_feats"])
    with torch.no_grad():
        fp32 = ref.train().image_states(b["image_feats"])[0]
    assert pooled.dtype == torch.float32 and not torch.equal(pooled, fp32)  # computed in bf16 …
    assert torch.allclose(pooled, fp32, atol=0.1)  # … to about bf16's precision
    out = m(b)
    _total(out).backward()
    assert all(torch.isfinite(v) for v in out.values()) and m.gswin.stem[1].weight.grad is not None


# --- the fusion shortcuts: the same numbers as the plain computation ----------------------------------------


def _plain_layer(
    layer: FusionLayer, x: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor | None
) -> torch.Tensor:
    """The layer written out on padded (B, L, D) tokens, every position queried, one context per row."""

    def mha(att, q_in: torch.Tensor, kv: torch.Tensor, kmask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = att.split(att.query(q_in)), att.split(att.key(kv)), att.split(att.value(kv))
        s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if kmask is not None:
            s = s.masked_fill(~kmask[:, None, None, :], float("-inf"))
        return att.out((s.softmax(-1) @ v).transpose(1, 2).flatten(2))

    x = layer.self_norm(x + mha(layer.self_attn, x, x, mask))
    if ctx is not None:
        x = layer.cross_norm(x + mha(layer.cross_attn, x, ctx, None))
    return layer.ffn_norm(x + layer.ffn_out(layer.act(layer.ffn_in(x))))


def test_packed_rows_and_shared_contexts_match_the_plain_layer() -> None:
    torch.manual_seed(0)
    layer = FusionLayer(16, 4, 32, 12, torch.nn.GELU(), dropout=0.0, attn_dropout=0.0).eval()
    x, ctx = torch.randn(5, 7, 16), torch.randn(3, 6, 12)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 2, 5, 1, 4])[:, None]
    index = torch.tensor([2, 0, 0, 1, 2])  # the context (image) of each sequence
    ref = _plain_layer(layer, x, mask, ctx[index])
    lay = TokenLayout.of(mask)
    with torch.no_grad():
        out = lay.pad(layer(lay.pack(x), lay, ctx, ctx_index=index))
        assert torch.allclose(out[mask], ref[mask], atol=1e-5) and (out[~mask] == 0).all()
        flat = torch.tensor([0, 7, 16, 21, 30])  # some valid positions b·L + t
        rows = layer(lay.pack(x), lay, ctx, ctx_index=index, rows=lay.rows(flat))
    assert torch.allclose(rows, ref.flatten(0, 1)[flat], atol=1e-5)


def test_a_plain_layer_equals_the_bert_layer_it_copies() -> None:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_attention_heads=4, intermediate_size=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    bert = BertLayer(cfg).eval()
    mine = FusionLayer(16, 4, 32, None, torch.nn.GELU(), 0.0, 0.0, cfg.layer_norm_eps).eval()
    mine.load_bert_layer(bert)
    x = torch.randn(3, 6, 16)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1])[:, None]
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = bert(x, attention_mask=ext)
        ref = ref[0] if isinstance(ref, tuple) else ref
        lay = TokenLayout.of(mask)
        out = lay.pad(mine(lay.pack(x), lay))
    assert torch.allclose(out[mask], ref[mask], atol=1e-5)


def test_fused_pairs_by_index_equal_the_gathered_pairs(make) -> None:
    for kw in ({}, {"preset": "std-mi", "text_tune_layers": 0, "text_layers": 1}):
        m = make(**kw).eval()
        b = _cached_batch(m)
        with torch.no_grad():
            _, img_tok = m.image_states(b["image_feats"])
            _, tok, mask = m.text_states(b["text_feats"])
            ii, tt = torch.tensor([0, 3, 1, 1, 2]), torch.tensor([2, 2, 0, 3, 1])
            by_index = m.fused_pair(img_tok, tok, mask, ii, tt)
            gathered = m.fused_pair(img_tok[ii], tok[tt], mask[tt])
            full = m.fuse(img_tok[ii], tok[tt], mask[tt])  # every position of the text stream
        assert torch.allclose(by_index, gathered, atol=1e-5)
        assert torch.allclose(by_index[:, : full.shape[-1]], full[:, 0], atol=1e-5)  # the [CLS] row


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_bf16_cpu_attention_is_the_same_formula(mask_kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    mask = {"none": None, "bool": torch.rand(3, 1, 5, 5, generator=g) > 0.3, "float": torch.randn(1, 2, 5, 5)}
    m = mask[mask_kind]
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True  # every query keeps a key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=m)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=5e-2)
    assert torch.equal(attention(q, k, v, attn_mask=m), ref)  # fp32: the fused kernel itself


# --- configuration errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"gswin_kwargs": {"window": 7}}, "model.gswin_kwargs needs model.gswin_on_map: true"),
        ({"gswin_on_map": "yes"}, "model.gswin_on_map must be true or false"),
        ({"text_tune_layers": 1}, "model.text_tune_layers needs model.freeze_text: true"),
        ({"text_tune_layers": -1}, "model.text_tune_layers must be >= 0"),
        ({"fusion_pairs": -2}, "model.fusion_pairs must be >= 0"),
        ({"map_index": -1}, "model.map_index must be >= 0"),
    ],
)
def test_bad_config_values_raise_one_line_errors(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_config("cmpagl", kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"gswin_kwargs": {**GSWIN, "heads": 2}},
            "model.gswin_kwargs: unknown option 'heads'; known: embed_dim",
        ),
        ({"gswin_kwargs": {**GSWIN, "pool": "max"}}, "model.gswin_kwargs: pool='max'"),
        ({"gswin_kwargs": {**GSWIN, "num_heads": [3, 2]}}, "stage 1 width 8 is not divisible by num_heads=3"),
        (
            {"map_index": 4},
            r"model.map_index: 4 is not within 0..3 for tiny-cnn \(its maps: 0: 8 ch at stride 4",
        ),
        (
            {"text_tune_layers": 2},
            r"model.text_tune_layers: 2 is not within 1..1 \(the text half has 2 layers",
        ),
    ],
)
def test_bad_on_map_options_raise_one_line_errors(make, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        make(**kw)
    assert "\n" not in str(err.value)


def test_global_head_adds_the_strong_base_branch_and_trains_with_the_momentum_copy(make) -> None:
    m = make(global_head=True).eval()
    feats = m.image_features(_images())
    assert set(feats) == {"map", "pooled"}
    assert m.image_cache_identity() == {"map_index": 2, "pooled": True}
    assert make().image_cache_identity() == {"map_index": 2}
    with torch.no_grad():
        both = m.encode_image(feats=feats)
        assert torch.allclose(both, m.encode_image(_images()), atol=1e-5)
        gswin_only = m.image_proj(m.image_states(feats)[0])
        assert not torch.allclose(both, F.normalize(gswin_only, dim=-1), atol=1e-3)  # it contributes
        ref = F.normalize(gswin_only + m.global_head(feats["pooled"]), dim=-1)
        assert torch.allclose(both, ref, atol=1e-5)
    assert any(n.startswith("global_head.") for n in m.momentum.names)  # a momentum-encoder part
    m.train()
    before = [p.detach().clone() for p in m.global_head.parameters()]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    _total(m(_cached_batch(m))).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, m.global_head.parameters(), strict=True))
    with pytest.raises(ConfigError, match="global_head"):
        build_config("cmpagl", {"global_head": True})


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_cpu(make, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    m = make(bf16="auto").train()
    with m._autocast():
        assert torch.is_autocast_enabled("cpu") is native
