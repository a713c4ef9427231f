"""Exporting an index as GeoParquet: one row per image, its footprint as the geometry.

The file follows the GeoParquet specification as GeoPandas writes it (the ``geo`` metadata
key, WKB geometries, a covering ``bbox`` column): the footprint is a Polygon in EPSG:4326
(lon/lat), a MultiPolygon split at ±180 for an image across the antimeridian, and null for an
image without georeferencing. Columns: ``id, path, sha256, size, width, height, crs,
acquired`` (timestamp, null where the file has no date tag), ``embedding`` (list<float32>),
``geometry`` and ``bbox``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsitr.data.footprints import footprint_geometry
from rsitr.errors import ConfigError, DataError, MissingDependencyError
from rsitr.retrieval.index.layout import read_manifest
from rsitr.retrieval.index.store import DB_FILE, MetadataStore

__all__ = ["ExportReport", "export_geoparquet"]

FORMATS = ("geoparquet",)


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote.

    Attributes:
        path: the output file.
        rows: images written.
        georeferenced: of those, images with a footprint.
        generation: the index generation exported.
    """

    path: str
    rows: int
    georeferenced: int
    generation: int

    def line(self) -> str:
        """A one-line summary."""
        return (
            f"{self.path}: {self.rows} images ({self.georeferenced} with a footprint, "
            f"{self.rows - self.georeferenced} without), generation {self.generation}"
        )


def export_geoparquet(index_dir: str | Path, out: str | Path) -> ExportReport:
    """Write the published generation of an index as a GeoParquet file.

    Args:
        index_dir: the index folder.
        out: the ``.parquet`` file to write (replaced atomically).

    Returns:
        The :class:`ExportReport`.

    Raises:
        DataError: if nothing was published in ``index_dir``.
        MissingDependencyError: without GeoPandas (the ``geo`` extra).
    """
    try:
        import geopandas as gpd
        import pandas as pd
    except ImportError as e:
        raise MissingDependencyError(
            f"GeoParquet export needs the geo extra: pip install 'rsitr[geo]' ({e})"
        ) from e
    index_dir, out = Path(index_dir), Path(out)
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise DataError("no published index here: run 'rsitr index build' first", path=index_dir)
    if out.exists() and out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the .parquet file to write")
    keys = ("id", "path", "sha256", "size", "width", "height", "crs", "acquired")
    cols: dict[str, list] = {k: [] for k in keys}
    embeddings, geometries = [], []
    store = MetadataStore(index_dir / DB_FILE, readonly=True)
    try:
        for row_id, m, vec in store.iter_metadata(manifest.generation):
            for key, value in (
                ("id", row_id), ("path", m.relpath), ("sha256", m.sha256), ("size", m.size),
                ("width", m.width), ("height", m.height), ("crs", m.crs), ("acquired", m.acquired),
            ):  # fmt: skip
                cols[key].append(value)
            embeddings.append(np.frombuffer(vec, dtype="<f4").astype(np.float32))
            geometries.append(None if m.footprint is None else footprint_geometry(m.footprint))
    finally:
        store.close()
    frame = pd.DataFrame(cols)
    frame["id"] = frame["id"].astype("int64")
    for key in ("size", "width", "height"):
        frame[key] = frame[key].astype("Int64")
    frame["acquired"] = pd.to_datetime(frame["acquired"], format="%Y-%m-%dT%H:%M:%S", errors="coerce")
    frame["embedding"] = pd.Series(embeddings, dtype=object)
    gdf = gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geometries, crs="EPSG:4326"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    gdf.to_parquet(tmp, index=False, write_covering_bbox=True)
    os.replace(tmp, out)
    n_geo = sum(g is not None for g in geometries)
    return ExportReport(str(out), len(gdf), n_geo, manifest.generation)
