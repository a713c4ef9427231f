"""RDB: adapters (VEA/TSA/shared), insertion into towers, DTCL pieces, presets."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from rsitr.errors import ConfigError
from rsitr.losses.weighting import LossWeighting
from rsitr.models import create_method
from rsitr.models.adapters import (
    DifferentialAttention,
    HierarchicalAttention,
    SharedInteraction,
    lambda_init_schedule,
)
from rsitr.models.ema import MeanTeacher
from rsitr.models.methods.rdb import PRESETS

_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
        "patch_size": 16}, "text_cfg": _TEXT}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised tiny open_clip ViT saved to disk; its ``clip:`` spec."""
    d = tmp_path_factory.mktemp("clip")
    (d / "tiny.json").write_text(json.dumps(_VIT))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**_VIT).state_dict(), d / "tiny.pt")
    return f"clip:{d / 'tiny.json'}@{d / 'tiny.pt'}"


def _clip_rdb(spec: str, **kw: object):
    cfg = {"image_encoder": spec, "text_encoder": spec, "bottleneck": 16, "heads": 2, "shared_heads": 2,
           "num_classes": 3, **kw}  # fmt: skip
    return create_method("rdb", cfg)


def _offline_rdb(**kw: object):
    cfg = {"image_layers": 1, "text_layers": 1, "num_classes": 3, "bottleneck": 32, "heads": 2, **kw}
    return create_method("rdb", cfg, pretrained=False)


# --- the modules --------------------------------------------------------------------------------


def test_lambda_init_schedule() -> None:
    assert lambda_init_schedule(1) == pytest.approx(0.2)
    assert lambda_init_schedule(12) == pytest.approx(0.8 - 0.6 * torch.exp(torch.tensor(-3.3)).item())


def test_differential_attention_with_zero_lambda_is_standard_attention() -> None:
    torch.manual_seed(0)
    da = DifferentialAttention(32, heads=2, lambda_init=0.0)
    for p in (da.lambda_q1, da.lambda_k1, da.lambda_q2, da.lambda_k2):
        torch.nn.init.zeros_(p)  # λ = e⁰ − e⁰ + 0 = 0
    assert float(da.lam().detach()) == 0.0
    x = torch.randn(3, 7, 32)
    q = da.q(x).view(3, 7, 4, 8).transpose(1, 2)[:, 0::2]  # the first sub-head of each head
    k = da.k(x).view(3, 7, 4, 8).transpose(1, 2)[:, 0::2]
    v = da.v(x).view(3, 7, 2, 16).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v)  # softmax(Q1 K1ᵀ/√d_h) V
    ref = da.head_norm(ref).transpose(1, 2).reshape(3, 7, 32)
    assert torch.allclose(da.attend(x), ref, atol=1e-5)
    # and λ ≠ 0 changes the output (the second map is subtracted)
    torch.nn.init.constant_(da.lambda_q1, 0.5)
    torch.nn.init.constant_(da.lambda_k1, 0.5)
    assert not torch.allclose(da.attend(x), ref, atol=1e-3)


def test_differential_attention_masks_padding() -> None:
    torch.manual_seed(0)
    da = DifferentialAttention(16, heads=2)
    x = torch.randn(1, 5, 16)
    mask = torch.tensor([[True, True, True, False, False]])
    y = da(x, mask)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 2, 16)  # change the padded tokens only
    assert torch.allclose(da(x2, mask)[:, :3], y[:, :3], atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["full", "simple"])
def test_tsa_ignores_appended_padding(causal: bool, mode: str) -> None:
    torch.manual_seed(0)
    ha = HierarchicalAttention(16, heads=2, causal=causal, mode=mode)
    with torch.no_grad():
        ha.omega.copy_(torch.tensor([0.3, -0.2, 0.5]))
    z = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y = ha(z, mask)
    z_pad = torch.cat([z, torch.randn(2, 4, 16)], 1)  # four more pad tokens with arbitrary values
    m_pad = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    y_pad = ha(z_pad, m_pad)
    assert torch.allclose(y_pad[0, :4], y[0, :4], atol=1e-6)
    assert torch.allclose(y_pad[1, :6], y[1, :6], atol=1e-6)


def test_tsa_levels_each_contribute() -> None:
    torch.manual_seed(0)
    ha = HierarchicalAttention(16, heads=2)
    z = torch.randn(1, 5, 16)
    base = ha(z)
    with torch.no_grad():
        ha.phrase.weight.add_(1.0)  # the phrase level changes the output
    assert not torch.allclose(ha(z), base)


