"""Embedding an archive on Ray (``rsitr index build --engine ray``).

Ray Data reads the list of files to embed, and an actor pool of :class:`ArchiveEmbedder`
(one model per actor, on a GPU where ``gpus_per_worker > 0``) decodes, hashes and embeds them
batch by batch. Each batch becomes a Parquet shard of ``(id, path, sha256, embedding,
metadata)`` rows, written by the workers into the index's staging folder
``embeddings/gen-<G>/``. Ray does the scheduling and the retries: an actor that dies is
restarted and its batch retried (Ray Data's actor pools default to unlimited restarts and task
retries), so a killed worker loses nothing.

The driver then commits the shards to the index database (:func:`ingest_parts`), shard by
shard, keeping only rows whose file still has the scanned size and mtime. Shards left by an
interrupted build are committed the same way before Ray starts, so a re-run embeds only what
no shard holds. Ids are content-derived (:func:`~rsitr.retrieval.index.store.image_id`), so the
order in which workers finish never changes the index.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsitr.errors import ConfigError, MissingDependencyError
from rsitr.faults import crash_point
from rsitr.retrieval.index.scan import FileStat
from rsitr.retrieval.index.store import ImageMetadata, MetadataStore, ring_from_json, ring_to_json

logger = logging.getLogger(__name__)

__all__ = ["ArchiveEmbedder", "IngestResult", "embed_on_ray", "ingest_parts", "metadata_table"]

STAGING = "embeddings"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"--engine ray needs the scale extra: pip install 'rsitr[scale]' ({e})"
        ) from e


def _float_list(values: Sequence[Any]) -> list[list[float] | None]:
    return [None if v is None else [float(x) for x in v] for v in values]


def metadata_table(
    items: Sequence[ImageMetadata], vectors: np.ndarray | None, errors: Sequence[tuple[FileStat, str]] = ()
) -> Any:
    """A pyarrow table of embedded images (and of failed files, with ``error`` set).

    Columns: ``id, path, size, mtime_ns, sha256, width, height, crs, bounds, transform,
    lonlat_bounds, footprint`` (JSON ring), ``acquired, embedding`` (list<float32>), ``error``.
    """
    import pyarrow as pa

    n_ok = len(items)
    failed = list(errors)
    dim = 0 if vectors is None else int(vectors.shape[1])
    emb = np.zeros((0, dim), np.float32) if vectors is None else np.ascontiguousarray(vectors, np.float32)
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n_ok + 1) * dim, dim, dtype=np.int32)[: n_ok + 1])
    emb_col = pa.ListArray.from_arrays(offsets, flat) if n_ok else pa.array([], pa.list_(pa.float32()))
    if failed:
        emb_col = pa.concat_arrays([emb_col, pa.nulls(len(failed), pa.list_(pa.float32()))])

    def col(values: list[Any], f: Callable[[FileStat], Any] | None = None) -> list[Any]:
        return values + [None if f is None else f(s) for s, _ in failed]

    footprints = [ring_to_json(m.footprint) for m in items]
    return pa.table(
        {
            "id": pa.array(col([m.id for m in items]), pa.int64()),
            "path": pa.array(col([m.relpath for m in items], lambda s: s.relpath), pa.string()),
            "size": pa.array(col([m.size for m in items], lambda s: s.size), pa.int64()),
            "mtime_ns": pa.array(col([m.mtime_ns for m in items], lambda s: s.mtime_ns), pa.int64()),
            "sha256": pa.array(col([m.sha256 for m in items]), pa.string()),
            "width": pa.array(col([m.width for m in items]), pa.int64()),
            "height": pa.array(col([m.height for m in items]), pa.int64()),
            "crs": pa.array(col([m.crs for m in items]), pa.string()),
            "bounds": pa.array(col(_float_list([m.bounds for m in items])), pa.list_(pa.float64())),
            "transform": pa.array(col(_float_list([m.transform for m in items])), pa.list_(pa.float64())),
            "lonlat_bounds": pa.array(
                col(_float_list([m.lonlat_bounds for m in items])), pa.list_(pa.float64())
            ),
            "footprint": pa.array(col(footprints), pa.string()),
            "acquired": pa.array(col([m.acquired for m in items]), pa.string()),
            "embedding": emb_col,
            "error": pa.array([None] * n_ok + [e for _, e in failed], pa.string()),
        }
    )


def _row_metadata(r: dict[str, Any]) -> ImageMetadata:
    def tup(v: Any) -> Any:
        return None if v is None else tuple(float(x) for x in v)

    return ImageMetadata(
        relpath=r["path"],
        size=int(r["size"]),
        mtime_ns=int(r["mtime_ns"]),
        sha256=r["sha256"],
        width=r["width"],
        height=r["height"],
        crs=r["crs"],
        bounds=tup(r["bounds"]),
        transform=tup(r["transform"]),
        lonlat_bounds=tup(r["lonlat_bounds"]),
        footprint=ring_from_json(r["footprint"]),
        acquired=r["acquired"],
    )


class ArchiveEmbedder:
    """A Ray Data actor: decodes, hashes and embeds batches of archive files.

    Args:
        root: the archive root (the same path on every node: a shared mount).
        checkpoint: the model file or folder (the same path on every node).
        views: test-time views averaged into each embedding.
        device: ``"cuda"`` for an actor given a GPU, else ``"cpu"``.
        threads: threads decoding files and running the model.
    """

    def __init__(self, root: str, checkpoint: str, views: tuple[str, ...], device: str, threads: int) -> None:
        import torch

        from rsitr.data.transforms import EvalTransform
        from rsitr.models.checkpoint import load_method

        torch.set_num_threads(max(1, threads))
        self.root = Path(root)
        self.device = torch.device(device)
        self.views = tuple(views)
        self.method = load_method(checkpoint, device=self.device).eval()
        enc = self.method.image_encoder
        self.transform = EvalTransform(enc.image_size, enc.mean, enc.std)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        from rsitr.retrieval.index.ingest import embed_batch, ingest_file

        stats = [
            FileStat(str(r), int(s), int(m))
            for r, s, m in zip(batch["relpath"], batch["size"], batch["mtime_ns"], strict=True)
        ]
        self.batches += 1
        crash_point(f"ray-embed-batch-{self.batches}")  # a worker killed mid-build (tests)
        read = list(self.pool.map(lambda st: ingest_file(self.root, st, self.transform), stats))
        ok = [b for b in read if b.metadata is not None]
        vecs = embed_batch(self.method, ok, self.device, self.views) if ok else None
        errors = [(b.stat, b.error) for b in read if b.metadata is None]
        return metadata_table([b.metadata for b in ok], vecs, errors)  # type: ignore[misc]


@dataclass
class RayOptions:
    """Where and how wide a Ray build runs.

    Attributes:
        address: a running cluster (``ray://host:10001`` or ``auto``); ``None``: start a local
            Ray on this machine for the build and stop it afterwards.
        workers: embedding actors.
        gpus_per_worker: GPUs given to each actor (0: CPU actors); fractions share a GPU.
        threads_per_worker: CPU threads per actor (decoding and, on CPU, the model).
    """

    address: str | None = None
    workers: int = 2
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: expected a positive integer")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker}: expected >= 0")


def _connect(ray: Any, opts: RayOptions) -> bool:
    """Join ``opts.address`` or start a local Ray; returns whether this call started it."""
    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith("RSITR_")}
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
        "runtime_env": {"env_vars": env} if env else None,
    }
    if opts.address:
        ray.init(address=opts.address, **kwargs)
    else:
        cpus = max(os.cpu_count() or 1, opts.workers * opts.threads_per_worker + 1)
        # The workers do the build's work: run them at the driver's priority, not Ray's default
        # niceness 15, under which any other busy process on the machine starves the embedding.
        system = {"worker_niceness": 0}
        ray.init(num_cpus=cpus, object_store_memory=256 << 20, _system_config=system, **kwargs)
    return True


def embed_on_ray(
    root: Path,
    files: Sequence[FileStat],
    checkpoint: Path,
    parts_dir: Path,
    *,
    views: tuple[str, ...],
    batch_size: int,
    opts: RayOptions,
) -> None:
    """Embed ``files`` with a Ray actor pool; the workers write Parquet shards to ``parts_dir``.

    Raises:
        MissingDependencyError: without the ``scale`` extra.
    """
    ray = _require("ray")
    _require("ray.data")
    started = _connect(ray, opts)
    try:
        parts_dir.mkdir(parents=True, exist_ok=True)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = logger.isEnabledFor(logging.INFO)
        rows = [{"relpath": s.relpath, "size": s.size, "mtime_ns": s.mtime_ns} for s in files]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
        gpus = opts.gpus_per_worker
        ds = ds.map_batches(
            ArchiveEmbedder,
            fn_constructor_kwargs={
                "root": str(root),
                "checkpoint": str(checkpoint),
                "views": tuple(views),
                "device": "cuda" if gpus > 0 else "cpu",
                "threads": opts.threads_per_worker,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=opts.workers),
            num_cpus=opts.threads_per_worker,
            num_gpus=gpus if gpus > 0 else None,
        )
        ds.write_parquet(str(parts_dir))
    finally:
        if started:
            ray.shutdown()


@dataclass
class IngestResult:
    """What :func:`ingest_parts` committed.

    Attributes:
        done: relative paths committed (embedded or recorded as unreadable).
        failed: ``{"path", "error"}`` of the unreadable files among them.
    """

    done: set[str]
    failed: list[dict[str, str]]


def ingest_parts(
    parts_dir: Path,
    store: MetadataStore,
    wanted: dict[str, FileStat],
    gen: int,
    progress: Callable[[int], None] | None = None,
) -> IngestResult:
    """Commit the Parquet shards in ``parts_dir`` to the index database, one shard per transaction.

    Only rows of ``wanted`` files whose size and mtime still match are taken (a shard of an
    earlier run may describe a file that changed since); an unreadable shard (a write cut
    short) is deleted, and its files are embedded again.

    Returns:
        The :class:`IngestResult`.
    """
    result = IngestResult(set(), [])
    if not parts_dir.is_dir():
        return result
    import pyarrow.parquet as pq

    for part in sorted(parts_dir.glob("*.parquet")):
        try:
            rows = pq.read_table(part).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a cut file
            logger.warning("dropping unreadable shard %s: %s", part, str(e).splitlines()[0])
            part.unlink(missing_ok=True)
            continue
        items, vecs, failures = [], [], []
        for r in rows:
            stat = wanted.get(r["path"])
            stale = stat is None or (stat.size, stat.mtime_ns) != (r["size"], r["mtime_ns"])
            if stale or r["path"] in result.done:
                continue
            result.done.add(r["path"])
            if r["error"] is not None:
                failures.append((stat, r["error"]))
            else:
                items.append(_row_metadata(r))
                vecs.append(np.asarray(r["embedding"], np.float32))
        with store.transaction():
            if items:
                store.add_images(items, np.stack(vecs), gen)
            for stat, error in failures:
                store.set_failure(stat.relpath, stat.size, stat.mtime_ns, error)
        result.failed.extend({"path": s.relpath, "error": e} for s, e in failures)
        if progress is not None:
            progress(len(result.done))
    return result
