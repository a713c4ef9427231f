"""Fixtures: a tiny synthetic corpus written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic scenes at 64 px (splits 80/20/20)."""
    from rsitr.data.synth import generate_scenes

    out = tmp_path_factory.mktemp("synth")
    generate_scenes(out, n=120, size=64, seed=0, val_frac=1 / 6, test_frac=1 / 6, workers=1)
    return out


def tiny_overrides(synth: Path, out: Path, **extra: object) -> list[str]:
    """Config overrides for a fast CPU run with the random tiny towers."""
    base = {
        "data.source": synth / "dataset_synth.json",
        "data.images": synth / "images",
        "data.labels": synth / "labels.csv",
        "data.image_size": 64,
        "model.image_encoder": "tiny-cnn",
        "model.text_encoder": "tiny-text",
        "model.image_encoder_kwargs": "{width: 8}",
        "model.text_encoder_kwargs": "{dim: 32}",
        "model.freeze_image": "false",
        "model.freeze_text": "false",
        "model.embed_dim": 32,
        "model.head": "linear",
        "optim.epochs": 2,
        "optim.batch_size": 32,
        "optim.lr": 3e-3,
        "optim.backbone_lr": 3e-3,
        "cache.enabled": "off",
        "cache.dir": out / "cache",
        "out_dir": out / "run",
        "log_every": 1,
        "pretrained": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
