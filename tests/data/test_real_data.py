"""Acceptance checks on the real caption files in ``../shared`` (skipped when it is absent)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from rsitr.cli import run
from rsitr.data import UCM_CLASSES, RetrievalCorpus, check_corpus, load_corpus, read_image_array

RSITMD_BLANKS = {
    "mountain_2378.tif": list(range(9631, 9636)),
    "railwaystation_3254.tif": list(range(14011, 14016)),
    "storagetanks_4367.tif": list(range(19576, 19581)),
    "viaduct_4635.tif": list(range(20916, 20921)),
}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def test_rsitmd_train_blank_captions_via_cli(formats_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = formats_dir / "rsitmd_precomp"
    assert run(["data", "check", str(src), "--split", "train", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["n_images"], r["n_captions"]) == (4291, 21455)
    assert r["images_with_blank_captions"] == list(RSITMD_BLANKS)
    found: dict[str, list[int]] = {}
    for b in r["blank_captions"]:
        assert Path(b["file"]).name == "train_caps.txt"
        found.setdefault(b["image"], []).append(b["line"])
    assert found == RSITMD_BLANKS
    assert r["split_overlap"]["pairs"] == {"test/train": 0}
    assert r["errors"] == [] and r["warnings"]


def test_rsitmd_train_policy_drops_the_four_images(formats_dir: Path) -> None:
    corpus = load_corpus(formats_dir / "rsitmd_precomp", split="train")
    train, _ = corpus.drop_blank_captions("train")
    assert (train.num_images, train.num_captions) == (4287, 21435)
    assert not set(RSITMD_BLANKS) & set(train.filenames())
    evaluation, _ = corpus.drop_blank_captions("eval")
    assert (evaluation.num_images, evaluation.num_captions) == (4291, 21435)


def test_rsitmd_test_precomp_equals_harma_json(formats_dir: Path) -> None:
    precomp = load_corpus(formats_dir / "rsitmd_precomp", split="test")
    harma = load_corpus(formats_dir / "harma_json" / "rsitmd_test.json")
    for c in (precomp, harma):
        assert (c.num_images, c.num_captions) == (452, 2260)

    def caption_sets(c: RetrievalCorpus) -> dict[str, list[str]]:
        return {
            im.filename: sorted(normalise(c.captions[k]) for k in caps)
            for im, caps in zip(c.images, c.image_captions, strict=True)
        }

    a, b = caption_sets(precomp), caption_sets(harma)
    assert set(a) == set(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert {im.meta["relpath"] for im in harma.images} == {f"test/{n}" for n in a}


def test_harma_splits_are_disjoint_and_labels_match_prefix(formats_dir: Path) -> None:
    r = check_corpus(formats_dir / "harma_json" / "rsitmd_train.json")
    assert (r["n_images"], r["n_captions"]) == (3435, 17175)
    assert r["split_overlap"]["splits"] == {"test": 452, "train": 3435, "val": 856}
    assert r["split_overlap"]["images"] == 0
    corpus = load_corpus(formats_dir / "harma_json" / "rsitmd_train.json")
    assert {im.meta["scene_source"] for im in corpus.images} == {"label_name"}
    assert all(im.scene == im.filename.rsplit("_", 1)[0] for im in corpus.images)
    assert len(corpus.label_map()) == 33


def test_rsicd_val_check_with_images(rsicd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "check", str(rsicd_dir / "dataset_rsicd.json"), "--images", str(rsicd_dir / "images")]
    assert run([*argv, "--split", "val", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["n_images"], r["n_captions"]) == (1093, 5465)
    assert r["missing_images"] == []
    assert r["duplicate_captions_across_images"] > 0
    assert r["split_overlap"]["pairs"] == {"train/val": 0}
    assert r["errors"] == []


def test_rsicd_precomp_train_is_json_train_plus_val_and_labels_cover_it(rsicd_dir: Path) -> None:
    precomp = load_corpus(rsicd_dir, split="train", labels=rsicd_dir / "labels.csv")
    js = load_corpus(rsicd_dir / "dataset_rsicd.json")
    assert (precomp.num_images, precomp.num_captions) == (9828, 49140)
    assert set(precomp.filenames()) == set(js.filenames())
    assert sum(im.scene is not None for im in precomp.images) == 9828
    assert len(precomp.label_map()) == 31
    assert precomp.images[precomp.filenames().index("00001.jpg")].scene == "playfields"
    identical = sum(len({precomp.captions[c] for c in caps}) == 1 for caps in precomp.image_captions)
    assert identical == 4851


def test_rsicd_images_decode(rsicd_dir: Path) -> None:
    out = read_image_array(rsicd_dir / "images" / "00001.jpg")
    assert out.shape == (224, 224, 3)


def test_ucm_test_labels(formats_dir: Path) -> None:
    corpus = load_corpus(formats_dir / "ucm_precomp", split="test")
    assert (corpus.num_images, corpus.num_captions) == (210, 1050)
    assert corpus.images[0].filename == "81.tif" and corpus.images[0].scene == "agricultural"
    assert Counter(im.scene for im in corpus.images) == {c: 10 for c in UCM_CLASSES}


def test_sydney_karpathy_splits(formats_dir: Path) -> None:
    src = formats_dir / "sydney_karpathy" / "dataset_sydney.json"
    sizes = {s: load_corpus(src, split=s).num_images for s in ("train", "val", "test")}
    assert sizes == {"train": 497, "val": 58, "test": 58}
    assert load_corpus(src).num_captions == 613 * 5


def test_rsicd_random_val_profile(rsicd_dir: Path) -> None:
    """The shared val was carved at random: its profile is far from the RSICD test split's."""
    r = check_corpus(rsicd_dir / "dataset_rsicd.json", split="val")
    p = r["profile"]
    assert p["reference"] == "train split"
    assert p["identical_fraction"] == pytest.approx(0.508, abs=0.001)
    assert p["distinct_per_image"] == pytest.approx(2.08, abs=0.005)
    assert p["verbatim_overlap"] == pytest.approx(0.393, abs=0.001)


