"""``rsitr index build`` SIGKILLed (``RSITR_CRASH_AT``) mid-embedding, after the new FAISS file but
before the manifest, and after the manifest: the index stays searchable after every kill and a
re-run completes it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rsitr.retrieval.index import Index, build_index
from tests.search.conftest import SearchAssets

pytestmark = pytest.mark.slow


def _build(archive: Path, ckpt: Path, out: Path, crash_at: str | None = None) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RSITR_CRASH_AT", None)
    if crash_at:
        env["RSITR_CRASH_AT"] = crash_at
    argv = [sys.executable, "-m", "rsitr", "index", "build", str(archive), "--checkpoint", str(ckpt),
            "--out", str(out), "--batch-size", "4"]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600).returncode


def test_killed_index_build_stays_searchable_and_completes(
    assets: SearchAssets, archive_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    build_index(archive_copy, assets.ckpt, out)  # generation 1: 40 images
    caption, image = assets.query
    for i, src in enumerate(sorted(archive_copy.glob("*.jpg"))[:10]):
        shutil.copyfile(src, archive_copy / f"new_{i:02d}.jpg")
    for point in ("index-batch-2", "index-publish", "index-cleanup"):
        assert _build(archive_copy, assets.ckpt, out, point) == -signal.SIGKILL, point
        with Index.open(out, assets.ckpt) as ix:  # searchable after the kill
            assert ix.search_text(caption, k=1)[0].name == image, point
            assert (ix.generation, ix.count) in {(1, 40), (2, 50)}, point
    assert _build(archive_copy, assets.ckpt, out) == 0
    with Index.open(out, assets.ckpt) as ix:
        assert ix.count == 50 and ix.search_text(caption, k=1)[0].name == image
        names = {h.name for h in ix.search_text(caption, k=50)}
    assert names == {p.name for p in archive_copy.glob("*.jpg")}
    assert len(list(out.glob("vectors-*.faiss"))) == 1  # stale generations cleaned up
