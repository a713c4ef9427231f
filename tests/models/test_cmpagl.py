"""CMPAGL: the split BERT, ITC with momentum queue, Eq. 19, ITM negatives, MLM masking, presets, training step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rsitr.errors import ConfigError
from rsitr.losses.contrastive import queue_infonce
from rsitr.losses.triplet import optimized_triplet
from rsitr.models import build_config, create_method
from rsitr.models.checkpoint import load_method, save_method
from rsitr.models.encoders import create_image_encoder, create_text_encoder
from rsitr.models.methods.cmpagl import CMPAGL, IGNORE, PRESETS, FeatureQueue, hard_negatives, mask_tokens

GSWIN = {"embed_dim": 8, "num_heads": [1, 1, 2, 2], "window": 4, "image_size": 64}
BASE = {"image_encoder_kwargs": GSWIN, "text_encoder_kwargs": {"max_length": 16}, "embed_dim": 32,
        "queue_size": 32}  # fmt: skip
CAPTIONS = [
    "three white planes beside a terminal",
    "a river with a bridge",
    "green farmland",
    "a dense forest",
]


_TEXT: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 4-layer, 32-wide BERT with MiniLM's tokenizer, saved as an ``hf:`` folder (fast tests)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rsitr.models.encoders._weights import package_dir
    from rsitr.models.encoders.minilm import WHEEL_PACKAGE

    folder = tmp_path_factory.mktemp("tiny_bert")
    AutoTokenizer.from_pretrained(str(package_dir(WHEEL_PACKAGE, "minilm-l6") / "model")).save_pretrained(
        folder
    )
    cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    _TEXT["spec"] = f"hf:{folder}"
    return _TEXT["spec"]


def _method(**kw: object) -> CMPAGL:
    """``create_method("cmpagl", …, pretrained=False)`` with gswin-tiny and the tiny BERT (2 + 2 layers)."""
    torch.manual_seed(0)
    return create_method("cmpagl", {**BASE, "text_encoder": _TEXT["spec"], **kw}, pretrained=False)


def _batch(m: CMPAGL, ids: tuple[int, ...] = (0, 1, 2, 2)) -> dict:
    g = torch.Generator().manual_seed(0)
    tok = m.tokenize(CAPTIONS[: len(ids)])
    return {"image": torch.randn(len(ids), 3, 64, 64, generator=g), **tok, "image_id": torch.tensor(ids)}


def _total(out: dict) -> torch.Tensor:
    return sum(v for k, v in out.items() if k.endswith("_loss"))


# --- Eq. 19 -----------------------------------------------------------------------------------------------


def test_optimized_triplet_matches_a_hand_computed_example() -> None:
    sim = torch.tensor([[0.9, 0.3], [0.5, 0.6]])
    pos = torch.eye(2, dtype=torch.bool)
    # i2t: [0.2-0.9+0.3]+ = 0, [0.2-0.6+0.5]+ = 0.1; t2i: [0.2-0.9+0.5]+ = 0, [0.2-0.6+0.3]+ = 0;
    # intra: (1-0.9) + (1-0.6) = 0.5
    assert optimized_triplet(sim, pos, margin=0.2).item() == pytest.approx(0.6)
    assert optimized_triplet(sim, pos, margin=0.2, reduction="mean").item() == pytest.approx(0.3)
    # margin 0.5: i2t 0 + 0.4, t2i 0.1 + 0.2, intra 0.5
    assert optimized_triplet(sim, pos, margin=0.5).item() == pytest.approx(1.2)


def test_optimized_triplet_equals_eq19_written_out() -> None:
    torch.manual_seed(0)
    sim = torch.randn(5, 5).tanh()
    ids = torch.tensor([0, 1, 1, 2, 3])
    pos = ids[:, None] == ids[None, :]
    a, n = 0.3, 5
    ref = 0.0
    for i in range(n):
        for j in range(n):
            if not pos[i, j]:  # j over the negatives of image i / i over the negatives of caption j
                ref += max(0.0, a - sim[i, i].item() + sim[i, j].item())
                ref += max(0.0, a - sim[j, j].item() + sim[i, j].item())
        ref += 1 - sim[i, i].item()
    assert optimized_triplet(sim, pos, margin=a).item() == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        optimized_triplet(sim, pos, reduction="max")  # type: ignore[arg-type]


# --- ITC with the momentum queue -------------------------------------------------------------------------


def test_queue_enqueues_and_dequeues_in_order() -> None:
    q = FeatureQueue(5, 2)
    assert q.size == 5 and (q.ids == -1).all()
    q.push(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([10, 11, 12]))
    assert q.ids.tolist() == [10, 11, 12, -1, -1] and int(q.ptr) == 3
    q.push(2 * torch.ones(3, 2), 3 * torch.ones(3, 2), torch.tensor([13, 14, 15]))
    # the oldest entries (10) are replaced first; the pointer wraps around
    assert q.ids.tolist() == [15, 11, 12, 13, 14] and int(q.ptr) == 1
    assert (
        q.image[0].tolist() == [2.0, 2.0]
        and q.text[0].tolist() == [3.0, 3.0]
        and q.image[1].tolist() == [1, 1]
    )
    q.push(torch.zeros(7, 2), torch.zeros(7, 2), torch.arange(20, 27))  # more than fits: the newest 5
    assert sorted(q.ids.tolist()) == [22, 23, 24, 25, 26] and int(q.ptr) == 1
    q.resize(3)
    assert q.ids.tolist() == [-1, -1, -1] and int(q.ptr) == 0
    FeatureQueue(0, 2).push(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([1]))  # no queue: no-op
    assert "image" not in FeatureQueue(4, 2).state_dict()  # not saved with checkpoints


def test_queue_infonce_duplicates_are_positives_and_empty_slots_ignored() -> None:
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(2, 4), dim=-1), F.normalize(torch.randn(2, 4), dim=-1)
    keys_i, keys_t = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    ids = torch.tensor([7, 8])
    key_ids = torch.tensor([7, 8, 7, 3, -1])  # batch keys, an in-queue duplicate of image 7, another, empty
    loss = queue_infonce(img, txt, ids, keys_i, keys_t, key_ids, 10.0)

    def one(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:  # written out, row by row
        total = torch.zeros(())
        for r in range(2):
            logits = 10.0 * q[r] @ keys[:4].T  # the empty slot is not a key
            logp = logits.log_softmax(0)
            positives = [c for c in range(4) if key_ids[c] == ids[r]]
            total = total - sum(logp[c] for c in positives) / len(positives)
        return total / 2

    assert loss.item() == pytest.approx((0.5 * (one(img, keys_t) + one(txt, keys_i))).item(), rel=1e-5)
    # as a key of another image the same entry would be a negative: another value
    relabelled = queue_infonce(img, txt, ids, keys_i, keys_t, torch.tensor([7, 8, 9, 3, -1]), 10.0)
    assert relabelled.item() != pytest.approx(loss.item())


def test_training_steps_fill_the_queue_and_cap_it_to_the_data() -> None:
    m = _method(queue_size=1000, itm_weight=0.0, mlm_weight=0.0)
    m.set_schedule(3)  # 3 optimiser steps per epoch
    m.train()
    b = _batch(m)
    m(b), m(b)  # one step of two accumulated micro-batches of 4 pairs: 3 × 8 = 24 pairs per epoch
    assert m.queue.size == 1000 and m.queue.ids[:8].tolist() == [0, 1, 2, 2] * 2
    m.on_step_end()
    assert m.queue.size == 24 and (m.queue.ids == -1).all()  # capped (and emptied) once
    m(b)
    m.on_step_end()
    m(b)
    assert m.queue.size == 24 and m.queue.ids[:8].tolist() == [0, 1, 2, 2] * 2 and int(m.queue.ptr) == 8
    m.eval()
    m(b)  # evaluation does not enqueue
    assert int(m.queue.ptr) == 8


def test_momentum_update_rule_and_no_gradients() -> None:
    m = _method()
    m.train()
    b = _batch(m)
    out = m(b)
    names = m.momentum.names
    assert names and all(
        n.startswith(("image_encoder.", "text_encoder.", "image_proj.", "text_proj.")) for n in names
    )
    assert not any(b.requires_grad for b in m.momentum.buffers())
    img_m, txt_m = m.momentum_embeddings(
        b, m.image_features(b["image"]), m.text_features(b["input_ids"], b["attention_mask"])
    )
    assert not img_m.requires_grad and not txt_m.requires_grad
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    _total(out).backward()
    i = names.index("image_proj.weight")
    teacher_before = getattr(m.momentum, f"p{i}").clone()
    opt.step()
    m.on_step_end()
    student = m.image_proj.weight.detach()
    assert not torch.equal(student, teacher_before)
    expected = 0.995 * teacher_before + 0.005 * student
    assert torch.allclose(getattr(m.momentum, f"p{i}"), expected, atol=1e-7)


# --- ITM and MLM ------------------------------------------------------------------------------------------


def test_hard_negatives_never_share_the_image() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    for _ in range(20):
        sim = torch.randn(6, 6, generator=g) * 10
        neg_img, neg_txt, has_img, has_txt = hard_negatives(sim, ids, generator=g)
        assert (ids[neg_img] != ids).all() and (ids[neg_txt] != ids).all()
        assert has_img.all() and has_txt.all()
    # a strongly preferred negative is (almost) always drawn
    sim = torch.zeros(3, 3)
    sim[0, 2] = 50.0
    assert hard_negatives(sim, torch.tensor([0, 1, 2]), generator=g)[1][0] == 2
    # a batch of one image has no negatives at all
    assert not hard_negatives(torch.zeros(2, 2), torch.tensor([4, 4]))[2].any()


def test_mlm_labels_ignore_unmasked_positions() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 20), generator=g)
    ids[:, 0], ids[:, 15], ids[:, 16:] = 101, 102, 0  # [CLS] … [SEP] [PAD]…
    att = (ids != 0).long()
    special = torch.tensor([0, 100, 101, 102, 103])
    masked, labels = mask_tokens(ids, att, 103, 30522, special, 0.15, generator=g)
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], ids[chosen])  # chosen positions keep the original id as label
    assert torch.equal(masked[~chosen], ids[~chosen])  # unmasked positions are untouched and ignored
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()  # never specials or padding
    frac = chosen.sum() / ((att == 1).sum() - 2 * 64)
    assert 0.11 < frac < 0.19
    to_mask = (masked == 103) & chosen
    kept = (masked == ids) & chosen
    assert 0.7 < to_mask.sum() / chosen.sum() < 0.9
    assert 0.03 < kept.sum() / chosen.sum() < 0.2
    assert ((masked == 103) <= chosen).all()


def test_mlm_loss_uses_only_masked_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _method(itm_weight=0.0, mlm_probability=0.5)
    b = _batch(m)
    feats_i, feats_t = m.image_features(b["image"]), m.text_features(b["input_ids"], b["attention_mask"])
    seen = {}
    head = m.mlm_head.forward

    def spy(h: torch.Tensor) -> torch.Tensor:
        seen["rows"] = h.shape[0]
        return head(h)

    monkeypatch.setattr(m.mlm_head, "forward", spy)
    loss = m.mlm_loss(feats_i, feats_t)
    assert torch.isfinite(loss) and seen["rows"] < b["attention_mask"].sum()  # only the chosen tokens
    # the image conditions the prediction: another image gives another loss for the same masking
    torch.manual_seed(3)
    a = m.mlm_loss(feats_i, feats_t)
    torch.manual_seed(3)
    other = {k: v.flip(0) for k, v in feats_i.items()}
    assert a.item() != pytest.approx(m.mlm_loss(other, feats_t).item())


def test_mlm_head_is_tied_to_the_word_embeddings() -> None:
    m = _method()
    emb = m.text_encoder.model.embeddings.word_embeddings
    assert m.mlm_head._embeddings[0] is emb
    assert not any(p is emb.weight for p in m.mlm_head.parameters())  # owned by the text encoder


# --- the split BERT and the architecture switches ----------------------------------------------------------


def test_bert_split_moves_the_upper_half_into_the_fusion_layers() -> None:
    torch.manual_seed(0)
    img = create_image_encoder("gswin-tiny", pretrained=False, **GSWIN)
    txt = create_text_encoder("minilm-l6", pretrained=False, max_length=16)
    full = copy.deepcopy(txt.model).eval()
    m = CMPAGL(build_config("cmpagl", {"embed_dim": 32}), img, txt).eval()
    assert len(m.text_encoder.layers) == 3 and len(m.fusion) == 3 and len(m.image_fusion) == 0
    for fl, layer in zip(m.fusion, full.encoder.layer[3:], strict=True):
        assert torch.equal(fl.self_attn.query.weight, layer.attention.self.query.weight)
        assert torch.equal(fl.ffn_out.bias, layer.output.dense.bias)
        assert torch.equal(fl.ffn_norm.weight, layer.output.LayerNorm.weight)
    tok = m.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = full(**tok, output_hidden_states=True).hidden_states[3]  # after the third layer
        out = m.text_features(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(out["tokens"], ref, atol=1e-5)
    assert torch.equal(out["pooled"], out["tokens"][:, 0])  # G_i: the 0-th token (Eq. 9)


def test_retrieval_is_dual_stream_without_the_multimodal_encoder() -> None:
    m = _method().eval()
    b = _batch(m)
    img, txt = m.encode_image(b["image"]), m.encode_text(b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        for p in [*m.fusion.parameters(), *m.itm_head.parameters(), m.mlm_head.bias]:
            p.fill_(float("nan"))
    assert torch.equal(m.encode_image(b["image"]), img)
    assert torch.equal(m.encode_text(b["input_ids"], b["attention_mask"]), txt)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    counts = m.parameter_counts()
    assert counts["inference"] < counts["training"]
    towers = sum(
        p.numel()
        for mod in (m.image_encoder, m.text_encoder, m.image_proj, m.text_proj)
        for p in mod.parameters()
    )
    assert counts["inference"] == towers
    assert counts["training"] - counts["inference"] == sum(
        p.numel() for mod in (m.fusion, m.itm_head, m.mlm_head, m.logit_scale) for p in mod.parameters()
    )
    assert CMPAGL.default_rerank == "smr"


def test_std_mi_splits_the_multimodal_layers_into_two_branches() -> None:
    pa, std = _method(), _method(pre_aligned=False)
    assert (len(pa.fusion), len(pa.image_fusion)) == (2, 0)
    assert (len(std.fusion), len(std.image_fusion)) == (1, 1)  # the same 2 multimodal layers in total
    assert std.itm_head.in_features == 2 * pa.itm_head.in_features
    std.train()
    out = std(_batch(std))
    _total(out).backward()
    assert std.image_fusion[0].cross_attn.key.weight.grad is not None
    with pytest.raises(ConfigError, match="Std-MI"):
        _method(pre_aligned=False, text_layers=3)


@pytest.mark.parametrize(
    ("kw", "terms"),
    [
        ({}, {"itc", "triplet", "itm", "mlm"}),
        ({"itm_weight": 0.0}, {"itc", "triplet", "mlm"}),
        ({"triplet_weight": 0.0, "mlm_weight": 0.0}, {"itc", "itm"}),
        ({"itc_weight": 0.0, "itm_weight": 0.0, "mlm_weight": 0.0}, {"triplet"}),
    ],
)
def test_each_term_switches_off(kw: dict, terms: set[str]) -> None:
    m = _method(**kw)
    out = m(_batch(m))
    assert {k.removesuffix("_loss") for k in out if k.endswith("_loss")} == terms
    assert (m.momentum is None) == ("itc" not in terms) and (m.queue.size == 0) == ("itc" not in terms)
    assert (m.mlm_head is None) == ("mlm" not in terms) and (m.itm_head is None) == ("itm" not in terms)
    assert (len(m.fusion) == 0) == (not {"itm", "mlm"} & terms)


def test_presets_are_the_ablation_rows() -> None:
    assert set(PRESETS) == {"baseline", "no-gw", "no-slw", "gswin", "gswin+itm", "cmpagl", "std-mi"}
    cfg = build_config("cmpagl", {"preset": "no-gw", "image_encoder_kwargs": {"embed_dim": 8}})
    assert cfg.image_encoder_kwargs == {"no_global_window": True, "embed_dim": 8}  # merged, not replaced
    assert cfg.itm_weight == 0 and cfg.triplet_weight == 0 and cfg.mlm_weight == 1
    assert build_config("cmpagl", {"preset": "gswin+itm", "triplet_weight": 0.5}).triplet_weight == 0.5
    m = _method(preset="no-slw")
    assert m.image_encoder.layers[0].blocks[0].shift_attn is None
    assert m.image_encoder.layers[0].blocks[0].cross_attn is not None
    assert _method(preset="std-mi").cfg.pre_aligned is False
    with pytest.raises(ConfigError, match="model.preset: 'nope'"):
        build_config("cmpagl", {"preset": "nope"})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"text_pool": "max"}, "model.text_pool"),
        ({"mlm_weight": -1.0}, "model.mlm_weight"),
        ({"itc_weight": 0.0, "triplet_weight": 0.0}, "nothing would train"),
        ({"momentum": 1.0}, "model.momentum"),
        ({"queue_size": -1}, "model.queue_size"),
        ({"mlm_probability": 0.0}, "model.mlm_probability"),
        ({"triplet_reduction": "max"}, "model.triplet_reduction"),
    ],
)
def test_bad_options_raise_config_errors(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("cmpagl", kw)


def test_bad_towers_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="BERT-like"):
        _method(text_encoder="tiny-text", text_encoder_kwargs={})
    with pytest.raises(ConfigError, match="text_layers: 4 is not within 1..3"):
        _method(text_layers=4)
    with pytest.raises(ConfigError, match="unknown option 'no_global_window'"):
        _method(preset="no-gw", image_encoder="tiny-cnn", image_encoder_kwargs={"width": 4})


# --- training ------------------------------------------------------------------------------------------------


def test_one_training_step_and_frozen_parts_get_no_gradients() -> None:
    m = _method(freeze_image=True)
    m.train()
    assert not m.image_encoder.training  # a frozen tower stays in eval mode
    out = m(_batch(m))
    assert all(torch.isfinite(v) for v in out.values())
    _total(out).backward()
    assert all(p.grad is None for p in m.image_encoder.parameters())
    assert all(p.grad is not None for p in m.image_proj.parameters())
    assert m.fusion[0].cross_attn.key.weight.grad is not None  # ITM/MLM reach the multimodal encoder
    assert m.text_encoder.model.embeddings.word_embeddings.weight.grad is not None
    groups = m.param_groups()
    backbone = {id(p) for p in groups["backbone"]}
    assert id(m.fusion[0].self_attn.query.weight) in backbone  # copied from BERT
    assert id(m.fusion[0].cross_attn.query.weight) not in backbone  # new
    assert not any(n.startswith("image_encoder.") for n in m.momentum.names)  # frozen: no momentum copy
    opt = torch.optim.AdamW([p for g in groups.values() for p in g], lr=1e-3)
    before = m.text_proj.weight.detach().clone()
    opt.step()
    m.on_step_end()
    assert not torch.equal(m.text_proj.weight, before)


def test_frozen_text_half_still_trains_the_multimodal_half() -> None:
    m = _method(freeze_text=True)
    m.train()
    _total(m(_batch(m))).backward()
    assert all(p.grad is None for p in m.text_encoder.parameters())
    assert m.fusion[0].ffn_in.weight.grad is not None and m.mlm_head.bias.grad is not None


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = _method().eval()
    b = _batch(m)
    path = save_method(m, tmp_path / "model.safetensors")
    m2 = load_method(path)
    assert isinstance(m2, CMPAGL)
    assert torch.allclose(m2.encode_image(b["image"]), m.encode_image(b["image"]), atol=1e-6)
    tok = (b["input_ids"], b["attention_mask"])
    assert torch.allclose(m2.encode_text(*tok), m.encode_text(*tok), atol=1e-6)


def test_itm_rescore_reorders_only_the_top_k() -> None:
    m = _method().eval()
    b = _batch(m, ids=(0, 1, 2))
    img = m.image_features(b["image"][:3])
    tok = m.tokenize([*CAPTIONS, "a parking lot", "a beach"])
    txt = m.text_features(tok["input_ids"], tok["attention_mask"])
    scores = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    i2t, t2i = m.itm_rescore(scores, img, txt, k=2, batch_size=5)
    assert i2t.shape == t2i.shape == (3, 6)
    for row, s in zip(i2t, scores, strict=True):
        top = set(s.topk(2).indices.tolist())
        assert set(row.topk(2).indices.tolist()) == top  # re-scored candidates stay on top
        assert all(0 <= row[j] <= 1 for j in top)
        rest = [j for j in range(6) if j not in top]
        assert torch.allclose(row[rest], s[rest] - 1e3)  # the tail keeps its ITC order
    # a re-scored pair holds the ITM match probability of that pair
    j = int(scores[0].argmax())
    with torch.no_grad():
        p = m.itm_head(
            m.fused_pair(img["tokens"][:1], txt["tokens"][j : j + 1], txt["attention_mask"][j : j + 1].bool())
        )
    assert i2t[0, j].item() == pytest.approx(p.softmax(-1)[0, 1].item(), abs=1e-5)
    assert torch.equal(
        t2i.topk(2, dim=0).indices.sort(0).values, scores.topk(2, dim=0).indices.sort(0).values
    )
    with pytest.raises(ConfigError, match="itm_weight=0"):
        _method(itm_weight=0.0).itm_rescore(scores, img, txt)


def test_a_bert_base_deep_model_splits_6_plus_6(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "deep"
    AutoTokenizer.from_pretrained(_TEXT["spec"].removeprefix("hf:")).save_pretrained(folder)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=12, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=32)).save_pretrained(folder)  # fmt: skip
    pa = _method(text_encoder=f"hf:{folder}")
    assert (pa.num_text_layers, len(pa.fusion)) == (6, 6)  # bert-base-uncased's 6 + 6
    std = _method(text_encoder=f"hf:{folder}", pre_aligned=False)
    assert (len(std.fusion), len(std.image_fusion)) == (3, 3)
