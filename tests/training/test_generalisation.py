"""Training on a re-split source: the cache spans the source, caption sampling, ensemble
members, and the best checkpoint's val extras (test-time views, QB-Norm)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.cli import run
from tests.training.conftest import tiny_overrides


def _cached(synth: Path, out: Path, **extra: object) -> list[str]:
    return tiny_overrides(
        synth,
        out,
        **{
            "model.freeze_image": "true",
            "model.freeze_text": "true",
            "cache.enabled": "on",
            "model.head": "mlp",
            "model.head_hidden": 32,
            **extra,
        },  # fmt: skip
    )


def test_a_resplit_reuses_the_cached_features(tiny_synth: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert (
        run(["train", "configs/quickstart.yaml", *_cached(tiny_synth, tmp_path, **{"cache.dir": cache})]) == 0
    )
    folders = {p.name for p in cache.iterdir()}
    assert len(folders) == 3  # identity + hflip for every image of the source, captions
    # re-split the same source: val becomes train and vice versa, the cache is reused as is
    obj = json.loads((tiny_synth / "dataset_synth.json").read_text())
    for rec in obj["images"]:
        rec["split"] = {"val": "train", "train": "val"}.get(rec["split"], rec["split"])
    resplit = tmp_path / "resplit.json"
    resplit.write_text(json.dumps(obj))
    over = _cached(
        tiny_synth, tmp_path, **{"cache.dir": cache, "data.source": resplit, "out_dir": tmp_path / "r2"}
    )
    assert run(["train", "configs/quickstart.yaml", *over]) == 0
    assert {p.name for p in cache.iterdir()} == folders
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["best_val"]["mR"] > 0


def test_val_extras_are_reported_and_match_evaluate(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    assert run(["train", "configs/quickstart.yaml", *_cached(tiny_synth, tmp_path)]) == 0
    extras = json.loads((tmp_path / "run" / "summary.json").read_text())["best_val_extras"]
    assert extras["tta_views"] == ["identity", "hflip"]
    assert set(extras) >= {"plain", "tta", "plain+qb-norm", "tta+qb-norm"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert extras["plain"]["mR"] == pytest.approx(summary["best_val"]["mR"], abs=0.01)
    capsys.readouterr()
    args = ["evaluate", str(tmp_path / "run" / "best"), "--data", str(tiny_synth / "dataset_synth.json"),
            "--images", str(tiny_synth / "images"), "--split", "val", "--json"]  # fmt: skip
    assert run([*args, "--tta", "identity,hflip", "--rerank", "qb-norm"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["transductive"] is False and got["tta_views"] == ["identity", "hflip"]
    assert got["mR"] == pytest.approx(extras["tta+qb-norm"]["mR"], abs=0.01)
    # the best checkpoint's val embeddings are saved for ensembles and rerank tuning, and read back
    # by evaluate-scores to the figures of the summary
    for name, file in (("plain", "val_embeddings.npz"), ("tta", "val_embeddings_tta.npz")):
        assert run(["evaluate-scores", str(tmp_path / "run" / file), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["mR"] == pytest.approx(extras[name]["mR"], abs=0.01)


def test_caption_sampling_distinct_and_image(tiny_synth: Path, tmp_path: Path) -> None:
    from rsitr.training.config import load_config
    from rsitr.training.trainer import Trainer

    cfg = load_config(
        "configs/quickstart.yaml", _cached(tiny_synth, tmp_path, **{"data.caption_sampling": "distinct"})
    )
    t = Trainer(cfg, show_progress=False)
    t._build_data()
    # make two captions of image 0 identical: 'distinct' keeps one of them
    c0 = t.train_corpus.image_captions[0]
    t.train_corpus.captions[c0[1]] = t.train_corpus.captions[c0[0]]
    t.caption_to_image = t.train_corpus.caption_to_image()
    usable = np.ones(t.train_corpus.num_images, dtype=bool)
    kept = t._sampled_captions(usable)
    assert len(kept) == t.train_corpus.num_captions - 1 and c0[1] not in kept
    cfg.data.caption_sampling = "image"
    t.cfg = cfg
    caps = torch.from_numpy(t._sampled_captions(usable))
    steps = t._epoch_batches(0, caps)
    seen = torch.cat([m for micros in steps for m in micros]).numpy()
    owners = t.caption_to_image[seen]
    assert len(set(owners.tolist())) == len(owners)  # at most one caption per image per epoch
    other = torch.cat([m for micros in t._epoch_batches(1, caps) for m in micros]).numpy()
    assert not np.array_equal(np.sort(seen), np.sort(other))  # another caption next epoch


def test_members_score_is_the_mean_of_member_cosines() -> None:
    from rsitr.models import create_method

    m = create_method("dual", {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "members": 3,
                               "image_encoder_kwargs": {"width": 8}, "text_encoder_kwargs": {"dim": 32},
                               "embed_dim": 16, "head_hidden": 32}, pretrained=False).eval()  # fmt: skip
    fi = {"pooled": torch.randn(4, m.image_encoder.num_features)}
    ft = {"pooled": torch.randn(6, m.text_encoder.num_features)}
    img, txt = m.encode_image(feats=fi), m.encode_text(feats=ft)
    assert img.shape == (4, 48)
    per = [torch.nn.functional.normalize(hi(fi["pooled"]), dim=-1) @ torch.nn.functional.normalize(ht(ft["pooled"]), dim=-1).T
           for hi, ht in zip(m.image_head, m.text_head, strict=True)]  # fmt: skip
    assert torch.allclose(img @ txt.T, sum(per) / 3, atol=1e-6)
    batch = {"image_feats": fi, "text_feats": {"pooled": ft["pooled"][:4]}, "image_id": torch.arange(4)}
    m.train()
    loss = m(batch)["infonce_loss"]
    loss.backward()
    for head in (*m.image_head, *m.text_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_worddrop_text_view_is_deterministic_and_keeps_the_sentence_shape() -> None:
    from rsitr.data.text_views import text_view

    caps = ["many green trees are around a large white building with a parking lot .", "two planes ."]
    a, b = text_view(caps, "worddrop"), text_view(caps, "worddrop")
    assert a == b and a[1] == "two planes ."  # short captions are kept whole
    words = a[0].split()
    assert words[-1] == "." and 4 <= len(words) < len(caps[0].split())
    assert all(w in caps[0].split() for w in words)
    assert text_view(caps, "worddrop", offset=7) != a  # another caption index, another draw
    assert text_view(caps, "identity") == caps
    with pytest.raises(ValueError, match="unknown text view"):
        text_view(caps, "synonyms")


def test_text_views_are_cached_and_drawn_per_pair(tiny_synth: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    over = _cached(tiny_synth, tmp_path, **{"cache.dir": cache, "cache.text_views": "[identity,worddrop]"})
    assert run(["train", "configs/quickstart.yaml", *over]) == 0
    payloads = [json.loads((p / "payload.json").read_text()) for p in cache.iterdir()]
    assert sorted(p.get("text_view", "-") for p in payloads if "text" in p) == ["-", "worddrop"]


def test_runs_seeds_groups_by_recipe(tmp_path: Path, capsys) -> None:
    import yaml

    for name, seed, lr, mr in (("a0", 0, 1e-3, 30.0), ("a1", 1, 1e-3, 32.0), ("b0", 0, 2e-3, 20.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "out_dir": str(d), "optim": {"lr": lr}}))
        val = {"i2t": {"R@1": mr, "R@5": mr, "R@10": mr}, "t2i": {"R@1": mr, "R@5": mr, "R@10": mr}, "mR": mr}
        (d / "summary.json").write_text(json.dumps({"best_val": val, "train_seconds": 10.0,
                                                    "best_val_extras": {"tta": {"mR": mr + 1}}}))  # fmt: skip
    assert run(["runs", "--seeds", *(str(tmp_path / n) for n in ("a0", "a1", "b0"))]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| /")]
    assert len(lines) == 2
    assert "| 0,1 |" in lines[0] and "31.00 ± 1.41" in lines[0] and "32.00 ± 1.41" in lines[0]
    assert "| 0 |" in lines[1] and "20.00 ± 0.00" in lines[1]
