"""Scene labels: rules, precedence and the training-split label map."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rsitr.data import (
    UCM_CLASSES,
    assign_scenes,
    infer_dataset,
    load_corpus,
    read_labels_csv,
    scene_from_filename,
)
from rsitr.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("name", "dataset", "scene"),
    [
        ("storagetanks_4367.tif", None, "storagetanks"),
        ("airport_348.jpg", "rsicd", "airport"),
        ("test/boat_0.tif", None, "boat"),
        ("00001.jpg", "rsicd", None),  # numeric names carry no class
        ("plain.tif", None, None),  # no underscore
        ("a1_2.tif", None, None),  # prefix not alphabetic
        ("_3.tif", None, None),  # empty prefix
        ("81.tif", "ucm", "agricultural"),
        ("100.tif", "ucm", "agricultural"),
        ("101.tif", "ucm", "airplane"),
        ("2100.tif", "ucm", "tenniscourt"),
        ("2101.tif", "ucm", None),
        ("81.tif", None, None),  # the UCM rule only applies to UCM
        ("81.tif", "sydney", None),
    ],
)
def test_scene_from_filename(name: str, dataset: str | None, scene: str | None) -> None:
    assert scene_from_filename(name, dataset) == scene


def test_ucm_classes_are_the_21_alphabetical_classes() -> None:
    assert len(UCM_CLASSES) == 21 and list(UCM_CLASSES) == sorted(UCM_CLASSES)


def test_infer_dataset_from_source_name() -> None:
    assert infer_dataset("data/ucm_precomp") == "ucm"
    assert infer_dataset("x/UCM_captions/dataset.json") == "ucm"
    assert infer_dataset("x/UCMerced/dataset.json") == "ucm"
    assert infer_dataset("rsitmd_precomp/test_caps.txt") == "rsitmd"
    assert infer_dataset("ucm/a/dataset.json") is None  # a file: its own and its parent's name only
    assert infer_dataset("ucm_lab/other_precomp") is None  # a directory: its own name only
    assert infer_dataset("data/bucm_precomp") is None  # words must start with the name


def test_label_precedence_csv_over_label_name_over_rule(tmp_path: Path) -> None:
    records = [
        {"caption": "c", "image": "train/harbor_1.tif", "label_name": "port", "label": 0},
        {"caption": "c", "image": "train/harbor_2.tif", "label_name": "port", "label": 0},
        {"caption": "c", "image": "train/beach_3.tif"},
        {"caption": "c", "image": "train/0042.tif"},
    ]
    src = tmp_path / "toy_train.json"
    src.write_text(json.dumps(records))
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,scene\r\nharbor_1.tif,wharf\r\n")
    c = load_corpus(src, labels=labels)
    assert [im.scene for im in c.images] == ["wharf", "port", "beach", None]
    assert [im.meta.get("scene_source") for im in c.images] == [
        "labels_csv",
        "label_name",
        "rule:prefix",
        None,
    ]
    assert any("3 image(s) not listed in the labels file" in w for w in c.warnings)
    plain = load_corpus(src)
    assert [im.scene for im in plain.images] == ["port", "port", "beach", None]


def test_ucm_rule_applies_only_to_ucm(tmp_path: Path) -> None:
    for d in ("ucm_precomp", "other_precomp"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test_caps.txt").write_text("a\nb\n")
        (tmp_path / d / "test_filename.txt").write_text("1.tif\n201.tif\n")
    assert [im.scene for im in load_corpus(tmp_path / "ucm_precomp").images] == [
        "agricultural",
        "baseballdiamond",
    ]
    assert [im.scene for im in load_corpus(tmp_path / "other_precomp").images] == [None, None]
    forced = load_corpus(tmp_path / "other_precomp", dataset="ucm")
    assert [im.scene for im in forced.images] == ["agricultural", "baseballdiamond"]
    with pytest.raises(ConfigError, match="dataset='coco' is unknown"):
        load_corpus(tmp_path / "other_precomp", dataset="coco")


def test_labels_csv_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("filename,scene\na.tif,beach\na.tif,forest\n")
    with pytest.raises(DataError, match=r"labels\.csv:3: a\.tif is listed with scenes 'beach' and 'forest'"):
        read_labels_csv(p)
    p.write_text("filename,scene\nb.tif,\n")
    with pytest.raises(DataError, match=r"labels\.csv:2: expected a file name and a scene"):
        read_labels_csv(p)
    p.write_text("name,scene\n")
    with pytest.raises(DataError, match=r"labels\.csv:1 \[filename\]"):
        read_labels_csv(p)


def test_label_map_from_train_and_unknown_scene_in_test(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for split, names in (("train", "beach_1.tif\nforest_2.tif\n"), ("test", "beach_9.tif\ndesert_8.tif\n")):
        (tmp_path / f"{split}_caps.txt").write_text("a\nb\n")
        (tmp_path / f"{split}_filename.txt").write_text(names)
    train = load_corpus(tmp_path, split="train")
    test = load_corpus(tmp_path, split="test")
    label_map = train.label_map()
    assert label_map == {"beach": 0, "forest": 1}
    with caplog.at_level(logging.WARNING):
        ids = test.scene_ids(label_map)
    assert ids.tolist() == [0, -1]
    assert "desert (1)" in caplog.text


def test_assign_scenes_accepts_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "test_caps.txt").write_text("a\n")
    (tmp_path / "test_filename.txt").write_text("sub/00001.jpg\n")
    c = assign_scenes(load_corpus(tmp_path), labels={"00001.jpg": "playfields"})
    assert c.images[0].scene == "playfields"  # matched by basename