def test_shared_interaction_is_identity_at_init_and_shares_weights() -> None:
    s = SharedInteraction(32, heads=4)
    z = torch.randn(2, 5, 32)
    assert torch.equal(s(z), z)
    m = _offline_rdb()
    assert len(m.shared) == 1
    img_ad = m.image_tower.insertions[0].adapter
    txt_ad = m.text_tower.insertions[0].adapter
    assert img_ad.shared[0] is txt_ad.shared[0] is m.shared[0]
    assert _offline_rdb(shared=False).shared.__len__() == 0


# --- insertion into towers ------------------------------------------------------------------------


def test_fresh_adapters_reproduce_frozen_offline_embeddings() -> None:
    torch.manual_seed(0)
    m = _offline_rdb(image_encoder_kwargs={"pool": "multi"}).eval()
    x = torch.randn(2, 3, 96, 96)
    tok = m.tokenize(["two planes beside a terminal", "a river"])
    with torch.no_grad():
        # equal up to float rounding: the frozen encoder's own pass folds its BatchNorms
        torch.testing.assert_close(m.image_tower(x), m.image_encoder(x).pooled, rtol=1e-5, atol=1e-5)
        assert torch.equal(
            m.text_tower(tok["input_ids"], tok["attention_mask"]), m.text_encoder(**tok).pooled
        )


def test_head_site_pools_the_adapted_head_map_exactly() -> None:
    """One VEA on the head's 1280-channel map: fresh, the frozen embedding; trained, the pooled
    shortcut mean(y) + σ(g)·W_up mean(z) equals the encoder's own per-token forward."""
    torch.manual_seed(0)
    m = _offline_rdb(image_site="head", image_encoder_kwargs={"pool": "multi"}).eval()
    tower = m.image_tower
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        frozen = m.image_encoder(x).pooled
        assert torch.allclose(tower(x), frozen, atol=1e-6)
        assert len(tower.insertions) == 1 and tower.insertions[0].adapter.up.out_features == 1280
        torch.nn.init.normal_(tower.insertions[0].adapter.up.weight, std=0.5)
        torch.nn.init.normal_(tower.insertions[0].adapter.up.bias, std=0.5)
        adapted = tower.suffix(tower.prefix(x))
        per_token = m.image_encoder(x).pooled  # bn2 wrapped: y + delta(y) on every token, then the mean
    assert torch.allclose(adapted, per_token, atol=1e-5)
    assert (adapted - frozen).abs().max() > 0.1  # the adapter changed the head part …
    assert torch.equal(adapted[:, :-1280], frozen[:, :-1280])  # … and only the head part
    assert not any(p.requires_grad for p in m.image_encoder.model.conv_head.parameters())
    assert m.cache_identity()["image_site"] == "head"
    with pytest.raises(ConfigError, match="image_layers"):
        _offline_rdb(image_site="head", image_layers=2)
    with pytest.raises(ConfigError, match="image_site"):
        _offline_rdb(image_site="stem")


def test_bf16_tower_follows_the_encoder_precision() -> None:
    torch.manual_seed(0)
    m = _offline_rdb(image_encoder_kwargs={"pool": "multi", "precision": "bf16"}).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = m.image_tower.prefix(x)
        assert all(v.dtype == torch.float32 for v in feats.values())
        out = m.image_tower.suffix(feats)
        ref = m.image_encoder(x).pooled  # the encoder's own bf16 forward
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.05
    with torch.no_grad():
        m.image_encoder.precision = "fp32"
        exact = m.image_tower.suffix(m.image_tower.prefix(x))
    assert not torch.equal(out, exact)  # bf16 did run
    assert (out - exact).norm() / exact.norm() < 0.05


