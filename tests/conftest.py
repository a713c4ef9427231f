"""Shared fixtures: the ``../shared`` folder beside the repo, offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the test with a reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: this test needs the ../shared folder beside the repo")
    return p


@pytest.fixture
def shared() -> Path:
    """The ``../shared`` folder (skip when absent)."""
    return shared_path()
