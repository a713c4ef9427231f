"""Merging the shards of a sharded build (``--shard i/n``) into one index."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsitr.errors import ConfigError, DataError
from rsitr.retrieval.index.build import BuildReport, publish
from rsitr.retrieval.index.identity import check_identity
from rsitr.retrieval.index.layout import (
    MANIFEST_FILE,
    REPORT_FILE,
    IndexLock,
    Manifest,
    read_manifest,
    write_json_atomic,
)
from rsitr.retrieval.index.scan import ShardSpec
from rsitr.retrieval.index.store import DB_FILE, MetadataStore
from rsitr.retrieval.index.vectors import VectorIndexConfig

logger = logging.getLogger(__name__)

__all__ = ["merge_indexes"]


def _check_shards(manifests: list[tuple[Path, Manifest]]) -> None:
    specs = [(d, ShardSpec.parse(m.shard)) for d, m in manifests]
    counts = {s.count for _, s in specs}
    if len(counts) != 1:
        raise ConfigError(f"shards of different splits: {', '.join(f'{d} is {s}' for d, s in specs)}")
    n = counts.pop()
    if n == 1:
        return  # whole indexes of disjoint file sets: allowed, duplicates are checked per file
    seen: dict[int, Path] = {}
    for d, s in specs:
        if s.index in seen:
            raise ConfigError(f"shard {s} given twice: {seen[s.index]} and {d}")
        seen[s.index] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ConfigError(
            f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)} of {n}; pass every shard"
        )


def merge_indexes(
    shards: Sequence[str | Path],
    out: str | Path,
    *,
    root: str | Path | None = None,
    vector_config: VectorIndexConfig | None = None,
) -> BuildReport:
    """Combine shard indexes built with the same checkpoint into one new index.

    Args:
        shards: the shard index folders (every ``i/n`` of one split, or whole indexes of
            disjoint files).
        out: the merged index folder: new, empty, or an unfinished merge.
        root: the merged archive root; default the shards' common root (required when the
            shards were built on machines that mount the archive at different paths).
        vector_config: FAISS options of the merged index; default the first shard's.

    Returns:
        A :class:`BuildReport` of the merged index.

    Raises:
        ConfigError: for mismatched checkpoints, splits or roots, missing or repeated shards, a
            file in two shards, or an ``out`` that already holds an index.
        DataError: if a shard folder holds no published index.
    """
    t0 = time.perf_counter()
    if not shards:
        raise ConfigError("index merge: pass at least one shard folder")
    manifests = []
    for d in map(Path, shards):
        m = read_manifest(d)
        if m is None:
            raise DataError("no published index in this shard folder (did its build finish?)", path=d)
        manifests.append((d, m))
    first_dir, first = manifests[0]
    for d, m in manifests[1:]:
        check_identity(first.identity, m.identity, d)
        if m.dim != first.dim:
            raise ConfigError(f"{d}: dimension {m.dim} differs from {first_dir}'s {first.dim}")
    _check_shards(manifests)
    roots = sorted({m.root for _, m in manifests})
    if root is None and len(roots) > 1:
        raise ConfigError(
            f"the shards index different roots ({', '.join(roots)}); pass --root for the merged index"
        )
    merged_root = Path(root).resolve() if root is not None else Path(roots[0])
    cfg = vector_config or VectorIndexConfig.from_dict(first.vector_config)

    out = Path(out)
    if (out / MANIFEST_FILE).exists():
        raise ConfigError(f"{out}: already holds an index; merge into a new folder")
    if out.exists() and any(
        p.name not in (DB_FILE, ".lock") and not p.name.startswith(DB_FILE) for p in out.iterdir()
    ):
        raise ConfigError(f"{out}: folder exists and is not empty; merge into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    report = BuildReport(index_dir=str(out))
    with IndexLock(out):
        for p in out.glob(DB_FILE + "*"):  # an unfinished merge: start over
            p.unlink()
        store = MetadataStore(out / DB_FILE)
        try:
            store.set_info("identity", first.identity)
            store.set_info("root", str(merged_root))
            store.set_info("shard", "0/1")
            store.set_info("dim", first.dim)
            store.set_info("vector_config", cfg.to_dict())
            seen: dict[str, Path] = {}
            for d, _ in manifests:
                src = MetadataStore(d / DB_FILE, readonly=True)
                try:
                    batch_meta, batch_vecs = [], []
                    for _, meta, vec in src.iter_metadata():
                        if meta.relpath in seen:
                            raise ConfigError(
                                f"{meta.relpath} is in two shards: {seen[meta.relpath]} and {d}"
                            )
                        seen[meta.relpath] = d
                        batch_meta.append(meta)
                        batch_vecs.append(np.frombuffer(vec, dtype="<f4"))
                        if len(batch_meta) == 4096:
                            with store.transaction():
                                store.add_images(batch_meta, np.stack(batch_vecs), 1)
                            batch_meta, batch_vecs = [], []
                    with store.transaction():
                        if batch_meta:
                            store.add_images(batch_meta, np.stack(batch_vecs), 1)
                        for rel, (size, mtime_ns, error) in src.failures().items():
                            store.set_failure(rel, size, mtime_ns, error)
                            report.failed.append({"path": rel, "error": error})
                finally:
                    src.close()
            manifest = publish(
                out, store, 1, first.identity, merged_root, ShardSpec(), first.dim, cfg, len(report.failed)
            )
        finally:
            store.close()
        report.published = True
        report.generation = manifest.generation
        report.count = report.added = report.files = manifest.count
        report.vector_kind = str(manifest.vectors.get("kind", ""))
        report.failed.sort(key=lambda f: f["path"])
        report.seconds = round(time.perf_counter() - t0, 3)
        write_json_atomic(out / REPORT_FILE, report.to_dict())
    logger.info("merged %d shard(s) into %s: %d images", len(manifests), out, report.count)
    return report