def test_fresh_adapters_reproduce_frozen_clip_embeddings(tiny_clip: str) -> None:
    m = _clip_rdb(tiny_clip).eval()
    model = open_clip.CLIP(**_VIT).eval()  # the frozen model, rebuilt from the saved weights
    model.load_state_dict(torch.load(tiny_clip.split("@")[1], weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    tok = m.tokenize(["a bridge over a river", "dense residential area"])
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_text(tok["input_ids"], tok["attention_mask"])
        ref_i = F.normalize(model.encode_image(x), dim=-1)
        ref_t = F.normalize(model.encode_text(tok["input_ids"]), dim=-1)
    assert torch.allclose(img, ref_i, atol=1e-6) and torch.allclose(txt, ref_t, atol=1e-6)
    assert len(m.image_tower.insertions) == 2 and len(m.text_tower.insertions) == 2  # all blocks


def test_only_adapter_gate_classifier_and_weight_params_train(tiny_clip: str) -> None:
    m = _clip_rdb(tiny_clip)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    allowed = (".adapter.", ".gate", "shared.", "classifier.", "weighting.", "logit_scale.")
    assert names and all(any(a in n for a in allowed) for n in names), names
    assert not any(p.requires_grad for p in m.image_encoder.visual.conv1.parameters())
    n_adapt = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert m.trainable_summary()["total"] == n_adapt


def test_last_k_layers_and_bad_k(tiny_clip: str) -> None:
    m = _clip_rdb(tiny_clip, image_layers=1, text_layers=1)
    assert len(m.image_tower.insertions) == 1 and m.image_tower.first == 1
    with pytest.raises(ConfigError, match="image_layers"):
        _clip_rdb(tiny_clip, image_layers=5)
    with pytest.raises(ConfigError, match="image_site"):  # a ViT has no head site
        _clip_rdb(tiny_clip, image_site="head")


def test_clip_training_step_keeps_frozen_weights(tiny_clip: str) -> None:
    torch.manual_seed(0)
    m = _clip_rdb(tiny_clip)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.set_schedule(4)
    m.train()
    tok = m.tokenize(["a bridge", "a farm", "a port", "a bridge"])
    batch = {"image": torch.randn(4, 3, 64, 64), **tok, "image_id": torch.tensor([0, 1, 2, 0]),
             "scene": torch.tensor([0, 1, -1, 0])}  # fmt: skip
    out = m(batch)
    assert {"dtcl_loss", "itc", "cls", "ema"} <= set(out)
    up_before = m.image_tower.insertions[0].adapter.up.weight.detach().clone()
    out["dtcl_loss"].backward()
    opt.step()
    m.on_step_end()
    assert not torch.equal(m.image_tower.insertions[0].adapter.up.weight, up_before)
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# --- DTCL pieces ------------------------------------------------------------------------------------


def test_ema_teacher_update_rule() -> None:
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    t = MeanTeacher(lin)
    assert t.names == ["weight"]
    before = t.p0.clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    t.update(0.9)
    assert torch.allclose(t.p0, 0.9 * before + 0.1 * lin.weight)
    with t.swapped():
        assert torch.equal(lin.weight, t.p0)
    assert torch.allclose(lin.weight, before + 1.0)


def test_uncertainty_weights_get_gradients_and_stay_clamped() -> None:
    w = LossWeighting(["itc", "cls", "ema"], "uncertainty", clamp=1.0)
    terms = {"itc": torch.tensor(2.0), "cls": torch.tensor(0.5)}
    total = w(terms)
    total.backward()
    g = w.log_vars.grad
    assert g is not None and g[0] != 0 and g[1] != 0 and g[2] == 0  # an absent term gets none
    # d/ds [e^{-s} L + s] = 1 − L at s = 0
    assert torch.allclose(g[:2], torch.tensor([1 - 2.0, 1 - 0.5]))
    opt = torch.optim.SGD([w.log_vars], lr=10.0)
    opt.step()
    w.clamp_()
    assert w.log_vars.abs().max() <= 1.0
    current = w.weights({n: torch.ones(()) for n in w.names})
    assert torch.allclose(torch.stack(list(current.values())), torch.exp(-w.log_vars.detach()))


def test_other_weightings() -> None:
    terms = {"itc": torch.tensor(2.0), "cls": torch.tensor(0.5), "ema": torch.tensor(1.0)}
    ratio = LossWeighting(["itc", "cls", "ema"], "ratio")
    assert float(ratio(terms)) == pytest.approx(3.0 * 3 / (0.5 + 2.0 + 1.0))  # each term weighs the same
    two = {"itc": torch.tensor(2.0), "cls": torch.tensor(0.5)}  # an absent term takes no share
    assert float(ratio(two)) == pytest.approx(2.0 * 2 / (0.5 + 2.0))
    fixed = LossWeighting(["itc", "cls", "ema"], "fixed", fixed=[1.0, 0.5, 1.0])
    assert float(fixed(terms, {"ema": 0.5})) == pytest.approx(2.0 + 0.25 + 0.5)
    dwa = LossWeighting(["itc", "cls", "ema"], "dwa")
    for losses in ((2.0, 1.0, 1.0), (1.0, 1.0, 1.0)):
        dwa({k: torch.tensor(v) for k, v in zip(terms, losses, strict=True)})
        dwa.end_epoch()
    w = torch.stack(list(dwa.weights({n: torch.ones(()) for n in dwa.names}).values()))
    assert w[0] < w[1] and float(w.sum()) == pytest.approx(3.0)  # the fast-falling term gets less


def test_anchored_and_normalised_weightings_keep_the_retrieval_term() -> None:
    """``anchored``: ITC's weight stays 1 and only the auxiliary log-variances learn;
    ``normalised``: the model's weights sum to K whatever the log-variances, which learn from
    detached losses (so the model's gradient is Σ w_k ∂L_k)."""
    names = ["itc", "cls", "ema"]
    losses = {n: torch.tensor(v, requires_grad=True) for n, v in zip(names, (2.0, 0.5, 0.1), strict=True)}
    anchored = LossWeighting(names, "anchored", clamp=4.0)
    anchored(losses).backward()
    g = anchored.log_vars.grad
    assert g is not None and g[0] == 0 and torch.allclose(g[1:], torch.tensor([1 - 0.5, 1 - 0.1]))
    with torch.no_grad():
        anchored.log_vars.copy_(torch.tensor([3.0, -2.0, -3.0]))  # a drift on the anchor is ignored
    w = anchored.weights(losses)
    assert float(w["itc"]) == 1.0 and float(w["ema"]) == pytest.approx(float(torch.exp(torch.tensor(3.0))))
    norm = LossWeighting(names, "normalised", clamp=4.0)
    with torch.no_grad():
        norm.log_vars.copy_(torch.tensor([1.0, -1.0, -3.0]))
    for v in losses.values():
        v.grad = None
    norm(losses).backward()
    w = torch.stack(list(norm.weights(losses).values()))
    assert float(w.sum()) == pytest.approx(3.0) and torch.allclose(
        w, 3 * torch.softmax(-norm.log_vars.detach(), 0)
    )
    assert all(float(losses[n].grad) == pytest.approx(float(w[i])) for i, n in enumerate(names))
    assert torch.allclose(
        norm.log_vars.grad, 1 - torch.exp(-norm.log_vars.detach()) * torch.tensor([2.0, 0.5, 0.1])
    )


def test_cls_ignores_unlabelled_pairs_and_ema_ramps() -> None:
    torch.manual_seed(0)
    m = _offline_rdb(use_ema=False, weighting="fixed", fixed_weights=[1.0, 1.0, 1.0])
    img = F.normalize(torch.randn(4, 512), dim=-1)
    txt = F.normalize(torch.randn(4, 512), dim=-1)
    base = {"image_id": torch.arange(4)}
    none = m.losses(img, txt, {**base, "scene": torch.full((4,), -1)})
    assert "cls" not in none
    some = m.losses(img, txt, {**base, "scene": torch.tensor([0, -1, 2, -1])})
    y = torch.tensor([0, 2])
    ref = 0.5 * (
        F.cross_entropy(m.classifier(img[[0, 2]]), y) + F.cross_entropy(m.classifier(txt[[0, 2]]), y)
    )
    assert torch.allclose(some["cls"], ref)
    m.set_schedule(10)
    assert m.ema_ramp() == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    m.step.fill_(50)  # 5 epochs in: fully ramped
    assert m.ema_ramp() == 1.0


def test_presets_and_validation() -> None:
    assert set(PRESETS) == {f"A{i}" for i in range(8)}
    a0 = _offline_rdb(preset="A0")
    assert type(a0.image_tower.insertions[0].adapter.attention).__name__ == "SelfAttention"
    assert a0.classifier is None and a0.teacher is None
    a3 = _offline_rdb(preset="A3")
    assert (
        len(a3.shared) == 0
        and type(a3.text_tower.insertions[0].adapter.attention).__name__ == "HierarchicalAttention"
    )
    a4 = _offline_rdb(preset="A4", use_ema=True)  # explicit keys win over the preset
    assert a4.teacher is not None
    with pytest.raises(ConfigError, match="model.preset"):
        _offline_rdb(preset="A9")
    with pytest.raises(ConfigError, match="num_classes"):
        _offline_rdb(num_classes=0)
    with pytest.raises(ConfigError, match="model.weighting"):
        _offline_rdb(weighting="magic")
