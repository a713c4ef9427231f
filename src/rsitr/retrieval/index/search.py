"""Searching an index: text→image, image→image and image→caption, with typed results.

>>> index = Index.open("runs/my-index")                      # doctest: +SKIP
>>> for r in index.search_text("a harbour with ships", k=5):  # doctest: +SKIP
...     print(r.score, r.path, r.metadata.width, r.metadata.crs)
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rsitr.data.footprints import BBox, parse_bbox
from rsitr.errors import DataError
from rsitr.retrieval.index.identity import check_identity, checkpoint_identity
from rsitr.retrieval.index.ingest import EMBED_MAX_SIDE
from rsitr.retrieval.index.layout import MANIFEST_FILE, Manifest, read_manifest
from rsitr.retrieval.index.scan import resolve_in_root
from rsitr.retrieval.index.store import DB_FILE, ImageMetadata, MetadataStore
from rsitr.retrieval.index.vectors import load_vector_index, merge_params
from rsitr.retrieval.index.vectors import search_vectors as _faiss_search

logger = logging.getLogger(__name__)

__all__ = ["CaptionResult", "Index", "SearchResult"]

ImageInput = str | Path | Image.Image
BBoxLike = str | Sequence[float] | BBox


@dataclass(frozen=True)
class SearchResult:
    """One image hit.

    Attributes:
        rank: 1-based rank.
        id: the image's id in the index (stable until the file changes).
        path: the image file (archive root / relative path).
        score: cosine similarity (inner product of L2-normalised embeddings).
        metadata: what the index stores about the file.
    """

    rank: int
    id: int
    path: Path
    score: float
    metadata: ImageMetadata

    @property
    def name(self) -> str:
        """The path relative to the archive root."""
        return self.metadata.relpath

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "rank": self.rank,
            "id": self.id,
            "name": self.name,
            "path": str(self.path),
            "score": round(self.score, 6),
            "metadata": self.metadata.to_dict(),
        }


@dataclass(frozen=True)
class CaptionResult:
    """One caption hit of an image→caption search.

    Attributes:
        rank: 1-based rank.
        index: position of the caption in the caption corpus.
        caption: the caption text.
        score: cosine similarity.
    """

    rank: int
    index: int
    caption: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "rank": self.rank,
            "index": self.index,
            "caption": self.caption,
            "score": round(self.score, 6),
        }


class Index:
    """An opened index: its manifest, metadata store, FAISS file and (optionally) model.

    Use :meth:`open`. Searches are thread-safe.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        store: MetadataStore,
        vectors: Any,
        root: Path,
        checkpoint: Path,
        search_params: dict[str, Any] | None,
        device: torch.device,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.store = store
        self.vectors = vectors
        self.root = root
        self.checkpoint = checkpoint
        self.device = device
        self._search_params = search_params
        self._method: Any = None
        self._lock = threading.RLock()
        self._manifest_mtime = self._mtime()
        self._caption_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._subset: Any = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | Path,
        checkpoint: str | Path | None = None,
        *,
        root: str | Path | None = None,
        device: str | torch.device = "cpu",
        search_params: dict[str, Any] | None = None,
        load_model: bool = True,
    ) -> Index:
        """Open a published index.

        Args:
            directory: the index folder.
            checkpoint: the model to embed queries with; default the checkpoint the index was
                built with (its recorded path). Either way it must be the same checkpoint.
            root: the archive root, if the archive moved since the build.
            device: where the model runs.
            search_params: query-time FAISS options (``nprobe``, ``refine_factor``,
                ``ef_search``) overriding the stored ones.
            load_model: load the model now (else on the first query that needs it).

        Returns:
            The index.

        Raises:
            DataError: if nothing was published in ``directory`` or a file is missing.
            IndexMismatchError: if ``checkpoint`` is not the one the index was built with.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest is None:
            raise DataError(
                "no index here (or its first build has not finished): run 'rsitr index build' first",
                path=directory,
            )
        ckpt = Path(checkpoint) if checkpoint is not None else Path(manifest.identity.get("path", ""))
        if checkpoint is None and not ckpt.exists():
            raise DataError(
                f"the checkpoint this index was built with is gone ({ckpt}); pass --checkpoint",
                path=directory,
            )
        check_identity(manifest.identity, checkpoint_identity(ckpt), directory)
        store = MetadataStore(directory / DB_FILE, readonly=True)
        params = merge_params(manifest.vectors, search_params)
        vectors = load_vector_index(directory / manifest.vectors["file"], params)
        index = cls(
            directory,
            manifest,
            store,
            vectors,
            Path(root) if root is not None else Path(manifest.root),
            ckpt,
            search_params,
            torch.device(device),
        )
        if load_model:
            index.method  # noqa: B018 - load now
        return index

    def close(self) -> None:
        """Release the database connection."""
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mtime(self) -> int:
        try:
            return (self.directory / MANIFEST_FILE).stat().st_mtime_ns
        except OSError:
            return 0

    def reload_if_changed(self) -> bool:
        """Pick up a generation published since opening (cheap when nothing changed).

        Returns:
            True if a new generation was loaded.
        """
        mtime = self._mtime()
        if mtime == self._manifest_mtime:
            return False
        with self._lock:
            self._manifest_mtime = mtime
            try:
                manifest = read_manifest(self.directory)
                if manifest is None or manifest.generation == self.manifest.generation:
                    return False
                check_identity(self.manifest.identity, manifest.identity, self.directory)
                params = merge_params(manifest.vectors, self._search_params)
                vectors = load_vector_index(self.directory / manifest.vectors["file"], params)
            except (DataError, KeyError, TypeError) as e:  # a corrupt manifest, a missing FAISS file
                logger.warning(
                    "%s: new generation not loaded, still serving generation %d: %s",
                    self.directory, self.manifest.generation, e,
                )  # fmt: skip
                return False
            self.vectors, self.manifest = vectors, manifest
            logger.info(
                "%s: loaded generation %d (%d images)", self.directory, manifest.generation, manifest.count
            )
            return True

    # -- properties ---------------------------------------------------------------------------
    @property
    def method(self) -> Any:
        """The retrieval method (loaded on first use)."""
        if self._method is None:
            with self._lock:
                if self._method is None:
                    from rsitr.models.checkpoint import load_method

                    self._method = load_method(self.checkpoint, device=self.device).eval()
        return self._method

    @property
    def count(self) -> int:
        """Images in the published index."""
        return int(self.manifest.count)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.manifest.dim)

    @property
    def generation(self) -> int:
        """The loaded generation."""
        return int(self.manifest.generation)

    @property
    def kind(self) -> str:
        """``flat``, ``ivfpq`` or ``hnsw``."""
        return str(self.manifest.vectors.get("kind", ""))

    # -- encoding -----------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised (N, D) float32 embeddings of query texts."""
        method = self.method
        out = []
        with self._lock, torch.no_grad():
            for s in range(0, len(texts), 256):
                tok = method.tokenize(list(texts[s : s + 256]))
                ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
                out.append(method.encode_text(ids, mask).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_image(self, image: ImageInput) -> np.ndarray:
        """The L2-normalised (1, D) float32 embedding of an image file or PIL image.

        Raises:
            DataError: if the file cannot be read as an image.
        """
        from rsitr.data.images import load_image
        from rsitr.data.transforms import EvalTransform

        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
            if max(pil.size) > EMBED_MAX_SIDE:
                pil = pil.copy()
                pil.thumbnail((EMBED_MAX_SIDE, EMBED_MAX_SIDE), Image.Resampling.BILINEAR)
        else:
            pil = load_image(image, max_side=EMBED_MAX_SIDE)
        method = self.method
        enc = method.image_encoder
        x = EvalTransform(enc.image_size, enc.mean, enc.std)(pil)[None].to(self.device)
        with self._lock, torch.no_grad():
            return method.encode_image(images=x).float().cpu().numpy()

    # -- searching ----------------------------------------------------------------------------
    def _subset_searcher(self) -> Any:
        from rsitr.retrieval.index.filters import SubsetSearcher

        with self._lock:
            if self._subset is None or self._subset.index is not self.vectors:
                self._subset = SubsetSearcher(self.vectors)
            return self._subset

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        bbox: BBoxLike | None = None,
        min_score: float | None = None,
    ) -> list[list[SearchResult]]:
        """Top-``k`` images for each row of a (Q, D) array of L2-normalised query vectors.

        Args:
            queries: the query vectors.
            k: results per query.
            bbox: keep only images whose footprint intersects this EPSG:4326 box
                (``"minx,miny,maxx,maxy"``, a 4-sequence or a :class:`BBox`). The box filters
                before ranking: the results are the best ``k`` inside it.
            min_score: drop results scoring below this cosine similarity.

        Raises:
            ConfigError: for a malformed box.
        """
        box = parse_bbox(bbox)
        n_queries = len(np.atleast_2d(queries))
        if self.count == 0:
            return [[] for _ in range(n_queries)]
        if box is None:
            scores, ids = _faiss_search(self.vectors, queries, k)
        else:
            from rsitr.retrieval.index.filters import ids_in_bbox

            scores, ids = self._subset_searcher().search(queries, k, ids_in_bbox(self.store, box))
        meta = self.store.metadata(sorted({int(i) for i in ids.ravel() if i >= 0}))
        out = []
        for srow, irow in zip(scores, ids, strict=True):
            hits = []
            for s, i in zip(srow, irow, strict=True):
                m = meta.get(int(i))
                if i < 0 or m is None:  # no hit, or a row dropped by a newer generation
                    continue
                if min_score is not None and s < min_score:
                    break  # results come best first
                hits.append(SearchResult(len(hits) + 1, int(i), self.root / m.relpath, float(s), m))
            out.append(hits)
        return out

    def search_text(
        self, query: str, k: int = 10, *, bbox: BBoxLike | None = None, min_score: float | None = None
    ) -> list[SearchResult]:
        """Text→image: the ``k`` images that best match ``query`` (filters: see :meth:`search_vectors`)."""
        return self.search_vectors(self.encode_text([query]), k, bbox=bbox, min_score=min_score)[0]

    def search_texts(
        self,
        queries: Sequence[str],
        k: int = 10,
        *,
        bbox: BBoxLike | None = None,
        min_score: float | None = None,
    ) -> list[list[SearchResult]]:
        """Text→image for several queries at once."""
        return self.search_vectors(self.encode_text(queries), k, bbox=bbox, min_score=min_score)

    def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        *,
        bbox: BBoxLike | None = None,
        min_score: float | None = None,
    ) -> list[SearchResult]:
        """Image→image: the ``k`` indexed images most similar to ``image`` (file or PIL image)."""
        return self.search_vectors(self.encode_image(image), k, bbox=bbox, min_score=min_score)[0]

    def search_captions(self, image: ImageInput, captions: Sequence[str], k: int = 10) -> list[CaptionResult]:
        """Image→caption: rank ``captions`` for ``image`` (caption embeddings are cached).

        Raises:
            DataError: if ``captions`` is empty or the image cannot be read.
        """
        if not captions:
            raise DataError("no caption to rank", field="captions")
        key = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
        with self._lock:
            emb = self._caption_cache.get(key)
            if emb is None:
                emb = self.encode_text(captions)
                self._caption_cache[key] = emb
                while len(self._caption_cache) > 4:
                    self._caption_cache.popitem(last=False)
        scores = emb @ self.encode_image(image)[0]
        top = np.argsort(-scores, kind="stable")[: max(1, int(k))]
        return [CaptionResult(r + 1, int(i), captions[int(i)], float(scores[i])) for r, i in enumerate(top)]

    # -- images by id -------------------------------------------------------------------------
    def get(self, image_id: int) -> ImageMetadata | None:
        """Metadata of an image id, or ``None`` if the id is unknown."""
        return self.store.metadata([int(image_id)]).get(int(image_id))

    def image_path(self, image_id: int) -> Path | None:
        """The file of an image id (always inside the archive root), or ``None`` if unknown."""
        m = self.get(image_id)
        if m is None:
            return None
        try:
            return resolve_in_root(self.root, m.relpath)
        except DataError:
            return None
