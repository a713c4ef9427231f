"""Caption format readers, detection and the registry, on small files written per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsitr.data import detect_format, get_format, list_formats, load_corpus, register_format
from rsitr.errors import ConfigError, DataError
from tests.data.conftest import write_images


def write_precomp(root: Path, split: str, caps: str, names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_caps.txt").write_bytes(caps.encode())
    (root / f"{split}_filename.txt").write_bytes(names.encode())
    return root


# -- precomp ----------------------------------------------------------------------------------


def test_precomp_one_filename_per_image(tmp_path: Path) -> None:
    caps = "".join(f"cap {i} {j}\n" for i in range(3) for j in range(2))
    src = write_precomp(tmp_path / "p", "train", caps, "a.tif\nb.tif\nc.tif\n")
    c = load_corpus(src, split="train")
    assert c.fmt == "precomp" and c.split == "train"
    assert c.filenames() == ["a.tif", "b.tif", "c.tif"]
    assert c.image_captions == [[0, 1], [2, 3], [4, 5]]
    assert c.captions[3] == "cap 1 1"
    assert c.caption_origin[3] == (str(src / "train_caps.txt"), 4)
    assert c.caption_to_image().tolist() == [0, 0, 1, 1, 2, 2]


def test_precomp_one_filename_per_caption_groups_consecutive(tmp_path: Path) -> None:
    src = write_precomp(tmp_path / "p", "test", "x1\nx2\ny1\ny2\ny3\n", "x.tif\nx.tif\ny.tif\ny.tif\ny.tif\n")
    c = load_corpus(src, split="test")
    assert c.filenames() == ["x.tif", "y.tif"]
    assert [len(g) for g in c.image_captions] == [2, 3]
    assert c.warnings == []


def test_precomp_non_consecutive_repeat_is_merged_and_reported(tmp_path: Path) -> None:
    src = write_precomp(tmp_path / "p", "test", "a\nb\nc\n", "x.tif\ny.tif\nx.tif\n")
    c = load_corpus(src, split="test")
    assert c.filenames() == ["x.tif", "y.tif"]
    assert c.image_captions == [[0, 2], [1]]
    assert len(c.warnings) == 1 and "x.tif" in c.warnings[0] and "test_filename.txt:3" in c.warnings[0]


def test_precomp_crlf_and_trailing_blank_line(tmp_path: Path) -> None:
    caps = "a one\r\na two\r\n\r\nb two\r\n\r\n"  # line 3 is an interior blank caption; line 5 trails
    names = "a.tif\r\nb.tif\r\n"
    src = write_precomp(tmp_path / "p", "train", caps, names)
    c = load_corpus(src, split="train")
    assert c.captions == ["a one", "a two", "", "b two"]
    assert all("\r" not in t for t in c.captions)
    assert c.image_captions == [[0, 1], [2, 3]]
    blanks = c.blank_captions
    assert [(b.line, b.image) for b in blanks] == [(3, "b.tif")]
    assert blanks[0].file.endswith("train_caps.txt")
    assert any("ignored 1 blank line" in w and "5-5" in w for w in c.warnings)


def test_precomp_trailing_blank_captions_kept_when_counts_need_them(tmp_path: Path) -> None:
    # The last image's two captions are blank: they are captions, not trailing noise.
    src = write_precomp(tmp_path / "p", "train", "a\nb\n\n\n", "x.tif\ny.tif\n")
    c = load_corpus(src, split="train")
    assert c.num_captions == 4
    assert [b.line for b in c.blank_captions] == [3, 4]


def test_precomp_count_mismatch_names_both_files(tmp_path: Path) -> None:
    src = write_precomp(tmp_path / "p", "train", "a\nb\nc\n", "x.tif\ny.tif\n")
    with pytest.raises(
        DataError, match=r"train_caps\.txt: 3 caption lines do not match 2 lines of train_filename"
    ):
        load_corpus(src, split="train")


def test_precomp_blank_filename_line_is_an_error(tmp_path: Path) -> None:
    src = write_precomp(tmp_path / "p", "train", "a\nb\nc\n", "x.tif\n\ny.tif\n")
    with pytest.raises(DataError, match=r"train_filename\.txt:2: blank file name"):
        load_corpus(src, split="train")


def test_precomp_split_required_when_ambiguous(tmp_path: Path) -> None:
    src = write_precomp(tmp_path / "p", "train", "a\n", "x.tif\n")
    write_precomp(src, "test", "b\n", "y.tif\n")
    with pytest.raises(ConfigError, match="splits test, train"):
        load_corpus(src)
    with pytest.raises(DataError, match="no val_caps.txt"):
        load_corpus(src, split="val", fmt="precomp")
    assert load_corpus(src / "test_caps.txt").filenames() == ["y.tif"]


def test_precomp_invalid_utf8_names_line(tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.mkdir()
    (src / "train_caps.txt").write_bytes(b"ok\n\xff\xfe bad\n")
    (src / "train_filename.txt").write_bytes(b"a.tif\nb.tif\n")
    with pytest.raises(DataError, match=r"train_caps\.txt:2: not UTF-8"):
        load_corpus(src, split="train")


# -- karpathy ---------------------------------------------------------------------------------


def karpathy_file(path: Path) -> Path:
    data = {
        "dataset": "toy",
        "images": [
            {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a 1 ."}, {"raw": "a 2 ."}]},
            {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "b 1 ."}]},
            {"filename": "c.jpg", "split": "train", "sentences": [{"raw": " "}, {"tokens": ["c", "2"]}]},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_karpathy_split_filter_and_all(tmp_path: Path) -> None:
    src = karpathy_file(tmp_path / "dataset_toy.json")
    assert detect_format(src) == "karpathy"
    train = load_corpus(src, split="train")
    assert train.filenames() == ["a.jpg", "c.jpg"]
    assert train.captions == ["a 1 .", "a 2 .", " ", "c 2"]  # tokens are joined when raw is absent
    assert [(b.image, b.line) for b in train.blank_captions] == [("c.jpg", 3)]  # record index, 1-based
    everything = load_corpus(src)
    assert everything.split == "all" and everything.num_images == 3
    assert [im.meta["split"] for im in everything.images] == ["train", "test", "train"]
    with pytest.raises(DataError, match="no image has split 'val'; splits present: test, train"):
        load_corpus(src, split="val")


def test_karpathy_missing_filename_names_field(tmp_path: Path) -> None:
    src = tmp_path / "bad.json"
    src.write_text(json.dumps({"images": [{"split": "train", "sentences": []}]}))
    with pytest.raises(DataError, match=r"bad\.json \[images\[0\]\.filename\]"):
        load_corpus(src)


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    src = tmp_path / "broken.json"
    src.write_text('{\n  "images": [\n    {"filename": }\n  ]\n}\n')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        load_corpus(src, fmt="karpathy")


# -- pir --------------------------------------------------------------------------------------


def test_pir_train_and_test_records(tmp_path: Path) -> None:
    train = [
        {"caption": "x one", "image": "train/x_1.tif", "image_id": 0, "label_name": "harbor", "label": 3},
        {"caption": "y one", "image": "train/y_1.tif", "image_id": 1, "label_name": "beach", "label": 1},
        {"caption": "x two", "image": "train/x_1.tif", "image_id": 0, "label_name": "harbor", "label": 3},
    ]
    test = [{"image": "test/z_9.tif", "caption": ["z a", "z b", ""]}]
    (tmp_path / "toy_train.json").write_text(json.dumps(train))
    (tmp_path / "toy_test.json").write_text(json.dumps(test))
    c = load_corpus(tmp_path / "toy_train.json")
    assert c.fmt == "pir" and c.split == "train"
    assert c.filenames() == ["x_1.tif", "y_1.tif"]
    assert c.image_captions == [[0, 2], [1]]
    assert c.images[0].meta["relpath"] == "train/x_1.tif" and c.images[0].meta["label"] == 3
    assert c.warnings == []  # one record per caption: regrouping is expected, not a repeat
    t = load_corpus(tmp_path / "toy_test.json")
    assert t.split == "test" and t.captions == ["z a", "z b", ""]
    assert [(b.line, b.image) for b in t.blank_captions] == [(1, "z_9.tif")]
    overlap = get_format("pir").split_files(tmp_path / "toy_test.json")
    assert overlap == {"train": ["x_1.tif", "y_1.tif", "x_1.tif"], "test": ["z_9.tif"]}


def test_pir_resolves_images_under_split_folder(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"image": "test/a_1.png", "caption": ["a"]}]))
    write_images(tmp_path / "imgs", ["test/a_1.png"])
    c = load_corpus(tmp_path / "t.json", images=tmp_path / "imgs")
    assert c.images[0].filename == "a_1.png"
    assert c.images[0].path == tmp_path / "imgs" / "test" / "a_1.png"


def test_pir_record_without_caption_names_field(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"image": "test/a.tif", "caption": ["a"]}, {"image": "b"}]))
    with pytest.raises(DataError, match=r"t\.json \[\[1\]\.caption\]"):
        load_corpus(tmp_path / "t.json")


# -- csv --------------------------------------------------------------------------------------


def test_csv_groups_rows_by_filename_in_first_appearance_order(tmp_path: Path) -> None:
    src = tmp_path / "rsitmd_test.csv"
    src.write_text('filename,title\nb.tif,b one\na.tif,"a, with comma"\nb.tif,b two\na.tif,\n\n')
    assert detect_format(src) == "csv"
    c = load_corpus(src)
    assert c.split == "test"
    assert c.filenames() == ["b.tif", "a.tif"]
    assert c.image_captions == [[0, 2], [1, 3]]
    assert c.captions[1] == "a, with comma"
    assert [(b.line, b.image) for b in c.blank_captions] == [(5, "a.tif")]
    assert c.warnings == []  # the empty line at the end is not reported


def test_csv_missing_column_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "x.csv"
    src.write_text("filename,caption\na.tif,hello\n")
    with pytest.raises(DataError, match=r"x\.csv:1 \[title\]: missing column 'title'"):
        load_corpus(src, fmt="csv")


# -- folder -----------------------------------------------------------------------------------


def test_folder_scans_recursively(tmp_path: Path) -> None:
    write_images(tmp_path, ["b/x_1.png", "a_2.jpg", "c.tif", ".hidden/z.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "folder"
    c = load_corpus(tmp_path)
    assert c.fmt == "folder" and c.num_captions == 0
    assert c.filenames() == ["a_2.jpg", "b/x_1.png", "c.tif"]
    assert all(im.path is not None and im.path.is_file() for im in c.images)
    assert [im.scene for im in c.images] == ["a", "x", None]


# -- registry and detection -------------------------------------------------------------------


def test_unknown_format_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="format='coco' is unknown; known formats: precomp, karpathy, pir, csv, folder"
    ):
        load_corpus(tmp_path, fmt="coco")


def test_undetectable_source(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(DataError, match="cannot detect the caption format"):
        load_corpus(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(tmp_path / "missing.json")


def test_duplicate_registration_raises() -> None:
    assert list_formats() == ["precomp", "karpathy", "pir", "csv", "folder"]
    with pytest.raises(ValueError, match="already registered"):
        register_format("csv", detect=lambda s, sp: False, split_files=lambda s: {})(lambda s, sp: None)
