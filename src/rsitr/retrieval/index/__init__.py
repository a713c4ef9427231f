"""Search indexes of image archives: build (resumable, incremental, local or on Ray), search, export.

An index folder pairs a SQLite database (one row per image: path, size, mtime, content hash,
image size, GeoTIFF bounds and CRS, and its embedding) with a FAISS file over the embeddings
(exact ``Flat``, or IVF-PQ / HNSW past a configurable size), and records the identity of the
checkpoint that embedded it. See :func:`build_index`, :class:`Index` and :func:`export_geoparquet`.
"""

from rsitr.retrieval.index.build import BuildReport, RayOptions, build_index
from rsitr.retrieval.index.captions import read_captions
from rsitr.retrieval.index.export import export_geoparquet
from rsitr.retrieval.index.identity import IndexMismatchError, checkpoint_identity
from rsitr.retrieval.index.layout import Manifest, read_manifest
from rsitr.retrieval.index.search import CaptionResult, Index, SearchResult
from rsitr.retrieval.index.store import ImageMetadata, image_id
from rsitr.retrieval.index.vectors import VectorIndexConfig

__all__ = [
    "BuildReport",
    "CaptionResult",
    "ImageMetadata",
    "Index",
    "IndexMismatchError",
    "Manifest",
    "RayOptions",
    "SearchResult",
    "VectorIndexConfig",
    "build_index",
    "checkpoint_identity",
    "export_geoparquet",
    "image_id",
    "read_captions",
    "read_manifest",
]
