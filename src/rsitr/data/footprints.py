"""Image footprints in EPSG:4326 and the bounding boxes that filter them.

A GeoTIFF's footprint is the outline of its pixel grid, mapped through its affine transform and
reprojected from its CRS to longitude/latitude with pyproj. The edges are densified (a straight
edge in UTM is curved in lon/lat) and the ring is *unwrapped*: consecutive longitudes never
jump by more than 180°, so a footprint across the antimeridian runs past ±180 instead of
wrapping. Its bounding box follows GeoJSON (RFC 7946, §5.2): ``west > east`` when it crosses.
As a geometry (:func:`footprint_geometry`) such a ring is split at ±180 into a MultiPolygon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rsitr.errors import ConfigError

__all__ = [
    "BBox",
    "Footprint",
    "footprint_geometry",
    "footprint_intersects",
    "lonlat_footprint",
    "parse_bbox",
]

#: Points per edge of the pixel grid that are reprojected (corners included).
EDGE_POINTS = 9


@dataclass(frozen=True)
class BBox:
    """A query box in EPSG:4326 degrees: ``west <= east`` and ``south <= north``."""

    west: float
    south: float
    east: float
    north: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)``."""
        return (self.west, self.south, self.east, self.north)


@dataclass(frozen=True)
class Footprint:
    """An image outline in lon/lat.

    Attributes:
        ring: closed ring of unwrapped ``(lon, lat)`` points (longitudes may pass ±180).
        bbox: ``(west, south, east, north)`` with longitudes in [-180, 180]; ``west > east``
            when the footprint crosses the antimeridian.
    """

    ring: tuple[tuple[float, float], ...]
    bbox: tuple[float, float, float, float]


def parse_bbox(value: str | Sequence[float] | BBox | None, field: str = "bbox") -> BBox | None:
    """Parse ``"minx,miny,maxx,maxy"`` (EPSG:4326 degrees) into a :class:`BBox`.

    Raises:
        ConfigError: with a one-line reason for a wrong count, a non-number, a value out of range
            or a reversed order.
    """
    if value is None or isinstance(value, BBox):
        return value
    parts: list[Any] = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) != 4:
        raise ConfigError(f"{field}: expected 4 numbers minx,miny,maxx,maxy (EPSG:4326), got {len(parts)}")
    try:
        w, s, e, n = (float(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: {value!r} is not four numbers minx,miny,maxx,maxy") from exc
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise ConfigError(f"{field}: values must be finite")
    if not (-180 <= w <= 180 and -180 <= e <= 180):
        raise ConfigError(f"{field}: longitudes must lie in [-180, 180], got {w:g} and {e:g}")
    if not (-90 <= s <= 90 and -90 <= n <= 90):
        raise ConfigError(f"{field}: latitudes must lie in [-90, 90], got {s:g} and {n:g}")
    if w > e or s > n:
        raise ConfigError(
            f"{field}: expected minx <= maxx and miny <= maxy (west,south,east,north), "
            f"got {w:g},{s:g},{e:g},{n:g}"
        )
    return BBox(w, s, e, n)


@lru_cache(maxsize=64)
def _transformer(crs: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def _grid_outline(width: int, height: int) -> list[tuple[float, float]]:
    """Pixel-corner coordinates around the grid, counter-clockwise from the top-left corner."""
    t = [i / (EDGE_POINTS - 1) for i in range(EDGE_POINTS - 1)]
    left = [(0.0, v * height) for v in t]
    bottom = [(u * width, float(height)) for u in t]
    right = [(float(width), (1 - v) * height) for v in t]
    top = [((1 - u) * width, 0.0) for u in t]
    return left + bottom + right + top


def _unwrap(lons: Sequence[float]) -> list[float]:
    out = [float(lons[0])]
    for lon in lons[1:]:
        lon = float(lon)
        while lon - out[-1] > 180:
            lon -= 360
        while lon - out[-1] < -180:
            lon += 360
        out.append(lon)
    shift = 360.0 * round(sum(out) / len(out) / 360.0)  # centre the ring in [-180, 180] on average
    return [x - shift for x in out]


def _wrap(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0 if not -180.0 <= lon <= 180.0 else lon


def lonlat_footprint(
    crs: str | None, transform: Sequence[float] | None, width: int | None, height: int | None
) -> Footprint | None:
    """The EPSG:4326 footprint of a georeferenced pixel grid.

    Args:
        crs: the grid's CRS (``"EPSG:<code>"``); ``None``: no footprint.
        transform: affine ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f``.
        width: grid width in pixels.
        height: grid height in pixels.

    Returns:
        The :class:`Footprint`, or ``None`` without a CRS, transform or size, or when the corners
        do not reproject to finite coordinates.
    """
    if not crs or transform is None or not width or not height:
        return None
    a, b, c, d, e, f = (float(v) for v in transform)
    pix = _grid_outline(int(width), int(height))
    xs = [a * u + b * v + c for u, v in pix]
    ys = [d * u + e * v + f for u, v in pix]
    try:
        lons, lats = _transformer(crs).transform(xs, ys)
    except Exception:  # noqa: BLE001 - pyproj raises CRSError/ProjError for unusable CRSs
        return None
    lons, lats = list(lons), [float(v) for v in lats]
    if not all(math.isfinite(v) for v in (*lons, *lats)):
        return None
    lons = _unwrap(lons)
    ring = tuple(zip(lons, lats, strict=True))
    ring = (*ring, ring[0])
    west, east = min(lons), max(lons)
    if east - west >= 360:
        west, east = -180.0, 180.0
    bbox = (_wrap(west), min(lats), _wrap(east), max(lats))
    return Footprint(ring=ring, bbox=bbox)


def footprint_geometry(ring: Sequence[Sequence[float]]) -> Any:
    """A shapely Polygon of an unwrapped ring, or a MultiPolygon split at the antimeridian."""
    from shapely import affinity
    from shapely.geometry import MultiPolygon, Polygon, box

    poly = Polygon([(float(x), float(y)) for x, y in ring])
    if not poly.is_valid:
        poly = poly.buffer(0)
    minx, _, maxx, _ = poly.bounds
    if minx >= -180 and maxx <= 180:
        return poly
    parts = []
    for shift in (-360.0, 0.0, 360.0):  # the pieces in each copy of the world, moved into [-180, 180]
        piece = poly.intersection(box(-180 + shift, -90, 180 + shift, 90))
        if not piece.is_empty:
            piece = affinity.translate(piece, xoff=-shift)
            parts.extend(getattr(piece, "geoms", [piece]))
    polys = [p for p in parts if isinstance(p, Polygon) and p.area > 0]
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def footprint_intersects(ring: Sequence[Sequence[float]], bbox: BBox) -> bool:
    """Whether a footprint ring intersects a query box (exact polygon test, antimeridian-aware)."""
    from shapely.geometry import box

    return bool(footprint_geometry(ring).intersects(box(*bbox.as_tuple())))
