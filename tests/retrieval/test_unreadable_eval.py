"""Evaluation with unreadable gallery images: excluded with their captions and named in the
report (never scored with zero features); a split with no readable image is a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.data import load_corpus
from rsitr.errors import DataError
from rsitr.models import create_method
from rsitr.retrieval.embed import evaluate_corpus


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsitr.data.synth import generate_scenes

    out = tmp_path_factory.mktemp("synth")
    generate_scenes(out, n=30, size=64, seed=0, val_frac=1 / 3, test_frac=1 / 3, workers=1)
    return out


def _method() -> object:
    torch.manual_seed(0)
    cfg = {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "image_encoder_kwargs": {"width": 4},
           "text_encoder_kwargs": {"dim": 16}, "embed_dim": 8, "head": "linear"}  # fmt: skip
    return create_method("dual", cfg, pretrained=False).eval()


def test_unreadable_images_are_excluded_and_reported(synth: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth / "images", images)
    corpus = load_corpus(synth / "dataset_synth.json", split="test", images=images)
    bad = [corpus.images[1].filename, corpus.images[4].filename]
    for name in bad:
        (images / name).write_bytes(b"\xff\xd8 not a jpeg")
    method = _method()
    metrics, evaluated, img, txt = evaluate_corpus(method, corpus)
    assert metrics.extra["unreadable_images"] == bad
    assert any("2 unreadable image(s) excluded" in w for w in metrics.extra["warnings"])
    assert evaluated.num_images == corpus.num_images - 2 and img.shape[0] == corpus.num_images - 2
    assert txt.shape[0] == evaluated.num_captions == corpus.num_captions - 10
    # the same numbers as evaluating the readable images alone
    keep = [i for i in range(corpus.num_images) if corpus.images[i].filename not in bad]
    alone, *_ = evaluate_corpus(method, corpus.subset(np.array(keep)))
    assert metrics.mR == pytest.approx(alone.mR) and metrics.i2t == alone.i2t and metrics.t2i == alone.t2i


def test_no_readable_image_is_a_one_line_error(synth: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    corpus = load_corpus(synth / "dataset_synth.json", split="test", images=images)
    for im in corpus.images:
        (images / im.filename).write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 10 images of the split could be read") as err:
        evaluate_corpus(_method(), corpus)
    assert "\n" not in str(err.value) and "dataset_synth.json" in str(err.value)
