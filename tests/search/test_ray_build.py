"""Index builds on Ray (``--engine ray``): the same 300-image archive built in one process and on
a local Ray with 2 workers, one of them killed mid-build, gives the same index; the driver
resumes from the Parquet shards an interrupted build left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rsitr.retrieval.index import Index, RayOptions, build_index, read_manifest
from rsitr.retrieval.index.store import DB_FILE, MetadataStore
from tests.search.conftest import SearchAssets

pytest.importorskip("ray.data", reason="the Ray engine needs the scale extra (pip install 'rsitr[scale]')")


@pytest.fixture(scope="module")
def archive300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsitr.data.synth import generate_scenes

    root = tmp_path_factory.mktemp("ray") / "synth"
    generate_scenes(root, n=300, size=64, seed=3, workers=1)
    return root / "images"


def vectors_of(index_dir: Path) -> dict[int, np.ndarray]:
    manifest = read_manifest(index_dir)
    assert manifest is not None
    store = MetadataStore(index_dir / DB_FILE, readonly=True)
    try:
        return {i: np.frombuffer(v, "<f4") for i, _, v in store.iter_metadata(manifest.generation)}
    finally:
        store.close()


def test_single_process_and_ray_with_a_killed_worker_agree(
    assets: SearchAssets, archive300: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Ray build, with a worker killed at its 3rd batch, covers the healthy Ray path too: the
    surviving worker and the restarted one must produce the single-process vectors."""
    single = build_index(archive300, assets.ckpt, tmp_path / "single", batch_size=32)
    marker = tmp_path / "killed"
    marker.mkdir()
    monkeypatch.setenv("RSITR_CRASH_AT", "ray-embed-batch-3")  # the first worker at its 3rd batch dies
    monkeypatch.setenv("RSITR_CRASH_ONCE", str(marker))
    killed = build_index(
        archive300,
        assets.ckpt,
        tmp_path / "killed_ray",
        batch_size=32,
        engine="ray",
        ray=RayOptions(workers=2),
    )
    assert (marker / "ray-embed-batch-3").exists()  # a worker really was killed
    assert single.count == killed.count == 300
    want = vectors_of(tmp_path / "single")
    got = vectors_of(tmp_path / "killed_ray")
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[i] - want[i]).max()) for i in want) <= 1e-6
    assert not (tmp_path / "killed_ray" / "embeddings").exists()  # the staged shards are gone once published
    with (
        Index.open(tmp_path / "killed_ray", assets.ckpt) as a,
        Index.open(tmp_path / "single", assets.ckpt) as b,
    ):
        assert [h.id for h in a.search_text("two grey airplanes", k=10)] == [
            h.id for h in b.search_text("two grey airplanes", k=10)
        ]


def test_ray_build_resumes_from_staged_shards_and_updates_incrementally(
    assets: SearchAssets, archive_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver side of a Ray build, with Ray replaced by an in-process embedder writing the
    same shards: shards of an interrupted run are committed, not embedded again; a cut shard is
    dropped and its files re-embedded; a re-run embeds only new and changed files."""
    import pyarrow.parquet as pq

    from rsitr.retrieval.index import ray_engine
    from rsitr.retrieval.index.scan import FileStat

    calls: list[list[str]] = []

    def fake_embed_on_ray(
        root: Path, files: list[FileStat], checkpoint: Path, parts_dir: Path, **kw: object
    ) -> None:
        calls.append(sorted(f.relpath for f in files))
        embedder = ray_engine.ArchiveEmbedder(str(root), str(checkpoint), ("identity",), "cpu", 1)
        parts_dir.mkdir(parents=True, exist_ok=True)
        for s in range(0, len(files), 8):
            chunk = files[s : s + 8]
            batch = {
                "relpath": np.array([f.relpath for f in chunk]),
                "size": np.array([f.size for f in chunk]),
                "mtime_ns": np.array([f.mtime_ns for f in chunk]),
            }
            pq.write_table(embedder(batch), parts_dir / f"part-{len(calls)}-{s:04d}.parquet")

    monkeypatch.setattr(ray_engine, "embed_on_ray", fake_embed_on_ray)
    (archive_copy / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "index"
    # an interrupted earlier run left 16 files' shards and one cut shard in generation 1's staging
    from rsitr.retrieval.index.scan import scan_files

    stats = scan_files(archive_copy)
    out.mkdir()
    MetadataStore(out / DB_FILE).close()  # the build had opened its database before Ray started
    staged = out / "embeddings" / "gen-000001"
    fake_embed_on_ray(archive_copy, stats[:16], assets.ckpt, staged)
    (staged / "part-cut.parquet").write_bytes(b"PAR1 cut short")
    calls.clear()
    r = build_index(archive_copy, assets.ckpt, out, engine="ray")
    assert (r.count, r.resumed, len(r.failed)) == (40, 16, 1)
    assert calls == [sorted(s.relpath for s in stats[16:])]  # only what no shard held
    assert r.failed[0]["path"] == "broken.jpg"
    ref = tmp_path / "local"
    build_index(archive_copy, assets.ckpt, ref)
    want, got = vectors_of(ref), vectors_of(out)
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[i] - want[i]).max()) for i in want) <= 1e-6

    # incremental: one file changed, one added, one deleted → two embedded
    names = sorted(p.name for p in archive_copy.glob("*.jpg"))
    (archive_copy / names[0]).write_bytes((archive_copy / names[1]).read_bytes())
    (archive_copy / "new.jpg").write_bytes((archive_copy / names[2]).read_bytes())
    (archive_copy / names[3]).unlink()
    calls.clear()
    r = build_index(archive_copy, assets.ckpt, out, engine="ray")
    assert calls == [sorted([names[0], "new.jpg"])]
    assert (r.added, r.removed, r.count) == (2, 2, 40)


def test_local_ray_workers_run_at_the_drivers_priority() -> None:
    """Ray niced its workers to 15 by default: beside any busy process they starved, and a build
    stalled. The local Ray that rsitr starts runs them at niceness 0."""
    import os

    import ray

    from rsitr.retrieval.index.ray_engine import _connect

    assert _connect(ray, RayOptions(workers=1))
    try:
        niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert niceness == os.nice(0)
