"""Reading one archive file for indexing: pixels for the model, plus hash, size and georeference."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from rsitr.data.footprints import lonlat_footprint
from rsitr.data.images import load_image, read_acquisition_time, read_geo_info
from rsitr.errors import DataError
from rsitr.hashing import file_sha256
from rsitr.retrieval.index.scan import FileStat
from rsitr.retrieval.index.store import ImageMetadata

logger = logging.getLogger(__name__)

__all__ = ["EMBED_MAX_SIDE", "Ingested", "embed_batch", "image_size", "ingest_file"]

#: Longest side images are decoded to before the model's own resize (fast JPEG draft decoding,
#: pyramid levels of big GeoTIFFs). Index builds and image queries both use it.
EMBED_MAX_SIDE = 1024

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class Ingested:
    """One file read for indexing.

    Attributes:
        stat: the file as scanned.
        image: the model input (3, H, W), or ``None`` if the file could not be read.
        metadata: the metadata row (``None`` on failure).
        error: the one-line reason of a failure, else ``""``.
    """

    stat: FileStat
    image: torch.Tensor | None
    metadata: ImageMetadata | None
    error: str = ""


def image_size(path: Path) -> tuple[int | None, int | None]:
    """Stored ``(width, height)`` of an image, read from its header (``None`` if unknown)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - not a Pillow format: try the TIFF header
        pass
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return int(page.imagewidth), int(page.imagelength)
    except Exception:  # noqa: BLE001
        return None, None


def _reason(e: Exception, path: Path) -> str:
    """The first line of an error, without the file name the report already shows."""
    text = (str(e).splitlines() or [""])[0] or type(e).__name__
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def ingest_file(root: Path, stat: FileStat, transform: Transform) -> Ingested:
    """Read one archive file: decoded and transformed pixels, content hash, size, georeference.

    Never raises for a bad file: the failure comes back in :attr:`Ingested.error`.

    Args:
        root: the archive root.
        stat: the scanned file.
        transform: PIL image → model input tensor.

    Returns:
        The :class:`Ingested` record.
    """
    path = root / stat.relpath
    try:
        pixels = transform(load_image(path, max_side=EMBED_MAX_SIDE))
        sha = file_sha256(path)
    except (DataError, OSError, ValueError) as e:
        return Ingested(stat, None, None, _reason(e, path))
    width, height = image_size(path)
    geo = None
    try:
        geo = read_geo_info(path)
    except DataError as e:  # georeference is optional: keep the image, log the reason
        logger.warning("no georeference for %s: %s", stat.relpath, e)
    footprint = None if geo is None else lonlat_footprint(geo.crs, geo.transform, geo.width, geo.height)
    meta = ImageMetadata(
        relpath=stat.relpath,
        size=stat.size,
        mtime_ns=stat.mtime_ns,
        sha256=sha,
        width=width,
        height=height,
        crs=None if geo is None else geo.crs,
        bounds=None if geo is None else geo.bounds,
        transform=None if geo is None else geo.transform,
        lonlat_bounds=None if footprint is None else footprint.bbox,
        footprint=None if footprint is None else footprint.ring,
        acquired=read_acquisition_time(path),
    )
    return Ingested(stat, pixels, meta)


def embed_batch(
    method: torch.nn.Module,
    batch: list[Ingested],
    device: torch.device,
    views: tuple[str, ...] = ("identity",),
) -> np.ndarray:
    """(N, D) float32 image embeddings of the readable files of a batch, averaged over the
    test-time ``views`` (see ``--tta``)."""
    from rsitr.retrieval.embed import apply_view, average_views

    x = torch.stack([b.image for b in batch if b.image is not None]).to(device)
    with torch.no_grad():
        per_view = [method.encode_image(images=apply_view(x, v)).float().cpu() for v in views]  # type: ignore[operator]
    return average_views(per_view).numpy()
