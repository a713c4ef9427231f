"""On-disk cache of frozen-tower features, keyed by model, preprocessing and data.

When a tower is frozen, its outputs are a fixed function of the input, so they are computed
once and stored as safetensors shards under ``<dir>/<key>/``. The key hashes the encoder's
identity (name, weights, preprocessing), the method's feature hook, the image view and the data
(file names and SHA-256 of their contents; or the caption strings). Extraction writes one shard
per block of images and a ``complete.json`` at the end, so an interrupted extraction resumes at
the first missing shard. Runs sharing one cache split the work: each skips the shards another
has written, and each writes through its own temporary file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rsitr.data.corpus import RetrievalCorpus
from rsitr.hashing import file_sha256

logger = logging.getLogger(__name__)

ComputeFn = Callable[[int, int], tuple[dict[str, Tensor], Tensor]]

#: safetensors dtype names → torch dtypes (the ones features are stored in)
_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}  # fmt: skip


def data_fingerprint(corpus: RetrievalCorpus) -> str:
    """Hash of the image files (name and content) of a corpus.

    Content, not mtime: a copy or re-mount of the same files (new mtimes) keeps its cache, and a
    file rewritten with new pixels does not. Hashing RSICD's 9,828 JPEGs (≈ 200 MB) takes ≈ 7 s.
    """
    h = hashlib.sha256()
    for im in corpus.images:
        h.update(im.filename.encode())
        if im.path is not None:
            try:
                h.update(file_sha256(im.path).encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


def text_fingerprint(captions: list[str]) -> str:
    """Hash of caption strings."""
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode())
        h.update(b"\x00")
    return h.hexdigest()


def cache_key(payload: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class FeatureCache:
    """A folder of cached feature sets.

    Args:
        root: cache folder.
        shard_size: rows per shard (the resume granularity).
    """

    def __init__(self, root: str | Path, shard_size: int = 2048) -> None:
        self.root = Path(root)
        self.shard_size = shard_size

    def get(
        self,
        payload: dict[str, Any],
        n: int,
        compute: ComputeFn,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Load the feature set described by ``payload`` or compute it shard by shard.

        Args:
            payload: everything the features depend on (hashed into the key).
            n: number of rows.
            compute: ``compute(start, stop) -> (feats, valid)`` for rows ``[start, stop)``.
            progress: optional ``(done, total)`` callback.

        Returns:
            ``(feats, valid)`` with (n, …) tensors and an (n,) bool mask.
        """
        folder = self.root / cache_key(payload)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "payload.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
        complete = folder / "complete.json"
        starts = list(range(0, n, self.shard_size))
        shards = [folder / f"shard_{i:05d}.safetensors" for i in range(len(starts))]
        rows = [min(st + self.shard_size, n) - st for st in starts]
        if not complete.exists():
            todo = [i for i, p in enumerate(shards) if not p.exists()]
            if len(todo) < len(shards):
                logger.info(
                    "feature cache %s: resuming, %d of %d shards done",
                    folder.name,
                    len(shards) - len(todo),
                    len(shards),
                )
            t0, computed = time.perf_counter(), 0
            for j, i in enumerate(todo):
                s, e = starts[i], starts[i] + rows[i]
                if not shards[i].exists():  # else another run on the same cache wrote it meanwhile
                    feats, valid = compute(s, e)
                    tensors = {f"feat.{k}": v.contiguous() for k, v in feats.items()}
                    tensors["valid"] = valid.to(torch.uint8)
                    tmp = shards[i].with_name(f"{shards[i].name}.{os.getpid()}.tmp")  # one per writer
                    save_file(tensors, str(tmp))
                    os.replace(tmp, shards[i])
                    computed += 1
                if progress is not None:  # rows in written shards, whoever wrote them
                    progress(sum(r for r, p in zip(rows, shards, strict=True) if p.exists()), n)
                # A log line per shard, so that non-interactive runs (logs, CI) show progress too;
                # the ETA rates the shards this run computed over the ones still missing.
                left = sum(not shards[k].exists() for k in todo[j + 1 :])
                eta = (time.perf_counter() - t0) / max(computed, 1) * left
                logger.info(
                    "feature cache %s: shard %d/%d done, ETA %.0f s", folder.name, i + 1, len(shards), eta
                )
            complete.write_text(json.dumps({"rows": n, "shards": len(shards)}))
        return _read_shards(shards, starts, n)


def _read_shards(shards: list[Path], starts: list[int], n: int) -> tuple[dict[str, Tensor], Tensor]:
    """Concatenate the shards' tensors into tensors allocated once, reading one tensor at a time,
    so the peak is the feature set plus one shard's tensor (``torch.cat`` of loaded shards holds
    the set twice)."""
    if not shards:
        return {}, torch.zeros(0, dtype=torch.bool)
    with safe_open(str(shards[0]), framework="pt") as f:
        first = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        layout = {k: (sl.get_shape()[1:], _DTYPES[sl.get_dtype()]) for k, sl in first.items()}
    out = {k: torch.empty((n, *shape), dtype=dtype) for k, (shape, dtype) in layout.items()}
    for path, s in zip(shards, starts, strict=True):
        with safe_open(str(path), framework="pt") as f:
            for k in out:
                t = f.get_tensor(k)
                out[k][s : s + t.shape[0]].copy_(t)
                del t
    valid = out.pop("valid").bool()
    return {k[5:]: v for k, v in out.items()}, valid
