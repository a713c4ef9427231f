"""Fixtures for the data-layer tests: real files under ``../shared`` and tiny fake datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def need_shared(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the test with the reason when it is absent."""
    p = SHARED.joinpath("data", *parts).resolve()
    if not p.exists():
        pytest.skip(f"{p} not found: this test reads the real RSITR files in ../shared beside the repo")
    return p


@pytest.fixture
def formats_dir() -> Path:
    """``../shared/data/formats`` (caption files of RSITMD, UCM, HarMA JSON, Sydney, TIFFs)."""
    return need_shared("formats")


@pytest.fixture
def rsicd_dir() -> Path:
    """``../shared/data/rsicd`` (RSICD images, precomp, Karpathy JSON, labels.csv)."""
    return need_shared("rsicd")


def write_images(root: Path, names: list[str], size: int = 16) -> None:
    """Write small distinct RGB placeholder images (format from the suffix) under ``root``."""
    for k, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        a = np.full((size, size, 3), (k * 37) % 256, dtype=np.uint8)
        a[..., 1] = k % 256
        Image.fromarray(a).save(p)
