"""Synthetic scene dataset: determinism, layout of the output, captions and hard negatives."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.data.synth import (
    IMAGE_DIR,
    JSON_NAME,
    LABELS_NAME,
    SCENE_CLASSES,
    captions_for,
    generate_scenes,
    make_sibling,
    plan_scenes,
    render_scene,
    sample_scene_spec,
)
from rsitr.errors import ConfigError

N, SIZE = 50, 96


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate_scenes(out, n=N, size=SIZE, seed=0, workers=1)
    return out


@pytest.fixture(scope="module")
def dataset(synth_dir: Path) -> dict:
    return json.loads((synth_dir / JSON_NAME).read_text())


def test_same_seed_same_bytes_different_seed_differs(synth_dir: Path, tmp_path: Path) -> None:
    generate_scenes(tmp_path / "b", n=N, size=SIZE, seed=0, workers=1)
    generate_scenes(tmp_path / "c", n=N, size=SIZE, seed=1, workers=1)
    a, b, c = _files(synth_dir), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a[JSON_NAME] != c[JSON_NAME]
    shared = set(a) & set(c)
    assert sum(a[k] != c[k] for k in shared if k.startswith(IMAGE_DIR)) == N


def test_workers_do_not_change_bytes(tmp_path: Path) -> None:
    generate_scenes(tmp_path / "serial", n=24, size=64, seed=3, workers=1)
    generate_scenes(tmp_path / "parallel", n=24, size=64, seed=3, workers=2)
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")


def test_output_is_complete(synth_dir: Path, dataset: dict) -> None:
    images = dataset["images"]
    assert dataset["dataset"] == "synth"
    assert len(images) == N
    assert not list(synth_dir.rglob("*.tmp"))
    on_disk = sorted(p.name for p in (synth_dir / IMAGE_DIR).iterdir())
    assert on_disk == sorted(im["filename"] for im in images)
    for im in images:
        with Image.open(synth_dir / IMAGE_DIR / im["filename"]) as img:
            assert img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_karpathy_fields_and_splits(dataset: dict) -> None:
    images = dataset["images"]
    assert [im["imgid"] for im in images] == list(range(N))
    sentids = [sid for im in images for sid in im["sentids"]]
    assert sentids == list(range(5 * N))
    for im in images:
        assert len(im["sentences"]) == 5
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        assert all(s["imgid"] == im["imgid"] for s in im["sentences"])
        assert all(s["tokens"] == s["raw"].split()[:-1] for s in im["sentences"])
    splits = [im["split"] for im in images]
    assert set(splits) == {"train", "val", "test"}
    assert 5 <= splits.count("test") <= 8 and 5 <= splits.count("val") <= 8


def test_siblings_share_a_split_and_splits_are_stratified(tmp_path: Path) -> None:
    summary = generate_scenes(tmp_path, n=600, size=32, seed=0, workers=1)
    images = json.loads(summary.json_path.read_text())["images"]
    _, parents = plan_scenes(600, seed=0)
    assert summary.num_siblings == sum(p is not None for p in parents) > 100
    for i, p in enumerate(parents):
        if p is not None:
            assert images[i]["split"] == images[p]["split"]
    for scene in SCENE_CLASSES:
        mine = [im for im in images if im["filename"].rsplit("_", 1)[0] == scene]
        assert 0.6 < sum(im["split"] == "train" for im in mine) / len(mine) < 0.95


def test_labels_csv_matches_json(synth_dir: Path, dataset: dict) -> None:
    with open(synth_dir / LABELS_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["filename"] for r in rows] == [im["filename"] for im in dataset["images"]]
    for r in rows:
        assert r["scene"] in SCENE_CLASSES and r["scene"].isalpha()  # RSITMD-style prefix rule
        assert r["filename"].rsplit("_", 1)[0] == r["scene"]
    assert len({r["scene"] for r in rows}) >= 10


def test_captions_are_rsicd_style(dataset: dict) -> None:
    raws = [s["raw"] for im in dataset["images"] for s in im["sentences"]]
    assert all(r.endswith(" .") and r == r.lower() and "  " not in r for r in raws)
    assert len(set(raws)) > 0.8 * len(raws)  # mostly distinct, some repeats allowed


def test_generic_captions_repeat_across_images(tmp_path: Path) -> None:
    specs, _ = plan_scenes(240, seed=0)
    caps = [c for i, s in enumerate(specs) for c in captions_for(s, np.random.default_rng(i))]
    assert any(caps.count(c) > 1 for c in caps if c.startswith(("this is", "it is")))


@pytest.mark.parametrize("scene", SCENE_CLASSES)
def test_different_small_counts_give_different_captions(scene: str) -> None:
    spec = sample_scene_spec(np.random.default_rng(7), scene)
    g = spec.small[0]
    other = g.count + 1 if g.count < 3 else g.count - 1
    changed = replace(spec, small=(replace(g, count=other), *spec.small[1:]))
    a = captions_for(spec, np.random.default_rng(0))
    b = captions_for(changed, np.random.default_rng(0))
    assert len(set(a) & set(b)) <= 1


def test_generated_siblings_are_hard_negatives() -> None:
    specs, parents = plan_scenes(120, seed=0)
    pairs = [(specs[p], specs[i]) for i, p in enumerate(parents) if p is not None]
    assert len(pairs) > 10
    for a, b in pairs:
        assert a.scene == b.scene and a.layout_seed == b.layout_seed
        assert a.structures == b.structures and a.medium == b.medium
        assert a.small != b.small
        ca = captions_for(a, np.random.default_rng(0))
        cb = captions_for(b, np.random.default_rng(0))
        assert set(ca) != set(cb)


def test_sibling_pixels_differ_only_locally() -> None:
    for k, scene in enumerate(SCENE_CLASSES):
        rng = np.random.default_rng(k)
        spec = sample_scene_spec(rng, scene)
        a = np.asarray(render_scene(spec, 128), np.int16)
        b = np.asarray(render_scene(make_sibling(spec, rng), 128), np.int16)
        changed = np.abs(a - b).max(axis=2) > 0
        assert 0 < changed.mean() < 0.12, scene


def test_render_is_deterministic_and_sized() -> None:
    spec = sample_scene_spec(np.random.default_rng(1), "airport")
    a, b = render_scene(spec, 80), render_scene(spec, 80)
    assert a.size == (80, 80) and a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"size": 8}, {"val_frac": 0.6, "test_frac": 0.5}, {"image_format": "gif"}],
)
def test_bad_options_raise_config_error(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate_scenes(tmp_path, **kwargs)


def test_out_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="out_dir"):
        generate_scenes(tmp_path / "f", n=2)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsitr.cli import run

    assert run(["synth", str(tmp_path / "out"), "--n", "13", "--size", "48", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "13 images" in out and len(out.strip().splitlines()) == 1
    assert (tmp_path / "out" / JSON_NAME).is_file()
    assert run(["synth", str(tmp_path / "bad"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
