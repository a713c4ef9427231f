"""Partial fine-tuning of ``dual``'s text tower from a cached prefix (``model.text_tune_layers``),
and EfficientNet-Lite0 in bfloat16 (``precision: bf16``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsitr.errors import ConfigError
from rsitr.models import create_method
from rsitr.models.checkpoint import load_method, save_method
from rsitr.models.encoders import create_image_encoder, create_text_encoder

CAPTIONS = ["many planes are parked beside a terminal", "a river", "green trees surround a white building"]


def _dual(spec: str, k: int, **kw: object) -> torch.nn.Module:
    pool = {"pool": "mean"} if spec.startswith("hf:") else {}
    cfg = {"image_encoder": "tiny-cnn", "text_encoder": spec, "text_encoder_kwargs": pool,
           "embed_dim": 16, "head": "linear", "text_tune_layers": k, "tune_autocast": False, **kw}  # fmt: skip
    torch.manual_seed(0)
    return create_method("dual", cfg, pretrained=True)


def test_prefix_then_top_layers_is_the_whole_tower(tiny_bert_spec: str) -> None:
    """Split at any k, the cached prefix's states through the moved top layers give the unsplit
    tower's pooled output, and the trimmed, fp16-stored cache gives the raw-text embedding."""
    whole = create_text_encoder(tiny_bert_spec, pool="mean").eval()
    tok = whole.tokenize(CAPTIONS)
    ref = whole(**tok).pooled
    for k in (1, 2, 3):
        m = _dual(tiny_bert_spec, k).eval()
        assert len(m.text_encoder.layers) == 4 - k and len(m.text_top) == k
        feats = m.text_features(**tok)
        assert set(feats) == {"tokens", "mask"} and feats["mask"].dtype == torch.uint8
        with torch.no_grad():
            got = m._top_layers(feats["tokens"], feats["mask"].bool())
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        n = int(tok["attention_mask"].sum(1).max())  # as the cache stores it: trimmed, then fp16
        cached = {"tokens": feats["tokens"][:, :n].half(), "mask": feats["mask"][:, :n]}
        torch.testing.assert_close(m.encode_text(feats=cached), m.encode_text(**tok), atol=2e-3, rtol=0)


