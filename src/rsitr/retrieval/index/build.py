"""Building an index of an image archive: resumable, incremental, atomic, local or on Ray.

A build compares the archive with the index's live rows: new files are embedded, files whose
content changed are re-embedded, deleted files are dropped, and files that could not be read are
recorded (and retried only once they change). Each batch of embeddings is committed to SQLite
with its rows, so an interrupted build resumes where it stopped. At the end, a new generation
of the FAISS file is written and the manifest that points at it is replaced atomically; until
then searches keep using the previous generation, which stays intact whatever happens to the
build.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rsitr.errors import ConfigError, DataError
from rsitr.faults import crash_point
from rsitr.hashing import file_sha256
from rsitr.retrieval.embed import parse_views
from rsitr.retrieval.index.identity import check_identity, checkpoint_identity
from rsitr.retrieval.index.ingest import embed_batch, ingest_file
from rsitr.retrieval.index.layout import (
    MANIFEST_FILE,
    REPORT_FILE,
    IndexLock,
    Manifest,
    read_manifest,
    vectors_file,
    write_json_atomic,
    write_manifest,
)
from rsitr.retrieval.index.ray_engine import STAGING, RayOptions
from rsitr.retrieval.index.scan import FileStat, scan_files
from rsitr.retrieval.index.store import DB_FILE, MetadataStore
from rsitr.retrieval.index.vectors import VectorIndexConfig, build_vector_index, save_vector_index

logger = logging.getLogger(__name__)

__all__ = ["BuildReport", "RayOptions", "build_index", "publish"]

Progress = Callable[[int, int], None]


@dataclass
class BuildReport:
    """What a build did.

    Attributes:
        index_dir: the index folder.
        generation: the published generation after the build.
        published: whether this build published a new generation (False: already up to date).
        files: image files of the archive.
        added: rows this generation adds (new or changed files), including ``resumed``.
        removed: published rows this generation drops (files deleted or changed).
        touched: files whose stat changed but whose content did not (kept, stat updated).
        unchanged: files already in the published index.
        resumed: of ``added``, files embedded by an interrupted earlier run of this build.
        failed: unreadable files, ``{"path", "error"}`` each (this build's and earlier ones
            whose file has not changed since).
        count: vectors in the published index.
        vector_kind: ``flat``, ``ivfpq`` or ``hnsw``.
        seconds: wall time.
    """

    index_dir: str
    generation: int = 0
    published: bool = False
    files: int = 0
    added: int = 0
    removed: int = 0
    touched: int = 0
    unchanged: int = 0
    resumed: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    count: int = 0
    vector_kind: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def line(self) -> str:
        """A one-line summary."""
        state = f"generation {self.generation}" if self.published else "already up to date"
        resumed = f" ({self.resumed} resumed from an interrupted build)" if self.resumed else ""
        return (
            f"{self.index_dir}: {self.count} images indexed ({self.vector_kind}, {state}); "
            f"{self.added} added{resumed}, {self.removed} removed, {self.unchanged} unchanged, "
            f"{len(self.failed)} unreadable; {self.seconds:.1f} s"
        )


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError("index output exists and is not a folder", path=out)
    is_index = (out / DB_FILE).exists() or (out / MANIFEST_FILE).exists()
    if out.is_dir() and any(out.iterdir()) and not is_index:
        raise ConfigError(f"{out}: folder exists and is not an rsitr index; choose a new or empty --out")


def _check_same(store: MetadataStore, key: str, value: Any, out: Path, hint: str) -> None:
    stored = store.get_info(key)
    if stored is None:
        store.set_info(key, value)
    elif stored != value:
        raise ConfigError(f"{out}: the index has {key} {stored!r}, not {value!r}; {hint}")


def _diff(
    store: MetadataStore, stats: list[FileStat], gen: int, root: Path, report: BuildReport
) -> tuple[list[FileStat], list[int]]:
    """Compare the archive with the live rows: ``(files to embed, row ids to remove)``."""
    live = store.live_rows()
    failures = store.failures()
    on_disk = {s.relpath for s in stats}
    to_embed: list[FileStat] = []
    to_remove = [row.id for rel, row in live.items() if rel not in on_disk]
    retry: list[str] = []
    for s in stats:
        row = live.get(s.relpath)
        if row is not None:
            if (row.size, row.mtime_ns) == (s.size, s.mtime_ns):
                if row.added_gen == gen:  # embedded by an interrupted run of this build
                    report.resumed += 1
                else:
                    report.unchanged += 1
                continue
            try:
                same = row.size == s.size and file_sha256(root / s.relpath) == row.sha256
            except OSError:
                same = False
            if same:  # touched, not modified: keep the vector
                store.touch(row.id, s.size, s.mtime_ns)
                report.touched += 1
                report.unchanged += 1
                continue
            to_remove.append(row.id)
            to_embed.append(s)
        elif s.relpath in failures:
            size, mtime_ns, error = failures[s.relpath]
            if (size, mtime_ns) == (s.size, s.mtime_ns):
                report.failed.append({"path": s.relpath, "error": error})
            else:
                retry.append(s.relpath)
                to_embed.append(s)
        else:
            to_embed.append(s)
    store.clear_failures([p for p in failures if p not in on_disk] + retry)
    return to_embed, to_remove


def _embed_files(
    method: Any,
    root: Path,
    files: list[FileStat],
    store: MetadataStore,
    gen: int,
    batch_size: int,
    workers: int,
    device: str | torch.device,
    report: BuildReport,
    progress: Progress | None,
    views: tuple[str, ...] = ("identity",),
) -> None:
    """Embed ``files`` batch by batch; each batch's rows, vectors and failures are committed
    together, which is what makes a build resumable."""
    from rsitr.data.transforms import EvalTransform

    enc = method.image_encoder
    transform = EvalTransform(enc.image_size, enc.mean, enc.std)
    dev = torch.device(device)
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for s in range(0, len(files), batch_size):
            chunk = files[s : s + batch_size]
            batch = list(pool.map(lambda st: ingest_file(root, st, transform), chunk))
            ok = [b for b in batch if b.metadata is not None]
            failed = [b for b in batch if b.metadata is None]
            vecs = embed_batch(method, ok, dev, views) if ok else None
            with store.transaction():
                if ok:
                    store.add_images([b.metadata for b in ok], vecs, gen)  # type: ignore[misc, arg-type]
                for b in failed:
                    store.set_failure(b.stat.relpath, b.stat.size, b.stat.mtime_ns, b.error)
            for b in failed:
                logger.warning("skipping unreadable image %s: %s", b.stat.relpath, b.error)
                report.failed.append({"path": b.stat.relpath, "error": b.error})
            done += len(chunk)
            crash_point(f"index-batch-{s // batch_size + 1}")
            if progress is not None:
                progress(done, len(files))


def _backfill_footprints(store: MetadataStore, root: Path) -> None:
    """Footprints of the GeoTIFFs an older rsitr indexed (their vectors are kept: only the tags
    are read again)."""
    from rsitr.data.footprints import lonlat_footprint
    from rsitr.data.images import read_geo_info

    with store.transaction():
        for row_id, rel in store.rows_without_footprint():
            try:
                geo = read_geo_info(root / rel)
            except DataError:
                continue
            fp = None if geo is None else lonlat_footprint(geo.crs, geo.transform, geo.width, geo.height)
            if fp is not None:
                store.set_footprint(row_id, fp.bbox, fp.ring)
        store.set_info("needs_footprints", False)


def _embed_on_ray(
    root: Path,
    files: list[FileStat],
    checkpoint: Path,
    out: Path,
    store: MetadataStore,
    gen: int,
    batch_size: int,
    views: tuple[str, ...],
    opts: RayOptions | None,
    report: BuildReport,
    progress: Progress | None,
) -> None:
    """Embed ``files`` on Ray, then commit the workers' Parquet shards (shards of an interrupted
    run of this generation first, so that only what they lack is embedded again)."""
    from rsitr.retrieval.index.ray_engine import embed_on_ray, ingest_parts

    parts = out / STAGING / f"gen-{gen:06d}"
    wanted = {s.relpath: s for s in files}

    def tick(done: int) -> None:
        if progress is not None:
            progress(len(files) - len(wanted) + done, len(files))

    first = ingest_parts(parts, store, wanted, gen, tick)
    report.resumed += len(first.done)
    report.failed.extend(first.failed)
    rest = [s for s in files if s.relpath not in first.done]
    if rest:
        opts = opts or RayOptions()
        embed_on_ray(root, rest, checkpoint, parts, views=views, batch_size=batch_size, opts=opts)
        wanted = {s.relpath: s for s in rest}
        second = ingest_parts(parts, store, wanted, gen, tick)
        report.failed.extend(second.failed)
        missing = len(rest) - len(second.done)
        if missing:
            raise DataError(
                f"the Ray workers returned no row for {missing} file(s); re-run to retry them", path=root
            )


def publish(
    out: Path,
    store: MetadataStore,
    generation: int,
    identity: dict[str, Any],
    root: Path,
    dim: int,
    vector_config: VectorIndexConfig,
    failures: int,
) -> Manifest:
    """Write generation ``generation``: FAISS file, then the manifest (the commit), then clean up.

    Args:
        out: the index folder.
        store: its open metadata store.
        generation: the generation to publish.
        identity: the checkpoint identity.
        root: the archive root.
        dim: embedding dimension.
        vector_config: how to index the vectors.
        failures: unreadable files (for the manifest).

    Returns:
        The published manifest.
    """
    parts = list(store.live_vectors(dim))
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    vecs = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    del parts
    index, info = build_vector_index(vecs, ids, vector_config)
    name = vectors_file(generation)
    save_vector_index(index, out / name)
    crash_point("index-publish")  # the new FAISS file is written, the manifest not yet
    manifest = Manifest(
        generation=generation,
        identity=identity,
        root=str(root),
        dim=dim,
        count=len(ids),
        vectors={"file": name, **info},
        vector_config=vector_config.to_dict(),
        failures=failures,
    )
    write_manifest(out, manifest)  # the commit point
    crash_point("index-cleanup")
    store.collect_garbage(generation)
    remove_stale_vectors(out, name)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # Ray shards, all committed by now
    return manifest


def remove_stale_vectors(out: Path, keep: str | None) -> None:
    """Delete FAISS files other than ``keep`` (the published one): what a kill between a publish
    and its clean-up, or before its commit, left behind."""
    for stale in out.glob("vectors-*.faiss*"):
        if stale.name != keep:
            stale.unlink(missing_ok=True)


def build_index(
    images: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    files: Iterable[str | Path] | None = None,
    vector_config: VectorIndexConfig | None = None,
    device: str | torch.device = "cpu",
    workers: int = 2,
    progress: Progress | None = None,
    tta: str | tuple[str, ...] | None = None,
    engine: Literal["local", "ray"] = "local",
    ray: RayOptions | None = None,
) -> BuildReport:
    """Build or update the index of an image archive.

    Args:
        images: the archive folder (scanned recursively for .jpg/.jpeg/.png/.tif/.tiff).
        checkpoint: the model (``model.safetensors`` or its folder); an existing index only
            accepts the checkpoint it was built with.
        out: the index folder (created if needed).
        batch_size: images embedded per batch (and per commit, or per Parquet shard on Ray).
        files: index exactly these files of ``images`` instead of scanning it.
        vector_config: FAISS options; default: the index's stored options, else defaults.
        device: where the model runs.
        workers: threads that decode and hash files (``local`` engine).
        progress: called as ``progress(done, total)`` after each committed batch.
        tta: test-time views averaged into each image embedding (``flips``, ``d4`` or a list);
            recorded in the index, which then refuses another setting.
        engine: ``"local"`` (this process) or ``"ray"`` (an actor pool; needs the ``scale`` extra).
        ray: where and how wide the Ray engine runs (default :class:`RayOptions`).

    Returns:
        The :class:`BuildReport` (also written to ``build_report.json``).

    Raises:
        IndexMismatchError: if the index was built with another checkpoint.
        ConfigError: for another root than the index's, a folder that is not an index,
            a bad option, or a concurrent writer.
        DataError: if the archive folder or the checkpoint is missing.
    """
    from rsitr.models.checkpoint import load_method

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected a positive integer")
    root = Path(images).resolve()
    if not root.is_dir():
        raise DataError("not a folder of images", path=images)
    out = Path(out)
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine!r}: expected local or ray")
    views = parse_views(tta)
    identity = checkpoint_identity(checkpoint)
    _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    report = BuildReport(index_dir=str(out))
    with IndexLock(out):
        store = MetadataStore(out / DB_FILE)
        try:
            stored_identity = store.get_info("identity")
            if stored_identity is None:
                store.set_info("identity", identity)
            else:
                check_identity(stored_identity, identity, out)
            _check_same(store, "root", str(root), out, "index that folder, or choose a new --out")
            _check_same(store, "tta", ",".join(views), out, "use the same --tta, or choose a new --out")
            stored_cfg = store.get_info("vector_config")
            cfg = vector_config or (
                VectorIndexConfig.from_dict(stored_cfg) if stored_cfg else VectorIndexConfig()
            )
            manifest = read_manifest(out)
            published = manifest.generation if manifest else 0
            gen = published + 1
            store.collect_garbage(published)  # rows a crash left after a publish
            if store.get_info("needs_footprints"):
                _backfill_footprints(store, root)
            remove_stale_vectors(out, manifest.vectors.get("file") if manifest else None)

            stats = scan_files(root, files)
            report.files = len(stats)
            to_embed, to_remove = _diff(store, stats, gen, root, report)
            with store.transaction():
                store.remove(to_remove, gen)
            logger.info(
                "%s: %d files; %d to embed, %d to drop, %d already indexed",
                root, len(stats), len(to_embed), len(to_remove), report.unchanged,
            )  # fmt: skip

            dim = store.get_info("dim")
            method = None
            if (to_embed and engine == "local") or dim is None:
                method = load_method(checkpoint, device=device).eval()
                if dim is None:
                    tok = method.tokenize(["dimension probe"])
                    dim = int(
                        method.encode_text(
                            tok["input_ids"].to(device), tok["attention_mask"].to(device)
                        ).shape[1]
                    )
                    store.set_info("dim", dim)
            if to_embed and engine == "ray":
                ckpt = Path(checkpoint)
                _embed_on_ray(root, to_embed, ckpt, out, store, gen, batch_size, views, ray, report, progress)
            elif to_embed:
                assert method is not None
                _embed_files(
                    method, root, to_embed, store, gen, batch_size, workers, device, report, progress, views
                )
            report.added, report.removed = store.pending_changes(gen)
            changed = (
                report.added or report.removed or manifest is None or manifest.vector_config != cfg.to_dict()
            )
            store.set_info("vector_config", cfg.to_dict())
            if changed:
                manifest = publish(out, store, gen, identity, root, int(dim), cfg, len(report.failed))
                report.published = True
            assert manifest is not None
            report.generation = manifest.generation
            report.count = manifest.count
            report.vector_kind = str(manifest.vectors.get("kind", ""))
        finally:
            store.close()
        report.failed.sort(key=lambda f: f["path"])
        report.seconds = round(time.perf_counter() - t0, 3)
        write_json_atomic(out / REPORT_FILE, report.to_dict())
    return report
