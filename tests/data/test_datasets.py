"""Datasets over a corpus: items, blank captions, skip-and-report for unreadable images."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from rsitr.data import (
    CaptionDataset,
    CaptionPairDataset,
    EvalTransform,
    ImageDataset,
    collate_skip_failed,
    load_corpus,
)
from rsitr.errors import ConfigError, DataError
from tests.data.conftest import write_images


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "caps"
    src.mkdir()
    (src / "train_caps.txt").write_text("beach one\nbeach two\nforest one\n\nbad one\nbad two\n")
    (src / "train_filename.txt").write_text("beach_1.png\nforest_2.png\nriver_3.png\n")
    imgs = tmp_path / "imgs"
    write_images(imgs, ["beach_1.png", "forest_2.png"], size=20)
    (imgs / "river_3.png").write_bytes(b"not a png")
    return src, imgs


def test_caption_pairs_drop_blank_and_flag_broken_images(
    toy: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    src, imgs = toy
    ds = CaptionPairDataset(
        load_corpus(src, split="train", images=imgs), transform=EvalTransform(8, (0, 0, 0), (1, 1, 1))
    )
    assert len(ds) == 5  # the blank caption of forest_2 is dropped, with a warning
    assert any("train_caps.txt:4" in w for w in ds.warnings)
    item = ds[0]
    assert item["caption"] == "beach one" and item["image"].shape == (3, 8, 8)
    assert (item["image_id"], item["caption_id"], item["failed"]) == (0, 0, False)
    assert ds.label_map == {"beach": 0, "forest": 1, "river": 2} and item["scene"] == 0
    bad = ds[3]
    assert bad["failed"] and bad["image"] is None and "river_3.png" in bad["error"]
    assert len(ds.failures) == 1
    with caplog.at_level(logging.WARNING):
        batch = collate_skip_failed([ds[i] for i in range(5)])
    assert batch is not None and batch["num_dropped"] == 2
    assert batch["image"].shape == (3, 3, 8, 8)
    assert batch["caption"] == ["beach one", "beach two", "forest one"]
    assert batch["image_id"].tolist() == [0, 0, 1] and batch["image_id"].dtype == torch.int64
    assert "failed" not in batch and "river_3.png" in caplog.text
    assert collate_skip_failed([ds[3]]) is None


def test_fail_policy_raises(toy: tuple[Path, Path]) -> None:
    src, imgs = toy
    ds = ImageDataset(load_corpus(src, split="train", images=imgs), on_error="fail")
    assert ds[0]["image"].shape == (3, 20, 20)
    with pytest.raises(DataError, match="river_3.png"):
        ds[2]


def test_eval_datasets_with_dataloader(toy: tuple[Path, Path]) -> None:
    src, imgs = toy
    corpus, _ = load_corpus(src, split="train", images=imgs).drop_blank_captions("eval")
    images = ImageDataset(corpus, transform=EvalTransform(8, (0, 0, 0), (1, 1, 1)))
    batches = list(DataLoader(images, batch_size=2, collate_fn=collate_skip_failed))
    # the second batch held only the unreadable image: it collates to None (skip the step)
    assert [None if b is None else b["image_id"].tolist() for b in batches] == [[0, 1], None]
    captions = CaptionDataset(corpus)
    assert len(captions) == 5 and captions[2] == {"caption": "forest one", "caption_id": 2, "image_id": 1}


def test_caption_dataset_refuses_blank_captions(toy: tuple[Path, Path]) -> None:
    src, _ = toy
    with pytest.raises(DataError, match=r"train_caps\.txt:4: blank caption of forest_2\.png"):
        CaptionDataset(load_corpus(src, split="train"))


def test_image_datasets_need_paths(toy: tuple[Path, Path]) -> None:
    src, _ = toy
    with pytest.raises(ConfigError, match="pass images="):
        ImageDataset(load_corpus(src, split="train"))