def test_only_the_top_layers_and_heads_learn(tiny_bert_spec: str) -> None:
    m = _dual(tiny_bert_spec, 1, freeze_text=True, freeze_image=True).train()
    groups = m.param_groups()
    top = {id(p) for p in m.text_top.parameters()}
    assert top and top == {id(p) for p in groups["backbone"]}  # optim.backbone_lr
    assert not top & {id(p) for p in groups["head"]}
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    assert m.cacheable  # the towers that feed the cache are still frozen
    tok = m.tokenize(CAPTIONS)
    batch = {"image": torch.randn(3, 3, 64, 64), **tok, "image_id": torch.arange(3)}
    m(batch)["infonce_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.text_top.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in m.text_encoder.parameters())


def test_cache_keys_separate_the_towers(tiny_bert_spec: str) -> None:
    """Tuning text layers changes the text cache's key but not the image cache's, so the image
    features of a frozen-tower run are reused."""
    plain, tuned = _dual(tiny_bert_spec, 0), _dual(tiny_bert_spec, 2)
    assert plain.image_cache_identity() == tuned.image_cache_identity() == {}
    assert plain.text_cache_identity() == {} and tuned.text_cache_identity() == {"text_tune_layers": 2}


def test_bad_tune_settings_are_one_line_config_errors(tiny_bert_spec: str) -> None:
    for k, spec, needle in ((4, tiny_bert_spec, "not within 1..3"), (-1, tiny_bert_spec, ">= 0"),
                            (1, "tiny-text", "BERT-like")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle) as err:
            _dual(spec, k)
        assert "\n" not in str(err.value)


def test_tuned_checkpoint_round_trip(tiny_bert_spec: str, tmp_path: Path) -> None:
    m = _dual(tiny_bert_spec, 2).eval()
    with torch.no_grad():
        for p in m.text_top.parameters():
            p.add_(0.05 * torch.randn_like(p))
    back = load_method(save_method(m, tmp_path / "model.safetensors"))
    tok = m.tokenize(CAPTIONS)
    assert len(back.text_encoder.layers) == 2
    assert torch.equal(m.encode_text(**tok), back.encode_text(**tok))


def test_efficientnet_bf16_is_float32_out_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    fp32 = create_image_encoder("efficientnet-lite0", pretrained=False, pool="multi").eval()
    bf16 = create_image_encoder("efficientnet-lite0", pretrained=False, pool="multi", precision="bf16").eval()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = fp32(x).pooled, bf16(x).pooled
    assert b.dtype == torch.float32
    assert ((a - b).norm() / a.norm()) < 0.05
    assert "precision" not in fp32.identity() and bf16.identity()["precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        create_image_encoder("efficientnet-lite0", pretrained=False, precision="fp8")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lite0_prefix_then_top_is_the_whole_tower(k: int) -> None:
    """Split at any k, the cached prefix (map + pooled stages) through the moved units gives the
    unsplit tower's multi-pooled vector; the split moves parameters, it does not copy them."""
    torch.manual_seed(0)
    whole = create_image_encoder("efficientnet-lite0", pretrained=False, pool="multi").eval()
    m = create_method("dual", {"image_encoder": "efficientnet-lite0", "image_encoder_kwargs": {"pool": "multi"},
                               "text_encoder": "tiny-text", "image_tune_stages": k, "head": "linear",
                               "freeze_image": True}, pretrained=False).eval()  # fmt: skip
    n_whole = sum(p.numel() for p in whole.parameters())
    n_split = sum(p.numel() for p in m.image_encoder.parameters()) + sum(
        p.numel() for p in m.image_top.parameters()
    )
    assert n_split == n_whole
    state = whole.state_dict()
    m.image_encoder.load_state_dict({k2: v for k2, v in state.items() if k2 in m.image_encoder.state_dict()})
    top_keys = m.image_top.state_dict().keys()
    assert len(top_keys) + len(m.image_encoder.state_dict()) == len(state)
    m.image_top.load_state_dict(dict(zip(top_keys, [state[k2] for k2 in state if k2 not in m.image_encoder.state_dict()],
                                         strict=True)))  # fmt: skip
    x = torch.randn(2, 3, 224, 224)
    feats = m.image_features(x)
    assert feats["map"].shape[1] == (320, 192, 112)[k - 1]
    with torch.no_grad():
        # up to float rounding: the frozen prefix runs with its BatchNorms folded
        torch.testing.assert_close(m.image_top(feats), whole(x).pooled, atol=1e-4, rtol=1e-4)
    assert m.image_cache_identity() == {"image_tune_stages": k} and m.cache_dtype == torch.float16
    assert m.text_cache_dtype == torch.float32  # the text cache is the untuned runs' one
    assert {id(p) for p in m.image_top.parameters()} <= {id(p) for p in m.param_groups()["backbone"]}
    assert all(p.requires_grad for p in m.image_top.parameters())
    assert not any(p.requires_grad for p in m.image_encoder.parameters())


def test_bad_image_tune_settings() -> None:
    for k, spec, needle in ((4, "efficientnet-lite0", "within 1..3"), (1, "tiny-cnn", "efficientnet-lite0")):
        with pytest.raises(ConfigError, match=needle) as err:
            create_method("dual", {"image_encoder": spec, "text_encoder": "tiny-text", "image_tune_stages": k},
                          pretrained=False)  # fmt: skip
        assert "\n" not in str(err.value)


def test_text_multi_pool_concatenates_every_layers_masked_mean(tiny_bert_spec: str) -> None:
    from transformers import BertModel

    enc = create_text_encoder(tiny_bert_spec, pool="multi").eval()
    tok = enc.tokenize(CAPTIONS)
    ref = BertModel.from_pretrained(tiny_bert_spec[3:]).eval()
    with torch.no_grad():
        states = ref(**tok, output_hidden_states=True).hidden_states[1:]
        got = enc(**tok).pooled
    m = tok["attention_mask"].unsqueeze(-1).float()
    want = torch.cat([(h * m).sum(1) / m.sum(1) for h in states], dim=-1)
    assert enc.num_features == 4 * 32 == got.shape[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="not 'multi'"):
        _dual(tiny_bert_spec, 1, text_encoder_kwargs={"pool": "multi"})


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    # An AVX2-only CPU emulates bf16 (slower than fp32): `auto` must pick fp32 there, and the
    # resolved precision, not "auto", is what the feature cache is keyed by.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    enc = create_image_encoder("efficientnet-lite0", pretrained=False, precision="auto")
    assert enc.precision == ("bf16" if native else "fp32")
    assert enc.identity().get("precision", "fp32") == enc.precision
