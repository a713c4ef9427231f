"""Index builds: resume after an interruption, incremental rebuilds, unreadable files,
checkpoint identity, atomic publication, content-derived ids, GeoTIFF metadata, ANN kinds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from rsitr.errors import ConfigError, DataError
from rsitr.retrieval.index import Index, IndexMismatchError, VectorIndexConfig, build_index, image_id
from rsitr.retrieval.index import build as build_module
from tests.search.conftest import SearchAssets


def names_of(index_dir: Path, ckpt: Path) -> set[str]:
    """Relative paths of the images searchable in the published index."""
    with Index.open(index_dir, ckpt, load_model=False) as ix:
        hits = ix.search_vectors(np.ones((1, ix.dim), np.float32) / np.sqrt(ix.dim), k=10_000)[0]
        assert len(hits) == ix.count
        return {h.name for h in hits}


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")}


class Interrupt(Exception):
    pass


def test_build_interrupt_resume_and_incremental_rebuild(
    assets: SearchAssets, archive_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    calls = []

    def crash_after_first_batch(done: int, total: int) -> None:
        calls.append(done)
        raise Interrupt  # a simulated Ctrl-C / crash after one committed batch

    with pytest.raises(Interrupt):
        build_index(archive_copy, assets.ckpt, out, batch_size=8, progress=crash_after_first_batch)
    assert calls == [8]
    with pytest.raises(DataError, match="no index here"):  # nothing published yet
        Index.open(out, assets.ckpt)

    progress: list[tuple[int, int]] = []
    r = build_index(
        archive_copy, assets.ckpt, out, batch_size=8, progress=lambda d, t: progress.append((d, t))
    )
    assert (r.resumed, r.added, r.removed, r.published, r.generation) == (8, 40, 0, True, 1)
    assert progress[-1] == (32, 32)  # only the 32 files the interrupted run had not embedded
    assert names_of(out, assets.ckpt) == files_of(archive_copy)
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["count"] == 40 and saved["failed"] == []

    r = build_index(archive_copy, assets.ckpt, out)  # nothing changed
    assert (r.published, r.added, r.removed, r.unchanged, r.generation) == (False, 0, 0, 40, 1)

    # change the folder: 2 deleted, 1 modified, 1 touched only, 2 new (one in a subfolder)
    files = sorted(archive_copy.glob("*.jpg"))
    files[0].unlink()
    files[1].unlink()
    shutil.copyfile(files[3], files[2])  # new content
    st = files[4].stat()
    os.utime(files[4], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same content, new mtime
    (archive_copy / "new").mkdir()
    shutil.copyfile(files[5], archive_copy / "new" / "copy_a.jpg")
    shutil.copyfile(files[6], archive_copy / "copy_b.jpg")
    r = build_index(archive_copy, assets.ckpt, out)
    assert (r.added, r.removed, r.touched, r.generation, r.count) == (3, 3, 1, 2, 40)
    assert names_of(out, assets.ckpt) == files_of(archive_copy)
    assert sorted(p.name for p in out.glob("vectors-*.faiss")) == ["vectors-000002.faiss"]
    with Index.open(out, assets.ckpt) as ix:  # the modified file is found under its new content
        assert ix.search_image(files[3], k=2)[0].score == pytest.approx(1.0, abs=1e-5)
        assert {h.name for h in ix.search_image(files[3], k=2)} == {files[2].name, files[3].name}


def _corrupt_files(folder: Path) -> dict[str, bytes]:
    good = (folder / sorted(os.listdir(folder))[0]).read_bytes()
    bad = {
        "truncated.jpg": good[: len(good) // 3],
        "not_an_image.png": b"hello, I am text",
        "empty.tif": b"",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return bad


def test_unreadable_files_are_skipped_reported_and_retried_when_changed(
    assets: SearchAssets, archive_copy: Path, tmp_path: Path
) -> None:
    bad = _corrupt_files(archive_copy)
    out = tmp_path / "index"
    r = build_index(archive_copy, assets.ckpt, out, batch_size=16)
    assert sorted(f["path"] for f in r.failed) == sorted(bad)
    assert all(f["error"] for f in r.failed)
    assert r.count == 40 and names_of(out, assets.ckpt) == files_of(archive_copy) - {"truncated.jpg"}
    report = json.loads((out / "build_report.json").read_text())
    assert sorted(f["path"] for f in report["failed"]) == sorted(bad)

    r = build_index(archive_copy, assets.ckpt, out)  # unchanged failures: listed, not retried
    assert (r.added, r.published) == (0, False) and len(r.failed) == 3

    shutil.copyfile(next(archive_copy.glob("airport_*.jpg")), archive_copy / "truncated.jpg")  # repaired
    r = build_index(archive_copy, assets.ckpt, out)
    assert r.added == 1 and sorted(f["path"] for f in r.failed) == ["empty.tif", "not_an_image.png"]
    assert "truncated.jpg" in names_of(out, assets.ckpt)


def test_mismatched_checkpoint_is_refused(
    assets: SearchAssets, built_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(IndexMismatchError, match="checkpoint mismatch"):
        Index.open(built_index, assets.other_ckpt)
    with pytest.raises(IndexMismatchError, match="checkpoint mismatch"):
        build_index(assets.archive, assets.other_ckpt, built_index)

    from rsitr.cli import run

    assert run(["search", str(built_index), "harbour", "--checkpoint", str(assets.other_ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint mismatch" in err and len(err.splitlines()) == 1

    # the recorded checkpoint file was replaced by another model (e.g. training went on)
    moved = tmp_path / "ckpt"
    shutil.copytree(assets.ckpt, moved)
    out = tmp_path / "index"
    build_index(assets.archive, moved, out, files=sorted(assets.archive.glob("port_*.jpg")))
    shutil.copyfile(assets.other_ckpt / "model.safetensors", moved / "model.safetensors")
    with pytest.raises(IndexMismatchError):
        Index.open(out)


def test_a_crash_while_publishing_keeps_the_previous_index(
    assets: SearchAssets, archive_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "index"
    build_index(archive_copy, assets.ckpt, out)
    before = names_of(out, assets.ckpt)
    victim = sorted(archive_copy.glob("*.jpg"))[0]
    victim.unlink()
    shutil.copyfile(sorted(archive_copy.glob("*.jpg"))[0], archive_copy / "extra.jpg")

    real_write = build_module.write_manifest

    def crash(*args: object, **kwargs: object) -> None:
        raise Interrupt  # power cut after the new FAISS file, before the manifest commit

    monkeypatch.setattr(build_module, "write_manifest", crash)
    with pytest.raises(Interrupt):
        build_index(archive_copy, assets.ckpt, out)
    assert names_of(out, assets.ckpt) == before  # old generation intact: rows kept, old file kept
    with Index.open(out, assets.ckpt) as ix:
        assert ix.generation == 1 and victim.name in {h.name for h in ix.search_text("river", k=40)}

    monkeypatch.setattr(build_module, "write_manifest", real_write)
    r = build_index(archive_copy, assets.ckpt, out)
    assert (r.added, r.removed, r.resumed, r.generation) == (1, 1, 1, 2)
    assert names_of(out, assets.ckpt) == files_of(archive_copy)


def test_ids_depend_only_on_path_and_content(
    assets: SearchAssets, built_index: Path, archive_copy: Path
) -> None:
    """Two builds that differ in batch size, file order of commits and folder hold the same ids;
    a changed file gets a new id, an unchanged one keeps its id."""
    from rsitr.hashing import file_sha256

    out = archive_copy.parent / "other"
    build_index(archive_copy, assets.ckpt, out, batch_size=7, workers=1)

    def ids(index_dir: Path) -> dict[str, int]:
        with Index.open(index_dir, assets.ckpt, load_model=False) as ix:
            hits = ix.search_vectors(np.ones((1, ix.dim), np.float32), k=100)[0]
            return {h.name: h.id for h in hits}

    first = ids(out)
    assert first == ids(built_index) and len(first) == 40
    assert all(i == image_id(n, file_sha256(archive_copy / n)) for n, i in first.items())
    changed = sorted(first)[0]
    shutil.copy(archive_copy / sorted(first)[1], archive_copy / changed)
    build_index(archive_copy, assets.ckpt, out)
    second = ids(out)
    assert second[changed] != first[changed]
    assert {n: i for n, i in second.items() if n != changed} == {
        n: i for n, i in first.items() if n != changed
    }


def test_geotiff_metadata_is_stored(assets: SearchAssets, tmp_path: Path) -> None:
    folder = tmp_path / "geo"
    folder.mkdir()
    geokeys = (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32633)
    rng = np.random.default_rng(0)
    tifffile.imwrite(
        folder / "tile.tif",
        rng.integers(0, 4000, (40, 50, 4), dtype=np.uint16),
        photometric="minisblack",
        planarconfig="contig",
        extratags=[
            (33550, "d", 3, (10.0, 20.0, 0.0), True),
            (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
            (34735, "H", len(geokeys), geokeys, True),
        ],
    )
    shutil.copyfile(next(assets.archive.glob("*.jpg")), folder / "plain.jpg")
    build_index(folder, assets.ckpt, tmp_path / "index")
    with Index.open(tmp_path / "index", assets.ckpt) as ix:
        hits = {h.name: h for h in ix.search_image(folder / "tile.tif", k=5)}
    geo, plain = hits["tile.tif"].metadata, hits["plain.jpg"].metadata
    assert hits["tile.tif"].rank == 1
    assert (geo.width, geo.height, geo.crs) == (50, 40, "EPSG:32633")
    assert geo.bounds == pytest.approx((500000.0, 3999200.0, 500500.0, 4000000.0))
    assert len(geo.sha256) == 64 and geo.size == (folder / "tile.tif").stat().st_size
    assert (plain.width, plain.height, plain.crs, plain.bounds) == (128, 128, None, None)


@pytest.mark.parametrize(
    "cfg",
    [
        VectorIndexConfig(kind="auto", ann_threshold=10, nlist=1),  # auto → ivfpq past 10 vectors
        VectorIndexConfig(kind="hnsw", hnsw_m=8, ef_construction=40, ef_search=64),
    ],
    ids=["ivfpq", "hnsw"],
)
def test_approximate_indexes(assets: SearchAssets, tmp_path: Path, cfg: VectorIndexConfig) -> None:
    r = build_index(assets.archive, assets.ckpt, tmp_path / "index", vector_config=cfg)
    assert r.vector_kind == ("ivfpq" if cfg.kind == "auto" else "hnsw")
    with Index.open(tmp_path / "index", assets.ckpt) as ix:
        assert ix.kind == r.vector_kind
        for name in ("airport_00000.jpg", "port_00002.jpg"):
            assert ix.search_image(assets.archive / name, k=3)[0].name == name
    # the stored options are kept by the next build; new options republish without re-embedding
    r = build_index(
        assets.archive, assets.ckpt, tmp_path / "index", vector_config=VectorIndexConfig(kind="flat")
    )
    assert (r.published, r.added, r.vector_kind) == (True, 0, "flat")


def test_build_refuses_a_folder_that_is_not_an_index(assets: SearchAssets, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an rsitr index"):
        build_index(assets.archive, assets.ckpt, tmp_path / "mine")
    with pytest.raises(DataError, match="not a folder"):
        build_index(tmp_path / "nowhere", assets.ckpt, tmp_path / "index")


def test_tta_embeddings_are_the_view_average_and_the_setting_is_recorded(
    assets: SearchAssets, tmp_path: Path
) -> None:
    import torch

    from rsitr.data import load_image
    from rsitr.data.transforms import EvalTransform
    from rsitr.models.checkpoint import load_method
    from rsitr.retrieval.embed import apply_view

    files = sorted(assets.archive.glob("*.jpg"))[:3]
    out = tmp_path / "tta"
    build_index(assets.archive, assets.ckpt, out, files=files, tta="flips")
    method = load_method(assets.ckpt)
    enc = method.image_encoder
    x = torch.stack([EvalTransform(enc.image_size, enc.mean, enc.std)(load_image(f)) for f in files])
    views = [method.encode_image(images=apply_view(x, v)) for v in ("identity", "hflip", "vflip")]
    want = torch.nn.functional.normalize(sum(views), dim=-1).numpy()
    with Index.open(out, assets.ckpt, load_model=False) as ix:
        for i, f in enumerate(files):
            hit = ix.search_vectors(want[i : i + 1].astype(np.float32), k=1)[0][0]
            assert hit.name == f.name and hit.score == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(views[0].numpy(), want, atol=1e-3)  # the views do differ
    with pytest.raises(ConfigError, match="tta"):
        build_index(assets.archive, assets.ckpt, out, files=files)  # another setting: refused
