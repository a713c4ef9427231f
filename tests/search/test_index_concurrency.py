"""The index under concurrent use: searches while a new generation is published, two builds at
once (the writer's lock), and a corrupt manifest or a missing FAISS file (one-line errors, and a
running searcher keeps serving the previous generation)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from rsitr.errors import ConfigError, DataError
from rsitr.retrieval.index import Index, build_index
from rsitr.retrieval.index.layout import IndexLock
from tests.search.conftest import SearchAssets


def _grow(archive: Path, n: int) -> None:
    """Add ``n`` copies of archive images (a changed archive for the next generation)."""
    for i, src in enumerate(sorted(archive.glob("*.jpg"))[:n]):
        shutil.copyfile(src, archive / f"new_{i}.jpg")


@pytest.fixture
def out(assets: SearchAssets, archive_copy: Path, tmp_path: Path) -> Path:
    """An index of the private archive copy, generation 1 (40 images)."""
    folder = tmp_path / "index"
    build_index(archive_copy, assets.ckpt, folder)
    return folder


def test_searches_run_while_a_new_generation_is_published(
    assets: SearchAssets, archive_copy: Path, out: Path
) -> None:
    caption, image = assets.query
    errors: list[BaseException] = []
    done = threading.Event()
    counts: list[int] = []

    with Index.open(out, assets.ckpt) as ix:
        ix.search_text(caption, k=1)  # load the model before the race

        def searcher() -> None:
            try:
                while not done.is_set():
                    ix.reload_if_changed()
                    hits = ix.search_text(caption, k=5)
                    assert len(hits) == 5 and hits[0].name == image
                    counts.append(ix.count)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=searcher)
        t.start()
        try:
            _grow(archive_copy, 3)
            build_index(archive_copy, assets.ckpt, out)
        finally:
            done.set()
            t.join()
        assert not errors, errors
        ix.reload_if_changed()
        assert ix.generation == 2 and ix.count == 43
    assert counts and set(counts) <= {40, 43}


def test_two_builds_at_once_the_second_is_refused(
    assets: SearchAssets, archive_copy: Path, out: Path
) -> None:
    with IndexLock(out), pytest.raises(ConfigError) as err:  # another writer holds the lock
        build_index(archive_copy, assets.ckpt, out)
    assert "\n" not in str(err.value)
    _grow(archive_copy, 1)
    assert build_index(archive_copy, assets.ckpt, out).generation == 2  # released: builds again


def test_corrupt_manifest_or_missing_faiss_file(assets: SearchAssets, out: Path) -> None:
    caption, image = assets.query
    manifest = out / "index.json"
    good = manifest.read_text()
    with Index.open(out, assets.ckpt) as ix:
        # a new generation whose FAISS file is missing: the searcher keeps generation 1
        data = json.loads(good)
        data["generation"] = 2
        data["vectors"]["file"] = "vectors-000002.faiss"
        manifest.write_text(json.dumps(data))
        assert ix.reload_if_changed() is False
        assert ix.generation == 1 and ix.search_text(caption, k=1)[0].name == image
        # a manifest that is not JSON: the same
        manifest.write_text('{"format": "rsitr-index", "gener')
        assert ix.reload_if_changed() is False
        assert ix.search_text(caption, k=1)[0].name == image
    # opening fails in one line naming the file
    with pytest.raises(DataError) as err:
        Index.open(out, assets.ckpt)
    assert "\n" not in str(err.value) and "index.json" in str(err.value)
    manifest.write_text(json.dumps(data))
    with pytest.raises(DataError, match="vector index file not found") as err:
        Index.open(out, assets.ckpt)
    assert "\n" not in str(err.value)
    manifest.write_text(good)
    with Index.open(out, assets.ckpt) as ix:  # the previous generation is intact
        assert ix.generation == 1 and ix.search_text(caption, k=1)[0].name == image
