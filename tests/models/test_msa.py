"""MSA (Multi-Scale Alignment): MSCMAT masking and vectorisation, losses, fusion, presets, figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rsitr.data.corpus import ImageRecord, RetrievalCorpus
from rsitr.errors import ConfigError
from rsitr.losses.consistency import score_distribution_kl
from rsitr.losses.contrastive import positives_from_ids
from rsitr.models import build_config, create_method
from rsitr.models.methods import msa as msa_mod
from rsitr.models.methods.msa import MSCMAT

TINY = {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "image_encoder_kwargs": {"width": 4},
        "text_encoder_kwargs": {"dim": 16}, "embed_dim": 16, "num_heads": 4}  # fmt: skip
TEXTS = ["three white planes beside a terminal", "a river", "green farmland near a road", "dense forest"]


def _method(**over: object) -> msa_mod.MSA:
    torch.manual_seed(0)
    return create_method("msa", {**TINY, **over}, pretrained=False)


def _batch(method: msa_mod.MSA) -> dict:
    torch.manual_seed(1)
    return {
        "image": torch.randn(4, 3, 64, 64),
        **method.tokenize(TEXTS),
        "image_id": torch.tensor([0, 1, 2, 3]),
    }


@pytest.mark.parametrize("attention", ["sigmoid", "softmax"])
@pytest.mark.parametrize("variant", ["cross", "self", "no-cls"])
def test_padding_gets_zero_attention(attention: str, variant: str) -> None:
    torch.manual_seed(0)
    att = MSCMAT(16, 4, attention, variant, "dot")
    img, tok = torch.randn(3, 16), torch.randn(5, 7, 16)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in (7, 3, 1, 5, 2)], dtype=torch.bool)
    agg, w = att.attend(img, tok, mask)
    assert agg.shape == (3, 5, 16) and w.shape == (3, 5, 4, 7)
    assert (w.permute(0, 2, 1, 3)[:, :, ~mask] == 0).all()  # (B_i, h, padded tokens)
    assert (w[..., 0] > 0).all()
    # Changing the padded tokens changes nothing.
    tok2 = tok.clone()
    tok2[~mask] = 100.0
    assert torch.allclose(att.attend(img, tok2, mask)[0], agg, atol=1e-5)


@pytest.mark.parametrize("score", ["dot", "reference"])
@pytest.mark.parametrize("variant", ["cross", "self", "no-cls"])
def test_pair_scores_vectorised_equal_per_pair_and_chunked(
    score: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    att = MSCMAT(16, 4, "sigmoid", variant, score)
    img, tok, cls = torch.randn(3, 16), torch.randn(5, 6, 16), torch.randn(5, 16)
    mask = torch.rand(5, 6) > 0.3
    mask[:, 0] = True
    full = att(img, tok, mask, cls)
    assert full.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            one = att(img[i : i + 1], tok[j : j + 1], mask[j : j + 1], cls[j : j + 1])
            assert torch.allclose(one[0, 0], full[i, j], atol=1e-5)
    monkeypatch.setattr(msa_mod, "_CHUNK_ELEMENTS", 1)  # one caption per chunk
    assert torch.allclose(att(img, tok, mask, cls), full, atol=1e-6)


def test_dot_score_is_eq13_cosine() -> None:
    torch.manual_seed(0)
    att = MSCMAT(8, 2, "sigmoid", "cross", "dot")
    img, tok, cls = torch.randn(2, 8), torch.randn(3, 4, 8), torch.randn(3, 8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    agg, _ = att.attend(img, tok, mask)
    want = F.cosine_similarity(img[:, None], agg + cls[None], dim=-1)
    assert torch.allclose(att(img, tok, mask, cls), want, atol=1e-5)


def test_csmmc_zero_when_scales_agree() -> None:
    m = torch.randn(6, 6)
    pos = positives_from_ids(torch.arange(6))
    method = _method()
    terms = method.alignment_losses([m, m.clone(), m.clone(), m.clone()], pos)
    assert terms["csmmc_loss"].abs() < 1e-6
    assert score_distribution_kl(m, m, axis="column").abs() < 1e-6
    assert score_distribution_kl(m, torch.randn(6, 6)) > 0


def test_csmmc_does_not_reach_largest_scale() -> None:
    method = _method()
    method.train()
    batch = _batch(method)
    terms = method(batch)
    terms["csmmc_loss"].backward()
    largest = [*method.scale_proj[3].parameters(), *method.mscmat["4"].parameters()]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in largest)
    smaller = [*method.scale_proj[0].parameters(), *method.mscmat["1"].parameters()]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in smaller)


def test_csmmc_gradient_on_matrices() -> None:
    ms = [torch.randn(4, 4, requires_grad=True) for _ in range(3)]
    terms = _method().alignment_losses(ms, positives_from_ids(torch.arange(4)))
    terms["csmmc_loss"].backward()
    assert ms[-1].grad is None and all(m.grad is not None for m in ms[:-1])


def test_fused_feature_matches_eq5_6_by_hand() -> None:
    method = _method(embed_dim=2, num_heads=1)
    with torch.no_grad():
        method.fusion_gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        method.fusion_gate.bias.copy_(torch.tensor([0.0, 1.0]))
    scales = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, -1.0]]), torch.tensor([[1.0, 0.0]])]
    # Σ v′ = (2, 1); L^ms(Σ) = (2, −1 + 1) = (2, 0); A = (σ(2), ½); v″ = (2σ(2), ½).
    sig2 = 1 / (1 + torch.exp(torch.tensor(-2.0)))
    assert torch.allclose(method.fuse(scales), torch.tensor([[2 * sig2, 0.5]]), atol=1e-6)


def test_mscmat_not_called_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    method = _method()
    batch = _batch(method)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("MSCMAT ran in eval")

    monkeypatch.setattr(MSCMAT, "forward", boom)
    monkeypatch.setattr(MSCMAT, "attend", boom)
    method.eval()
    terms = method(batch)
    assert set(k for k in terms if k.endswith("_loss")) == {"triplet_loss"}
    img = method.encode_image(batch["image"])
    txt = method.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.shape == txt.shape == (4, 16)


@pytest.mark.parametrize(
    ("preset", "keys", "has_mscmat"),
    [
        ("base", {"triplet_loss"}, False),
        ("base+m", {"triplet_loss"}, False),
        ("base+m+a+b", {"triplet_loss", "mscma_loss"}, True),
        ("msa", {"triplet_loss", "mscma_loss", "csmmc_loss"}, True),
    ],
)
def test_presets(preset: str, keys: set[str], has_mscmat: bool) -> None:
    method = _method(preset=preset)
    method.train()
    terms = method(_batch(method))
    assert {k for k in terms if k.endswith("_loss")} == keys
    assert bool(len(method.mscmat)) == has_mscmat
    assert (method.global_proj is not None) == (preset == "base")
    sum(v for k, v in terms.items() if k.endswith("_loss")).backward()
    method.eval()
    x = _batch(method)["image"]
    assert torch.allclose(
        method.encode_image(feats=method.image_features(x)), method.encode_image(x), atol=1e-6
    )


def test_weights_and_align_scales() -> None:
    cfg = build_config("msa", {"preset": "msa"})
    assert (cfg.alpha_value, cfg.beta_value, cfg.image_mode) == (15.0, 10.0, "multiscale")
    cfg = build_config("msa", {"preset": "msa", "weight_scale": 0.1})
    assert (cfg.alpha_value, cfg.beta_value) == pytest.approx((1.5, 1.0))
    cfg = build_config("msa", {"preset": "base", "weight_scale": 0.1, "beta": 2})
    assert (cfg.alpha_value, cfg.beta_value) == (0.0, 2.0)  # an explicit weight is not scaled
    cfg = build_config("msa", {"preset": "base+m+a+b", "alpha": 4, "align_scales": [3, 1]})
    assert (cfg.alpha_value, cfg.beta_value, cfg.align_scales) == (4.0, 0.0, (1, 3))
    method = _method(align_scales=[2, 4], mscmat="self", attention="softmax", score="reference")
    assert sorted(method.mscmat) == ["2", "4"]
    method.train()
    terms = method(_batch(method))
    assert {"mscma_loss", "csmmc_loss"} <= set(terms)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"preset": "full"}, "model.preset"),
        ({"attention": "relu"}, "model.attention"),
        ({"mscmat": "dual"}, "model.mscmat"),
        ({"align_scales": [0, 1]}, "model.align_scales"),
        ({"align_scales": [1, 1]}, "model.align_scales"),
        ({"embed_dim": 10, "num_heads": 8}, "model.embed_dim"),
        ({"alpha": -1}, "model.alpha"),
        ({"weight_scale": -1}, "model.weight_scale"),
        ({"mu": 0}, "model.mu"),
        ({"loss": "hinge"}, "model.loss"),
        ({"head": "deep"}, "model.head"),
        ({"mscmat_batch": -1}, "model.mscmat_batch"),
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_config_errors(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config("msa", values)


def test_align_scale_beyond_taps() -> None:
    with pytest.raises(ConfigError, match="has 4 scale taps"):
        _method(align_scales=[1, 5])


def test_pooling_switch() -> None:
    assert _method().pools == ["max", "max", "max", "avg"]
    assert _method(pool="avg").pools == ["avg"] * 4


def test_report_figures(tmp_path: Path) -> None:
    method = _method()
    root = tmp_path / "images"
    root.mkdir()
    images = []
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 100, 200 - 40 * i)).save(root / f"{i}.png")
        images.append(ImageRecord(f"{i}.png", path=root / f"{i}.png"))
    corpus = RetrievalCorpus(images, TEXTS, [[0], [1], [2], [3]], "val", "toy", [("f", i) for i in range(4)])
    from rsitr.retrieval import embed

    paths = method.report_figures(corpus, tmp_path / "report", features=embed, num_images=4)
    assert [p.name for p in paths] == ["msa_fig3_scale_similarity.png", "msa_fig8_attention.png"]
    assert all(Image.open(p).size[0] > 100 for p in paths)


def test_text_features_trimmed_by_length_equal_full_length() -> None:
    # Extraction sorts captions by length, trims padding, and pads the token outputs back.
    from rsitr.retrieval.embed import text_features

    m = _method().eval()
    caps = [*TEXTS, "word " * 40, "a", *TEXTS[::-1]]
    fast = text_features(m, caps, batch_size=3)
    m.padded_text_keys = None  # the plain path: every batch at the tokenizer's full length
    slow = text_features(m, caps, batch_size=3)
    assert fast.keys() == slow.keys() == {"pooled", "tokens", "mask"}
    assert all(fast[k].shape == slow[k].shape for k in fast) and torch.equal(fast["mask"], slow["mask"])
    assert torch.allclose(fast["pooled"], slow["pooled"], atol=1e-5)
    real = slow["mask"] > 0.5  # outputs at padding positions are masked everywhere
    assert torch.allclose(fast["tokens"][real], slow["tokens"][real], atol=1e-5)


def test_top_scale_head_is_the_global_feature_tap_is_the_last_map() -> None:
    head, tap = _method(), _method(top_scale="tap")
    enc = head.image_encoder
    assert head.scale_proj[-1].in_features == enc.num_features
    assert tap.scale_proj[-1].in_features == enc.feature_info[-1]["num_chs"]
    with torch.no_grad():
        feats = head.image_features(torch.randn(2, 3, 64, 64))
        assert torch.equal(head.scale_features(feats)[-1], head.scale_proj[-1](feats["pooled"]))
        assert torch.equal(
            tap.scale_features(feats)[-1], tap.scale_proj[-1](feats[f"avg{len(enc.feature_info) - 1}"])
        )
    with pytest.raises(ConfigError, match="top_scale"):
        _method(top_scale="stage")


def test_triplet_reduction_sum_is_batch_times_mean() -> None:
    batch = _batch(_method())
    mean = _method(preset="base", triplet_reduction="mean").train()(batch)["triplet_loss"]
    total = _method(preset="base", triplet_reduction="sum").train()(batch)["triplet_loss"]
    assert torch.allclose(total, 4 * mean)


def test_input_norm_standardises_each_scale_before_its_projection() -> None:
    m = _method(preset="base+m", input_norm="batchnorm")
    assert isinstance(m.scale_proj[0][0], torch.nn.BatchNorm1d)
    assert isinstance(_method(preset="base", input_norm="batchnorm").global_proj[0], torch.nn.BatchNorm1d)
    assert isinstance(_method(preset="base+m").scale_proj[0], torch.nn.Linear)  # none: the paper's L^i


def test_strong_base_mlp_heads_and_infonce() -> None:
    method = _method(preset="msa", head="mlp", head_hidden=8, loss="infonce", text_input_norm="batchnorm")
    assert all(isinstance(p, torch.nn.Sequential) for p in [*method.scale_proj, method.text_proj])
    assert isinstance(method.text_proj[0], torch.nn.BatchNorm1d)
    terms = method.train()(_batch(method))
    assert {k for k in terms if k.endswith("_loss")} == {"infonce_loss", "mscma_loss", "csmmc_loss"}
    assert "logit_scale" in terms
    both = _method(preset="base", loss="both").train()(_batch(method))
    assert {k for k in both if k.endswith("_loss")} == {"infonce_loss", "triplet_loss"}
    assert _method(preset="base").logit_scale is None  # the paper's L_tri alone


def test_mscmat_batch_scores_the_first_k_pairs_only() -> None:
    full = _method(mscmat_batch=2).train()
    sub = _method().train()  # same seed: same weights
    batch = _batch(full)
    first = {k: v[:2] for k, v in batch.items()}
    a, b = full(batch), sub(first)
    assert torch.allclose(a["mscma"], b["mscma"], atol=1e-5)
    assert torch.allclose(a["csmmc"], b["csmmc"], atol=1e-5)
    assert not torch.allclose(a["mscma"], sub(batch)["mscma"], atol=1e-3)


def test_multi_tap_tower_base_uses_it_and_top_scale_is_the_head() -> None:
    kw = {"image_encoder": "efficientnet-lite0", "image_encoder_kwargs": {"pool": "multi"}}
    base, ms = _method(preset="base", **kw), _method(preset="base+m", **kw)
    assert base.global_proj.in_features == 2048
    assert ms.scale_proj[-1].in_features == 1280
    with torch.no_grad():
        feats = ms.eval().image_features(torch.randn(2, 3, 64, 64))
    assert feats["pooled"].shape == (2, 2048)
    assert torch.allclose(feats["head"], feats["pooled"][:, -1280:], atol=1e-5)
    assert torch.equal(ms.scale_features(feats)[-1], ms.scale_proj[-1](feats["head"]))