@pytest.mark.slow
def test_rsicd_test_like_split(rsicd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rsitr data split --profile rsicd-test` carves a val whose profile is the test split's."""
    out = tmp_path / "split.json"
    args = ["data", "split", str(rsicd_dir / "dataset_rsicd.json"), "--images", str(rsicd_dir / "images"),
            "--labels", str(rsicd_dir / "labels.csv"), "--out", str(out), "--json"]  # fmt: skip
    assert run(args) == 0
    got = json.loads(capsys.readouterr().out)["val_profile"]
    assert abs(got["n_images"] - 1093) <= 2  # units of up to 5 images: within two of the target
    assert got["distinct_per_image"] == pytest.approx(3.31, abs=0.06)
    assert got["identical_fraction"] <= 0.01
    assert got["verbatim_overlap"] == pytest.approx(0.111, abs=0.006)
    val = load_corpus(out, split="val")
    distinct = [len({normalise(val.captions[c]) for c in caps}) for caps in val.image_captions]
    assert sum(d < 2 for d in distinct) <= 11  # at most 1 % (the test split has 2 such images)
    train = load_corpus(out, split="train")
    assert train.num_images + val.num_images == 9828 and not set(train.filenames()) & set(val.filenames())
    # runs of consecutive file numbers (blocks of 5 per scene) never straddle the split
    labels = rsicd_dir / "labels.csv"
    val, train = load_corpus(out, split="val", labels=labels), load_corpus(out, split="train", labels=labels)

    def block(im) -> tuple:
        stem = Path(im.filename).stem
        return im.scene, re.sub(r"\d+$", "", stem), int(re.findall(r"\d+", stem)[-1]) // 5

    assert not {block(im) for im in val.images} & {block(im) for im in train.images}


def test_rsicd_test_split_profile_matches_the_shipped_target(formats_dir: Path, rsicd_dir: Path) -> None:
    """The rsicd-test target is the profile of the real RSICD test split's captions."""
    from rsitr.data.splitting import PROFILES

    r = check_corpus(
        formats_dir / "harma_json" / "rsicd_test.json", reference=rsicd_dir / "dataset_rsicd.json"
    )
    p, t = r["profile"], PROFILES["rsicd-test"]
    assert p["n_images"] == t.n_images
    assert p["distinct_per_image"] == pytest.approx(t.distinct_per_image, abs=0.005)
    assert p["identical_fraction"] == pytest.approx(t.identical_fraction, abs=0.001)
    assert p["verbatim_overlap"] == pytest.approx(0.116, abs=0.001)  # against train + the old val
