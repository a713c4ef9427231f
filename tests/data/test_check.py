"""``check_corpus`` and ``rsitr data check`` on small datasets written per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rsitr.cli import run
from rsitr.data import check_corpus
from tests.data.conftest import write_images

REPORT_KEYS = {
    "n_images", "n_captions", "captions_per_image", "blank_captions", "images_with_blank_captions",
    "duplicate_captions_across_images", "missing_images", "corrupt_images", "split_overlap",
    "labelled_images", "errors", "warnings",
}  # fmt: skip


@pytest.fixture
def precomp(tmp_path: Path) -> Path:
    src = tmp_path / "toy_precomp"
    src.mkdir()
    (src / "train_caps.txt").write_text("a road .\na road .\n\n\nsame .\nother .\n")
    (src / "train_filename.txt").write_text("road_1.png\npark_2.png\nlake_3.png\n")
    (src / "test_caps.txt").write_text("same .\nq .\n")
    (src / "test_filename.txt").write_text("lake_3.png\nsea_4.png\n")
    return src


def test_report_contents(precomp: Path) -> None:
    r = check_corpus(precomp, split="train")
    assert r.keys() >= REPORT_KEYS
    assert (r["n_images"], r["n_captions"]) == (3, 6)
    assert r["captions_per_image"] == {"2": 3}
    assert [(b["line"], b["image"]) for b in r["blank_captions"]] == [(3, "park_2.png"), (4, "park_2.png")]
    assert r["blank_captions"][0]["file"].endswith("train_caps.txt")
    assert r["images_with_blank_captions"] == ["park_2.png"]
    assert r["duplicate_captions_across_images"] == 0
    assert r["duplicate_captions_within_images"] == {"images": 1, "captions": 1, "images_all_identical": 1}
    assert r["missing_images"] is None and r["corrupt_images"] is None
    assert r["split_overlap"]["pairs"] == {"test/train": 1} and r["split_overlap"]["examples"] == [
        "lake_3.png"
    ]
    assert r["labelled_images"] == 3
    assert r["errors"] == []
    assert any("park_2.png" in w and "train_caps.txt:3-4" in w for w in r["warnings"])
    assert any("more than one split" in w for w in r["warnings"])


def test_missing_and_corrupt_images_make_it_unusable(precomp: Path, tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    write_images(imgs, ["road_1.png"])
    (imgs / "park_2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = check_corpus(precomp, split="train", images=imgs, deep=True)
    assert r["missing_images"] == ["lake_3.png"]
    assert [c["image"] for c in r["corrupt_images"]] == ["park_2.png"]
    assert r["image_summary"]["sizes"] == {"16x16": 1}
    assert len(r["errors"]) == 2


def test_cli_json_exit_codes(precomp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["data", "check", str(precomp), "--split", "train", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_captions"] == 6 and len(r["blank_captions"]) == 2
    assert run(["data", "check", str(precomp), "--split", "train", "--images", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["missing_images"] == ["road_1.png", "park_2.png", "lake_3.png"]
    assert "not usable: 3 of 3 image(s) not found" in captured.err


def test_cli_table_and_usage_errors(precomp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["data", "check", str(precomp), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "usable" in out and "images" in out and "[precomp, test]" in out
    assert run(["data", "check", str(precomp)]) == 2  # two splits and no --split
    assert "splits test, train" in capsys.readouterr().err
    assert run(["data", "check", str(precomp), "--split", "train", "--format", "tsv"]) == 2
    assert "known formats: precomp, karpathy, pir, csv, folder" in capsys.readouterr().err


def test_unreadable_source_reports_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("[{")
    assert run(["data", "check", str(bad), "--format", "pir", "--json"]) == 2
    r = json.loads(capsys.readouterr().out)
    assert r["n_images"] == 0 and "invalid JSON" in r["errors"][0]


def test_no_captions_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("filename,title\n")
    assert check_corpus(tmp_path / "e.csv")["errors"] == ["no captions"]


def test_folder_check_with_deep(tmp_path: Path) -> None:
    write_images(tmp_path, ["a_1.png", "b_2.jpg"])
    Image.new("L", (5, 7)).save(tmp_path / "c.png")
    r = check_corpus(tmp_path, deep=True)
    assert r["n_images"] == 3 and r["errors"] == [] and r["missing_images"] == []
    assert r["image_summary"]["modes"] == {"RGB": 2, "L": 1}
