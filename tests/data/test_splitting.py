"""``rsitr data split`` and the split profile of ``rsitr data check`` on synthetic corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.cli import run
from rsitr.data import check_corpus, load_corpus
from rsitr.data.splitting import (
    SplitTarget,
    carve_split,
    make_split,
    near_duplicate_groups,
    perceptual_hashes,
    split_profile,
)
from rsitr.errors import ConfigError

SCENES = ("airport", "farmland", "harbor")


def _texture(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def _corpus(root: Path, n_per_scene: int = 40) -> tuple[Path, Path, dict[str, dict]]:
    """A Karpathy JSON with a known make-up per image.

    Per scene: a quarter 'identical' images (5 copies of one caption also used by another image),
    a quarter 'shared' images (3 distinct captions, 2 of them shared with another scene image),
    half 'unique' images (5 distinct captions found nowhere else). Images k and k+1 of the
    unique ones with k % 10 == 0 are pixel-identical (near duplicates).
    """
    images = root / "images"
    images.mkdir(parents=True)
    recs, kinds, labels = [], {}, ["filename,scene"]
    for s, scene in enumerate(SCENES):
        for k in range(n_per_scene):
            name = f"{scene}_{k}.png"
            q = k % 4
            if q == 0:
                caps = [f"{scene} common view {k // 8} ."] * 5
                kind = "identical"
            elif q == 1:
                caps = [f"{scene} shared a {k // 8} .", f"{scene} shared b {k // 8} ."] + [
                    f"{scene} own {k} {j} ." for j in range(3)
                ]
                kind = "shared"
            else:
                caps = [f"{scene} unique {k} number {j} ." for j in range(5)]
                kind = "unique"
            seed = 1000 * s + (k - 1 if q == 3 and k % 10 == 3 else k)
            Image.fromarray(_texture(seed)).save(images / name)
            split = "val" if k % 10 == 9 else "train"
            recs.append({"filename": name, "split": split, "sentences": [{"raw": c} for c in caps]})
            kinds[name] = {"kind": kind, "scene": scene, "seed": seed}
            labels.append(f"{name},{scene}")
    src = root / "dataset_toy.json"
    src.write_text(json.dumps({"dataset": "toy", "images": recs}))
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return src, images, kinds


@pytest.fixture
def toy(tmp_path: Path):
    return _corpus(tmp_path)


def test_profile_figures_by_hand(toy) -> None:
    src, images, kinds = toy
    c = load_corpus(src, images=images, labels=src.parent / "labels.csv")
    p = split_profile(c)
    n = len(kinds)
    n_ident = sum(v["kind"] == "identical" for v in kinds.values())
    n_shared = sum(v["kind"] == "shared" for v in kinds.values())
    assert p["n_images"] == n and p["captions_per_image"] == 5
    assert p["identical_fraction"] == pytest.approx(n_ident / n)
    assert p["distinct_per_image"] == pytest.approx(
        (n_ident * 1 + n_shared * 5 + (n - n_ident - n_shared) * 5) / n
    )
    # identical images: their caption is shared by the two images k//8 (both q == 0 → k, k+4);
    # shared images: 2 of 5 captions shared (k//8 pairs)
    assert p["verbatim_overlap"] == pytest.approx((n_ident * 5 + n_shared * 2) / (5 * n))
    assert p["scene_mix"] == pytest.approx({s: 1 / 3 for s in SCENES})


def test_profile_against_a_reference(toy) -> None:
    src, images, _ = toy
    val = load_corpus(src, split="val")
    train = load_corpus(src, split="train")
    p = split_profile(val, train)
    texts_train = {" ".join(t.lower().split()).rstrip(" .") for t in train.captions}
    want = np.mean([" ".join(t.lower().split()).rstrip(" .") in texts_train for t in val.captions])
    assert p["verbatim_overlap"] == pytest.approx(want)
    r = check_corpus(src, split="val")
    assert r["profile"]["reference"] == "train split"
    assert r["profile"]["verbatim_overlap"] == pytest.approx(want)


def test_phash_finds_pixel_duplicates_and_nothing_else(toy) -> None:
    src, images, kinds = toy
    names = sorted(kinds)
    bits = perceptual_hashes([images / n for n in names])
    groups = near_duplicate_groups(bits, 4)
    seeds = [kinds[n]["seed"] for n in names]
    for i in range(len(names)):
        for j in range(len(names)):
            assert (groups[i] == groups[j]) == (seeds[i] == seeds[j]), (names[i], names[j])


def test_carve_hits_the_target_and_keeps_duplicates_together(toy, tmp_path) -> None:
    src, images, kinds = toy
    target = SplitTarget(n_images=24, distinct_per_image=5.0, identical_fraction=0.0, verbatim_overlap=0.05,
                         min_distinct=3)  # fmt: skip
    out, res = make_split(
        src, images, target, labels=src.parent / "labels.csv", seed=3, out=tmp_path / "o.json"
    )
    p = res.profile
    assert p["n_images"] == 24
    assert p["identical_fraction"] == 0.0  # min_distinct 3 keeps them out
    assert p["distinct_per_image"] == 5.0
    assert p["verbatim_overlap"] == pytest.approx(0.05, abs=0.02)  # 3 'shared' images of 24
    assert p["scene_mix"] == pytest.approx({s: 1 / 3 for s in SCENES})  # stratified: 8 per scene
    new = load_corpus(out, split="val")
    val_names = set(new.filenames())
    assert len(val_names) == 24
    by_seed: dict[int, set[str]] = {}
    for name, v in kinds.items():
        by_seed.setdefault(v["seed"], set()).add(name)
    for group in by_seed.values():  # near duplicates on one side
        assert len(group & val_names) in (0, len(group))
    train = load_corpus(out, split="train")
    assert train.num_images + new.num_images == len(kinds) and not set(train.filenames()) & val_names
    assert json.loads(out.read_text())["rsitr_split"]["seed"] == 3
    # deterministic
    _, again = make_split(
        src, images, target, labels=src.parent / "labels.csv", seed=3, out=tmp_path / "p.json"
    )
    np.testing.assert_array_equal(res.val, again.val)


def test_carve_moves_towards_the_target_from_a_random_start(toy) -> None:
    src, _, _ = toy
    pool = load_corpus(src, labels=src.parent / "labels.csv")
    low = carve_split(
        pool, SplitTarget(n_images=30, distinct_per_image=5, identical_fraction=0, verbatim_overlap=0)
    )
    high = carve_split(pool, SplitTarget(n_images=30, distinct_per_image=3.0, identical_fraction=0.5,
                                         verbatim_overlap=0.6))  # fmt: skip
    assert low.profile["verbatim_overlap"] < 0.02 and low.profile["identical_fraction"] == 0
    assert high.profile["identical_fraction"] > 0.4
    assert high.profile["verbatim_overlap"] > low.profile["verbatim_overlap"] + 0.15
    with pytest.raises(ConfigError, match="eligible"):
        carve_split(pool, SplitTarget(n_images=100, min_distinct=3))


def test_cli_split_writes_next_to_the_input_and_never_over_it(toy, capsys) -> None:
    src, images, _ = toy
    before = src.read_bytes()
    code = run(["data", "split", str(src), "--images", str(images), "--profile", "custom", "--n-val", "12",
                "--distinct", "5", "--identical", "0", "--overlap", "0", "--json"])  # fmt: skip
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    out = Path(got["out"])
    assert out.parent == src.parent and out != src and out.name == "dataset_toy.custom-s0.json"
    assert src.read_bytes() == before
    assert got["val_profile"]["n_images"] == 12
    assert run(["data", "split", str(src), "--images", str(images), "--n-val", "12", "--out", str(src)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert run(["data", "split", str(src), "--images", str(images), "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and len(err.strip().splitlines()) == 1


def test_cli_check_prints_the_profile(toy, capsys) -> None:
    src, _, _ = toy
    assert run(["data", "check", str(src), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "distinct captions per image" in out and "captions also in train split" in out
