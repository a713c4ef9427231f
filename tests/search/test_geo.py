"""Georeferenced archives: footprints of real GeoTIFFs (written with rasterio in several CRSs),
the GeoParquet export read back with GeoPandas, and the bbox / min-score filters in Python, the
CLI and the API. Expected corners are computed by hand from each CRS's definition."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.cli import run
from rsitr.errors import ConfigError
from rsitr.retrieval.index import Index, build_index, export_geoparquet
from tests.search.conftest import SearchAssets

rasterio = pytest.importorskip("rasterio", reason="writing GeoTIFFs needs rasterio (the test extra)")
from rasterio.transform import from_origin  # noqa: E402

A = 6378137.0  # WGS 84 semi-major axis (m)
K0 = 0.9996  # UTM scale on the central meridian
M_PER_DEG_LAT = A * (1 - 0.0066943799901413165) * math.pi / 180  # meridian arc per degree at the equator
SIDE = 128


@dataclass(frozen=True)
class GeoArchive:
    """The archive, its index, and the expected lon/lat corners of each file."""

    root: Path
    index: Path
    corners: dict[
        str, list[tuple[float, float]] | None
    ]  # (lon, lat): top-left, top-right, bottom-right, bottom-left


def _write_tiff(
    path: Path, rgb: np.ndarray, crs: str | None, transform: object, when: str | None = None
) -> None:
    kwargs = {"crs": crs} if crs else {}
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=SIDE,
        height=SIDE,
        count=3,
        dtype="uint8",
        transform=transform,
        **kwargs,
    ) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))
        if when:
            dst.update_tags(TIFFTAG_DATETIME=when)


def _mercator_lat(y: float) -> float:
    """EPSG:3857 northing → latitude: φ = 2·atan(exp(y/R)) − π/2."""
    return math.degrees(2 * math.atan(math.exp(y / A)) - math.pi / 2)


def _equator_lon(cm: float, dx: float) -> float:
    """Transverse Mercator on the equator: easting offset dx → longitude, λ = asin(tanh(dx/(k0·a)))."""
    return cm + math.degrees(math.asin(math.tanh(dx / (K0 * A))))


@pytest.fixture(scope="module")
def geo(assets: SearchAssets, tmp_path_factory: pytest.TempPathFactory) -> GeoArchive:
    root = tmp_path_factory.mktemp("geo") / "archive"
    root.mkdir()
    pixels = [
        np.asarray(Image.open(p).convert("RGB").resize((SIDE, SIDE)))
        for p in sorted(assets.archive.glob("*.jpg"))
    ]
    corners: dict[str, list[tuple[float, float]] | None] = {}

    def box(w: float, s: float, e: float, n: float) -> list[tuple[float, float]]:
        return [(w, n), (e, n), (e, s), (w, s)]

    # EPSG:4326: degrees as they are; two clusters (Europe, Africa)
    for i in range(6):
        lon0, lat0 = (10 + 0.5 * i, 46.0) if i < 3 else (30 + 0.5 * i, -9.0)
        _write_tiff(
            root / f"wgs84_{i}.tif",
            pixels[i],
            "EPSG:4326",
            from_origin(lon0, lat0, 0.01, 0.01),
            "2024:05:06 10:11:12",
        )
        corners[f"wgs84_{i}.tif"] = box(lon0, lat0 - 1.28, lon0 + 1.28, lat0)
    # EPSG:3857 (spherical Mercator): x = R·λ, y = R·ln tan(π/4 + φ/2)
    x0, y0, px = 2_300_000.0, 5_800_000.0, 100.0
    _write_tiff(root / "mercator.tif", pixels[6], "EPSG:3857", from_origin(x0, y0, px, px))
    lon = lambda x: math.degrees(x / A)  # noqa: E731
    corners["mercator.tif"] = box(
        lon(x0), _mercator_lat(y0 - SIDE * px), lon(x0 + SIDE * px), _mercator_lat(y0)
    )
    # UTM 33N (EPSG:32633), lower-left corner on the central meridian (15°E) at the equator
    _write_tiff(root / "utm33n.tif", pixels[7], "EPSG:32633", from_origin(500_000, SIDE * 100.0, 100, 100))
    top = SIDE * 100.0 / (K0 * M_PER_DEG_LAT)
    corners["utm33n.tif"] = box(15.0, 0.0, _equator_lon(15.0, SIDE * 100.0), top)
    # UTM 33S (EPSG:32733): false northing 10,000 km; upper-left corner at (15°E, 0°)
    _write_tiff(root / "utm33s.tif", pixels[8], "EPSG:32733", from_origin(500_000, 10_000_000, 100, 100))
    corners["utm33s.tif"] = box(15.0, -top, _equator_lon(15.0, SIDE * 100.0), 0.0)
    # across the antimeridian: UTM 60N (central meridian 177°E), 2.7°..3.3° east of it, at the equator
    _write_tiff(
        root / "antimeridian.tif", pixels[9], "EPSG:32660", from_origin(800_000, SIDE * 500.0, 500, 500)
    )
    corners["antimeridian.tif"] = box(  # unwrapped: the ring runs past +180
        _equator_lon(177.0, 300_000), 0.0, _equator_lon(177.0, 300_000 + SIDE * 500.0), 0.578
    )
    # a GeoTIFF with a transform but no CRS, and a plain JPEG: no footprint
    _write_tiff(root / "no_crs.tif", pixels[10], None, from_origin(100, 200, 1, 1))
    corners["no_crs.tif"] = None
    Image.fromarray(pixels[11]).save(root / "plain.jpg")
    corners["plain.jpg"] = None
    index = root.parent / "index"
    build_index(root, assets.ckpt, index, batch_size=8)
    return GeoArchive(root, index, corners)


def test_footprints_match_hand_computed_corners(geo: GeoArchive, assets: SearchAssets) -> None:
    with Index.open(geo.index, assets.ckpt, load_model=False) as ix:
        metas = {h.name: h.metadata for h in ix.search_vectors(np.ones((1, ix.dim), np.float32), k=100)[0]}
    assert set(metas) == set(geo.corners)
    for name, want in geo.corners.items():
        m = metas[name]
        if want is None:
            assert m.footprint is None and m.lonlat_bounds is None and not m.georeferenced, name
            continue
        # the spherical approximations of UTM 3° off its central meridian hold to ~1e-3°
        tol, tol_lat = (2e-3, 2e-3) if name == "antimeridian.tif" else (1e-6, 1e-5)
        ring = np.array(m.footprint)
        got = [
            ring[0],
            ring[24],
            ring[16],
            ring[8],
        ]  # corners: top-left, top-right, bottom-right, bottom-left
        for (lon_w, lat_w), (lon_g, lat_g) in zip(want, got, strict=True):
            assert lon_g == pytest.approx(lon_w, abs=tol) and lat_g == pytest.approx(lat_w, abs=tol_lat), name
    w, s, e, n = metas["antimeridian.tif"].lonlat_bounds
    assert w > 179 and e < -179  # west > east: it crosses ±180 (RFC 7946)
    assert metas["wgs84_0.tif"].acquired == "2024-05-06T10:11:12" and metas["plain.jpg"].acquired is None


def test_geoparquet_export_reads_back_with_geopandas(geo: GeoArchive, tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas", reason="the geo extra")
    out = tmp_path / "archive.parquet"
    report = export_geoparquet(geo.index, out)
    assert (report.rows, report.georeferenced) == (len(geo.corners), 10)
    df = gpd.read_parquet(out).set_index("path")
    assert df.crs.to_epsg() == 4326
    assert (
        run(["index", "export", str(geo.index), str(tmp_path / "cli.parquet"), "--format", "geoparquet"]) == 0
    )
    assert gpd.read_parquet(tmp_path / "cli.parquet").set_index("path").index.equals(df.index)
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert meta["primary_column"] == "geometry" and meta["columns"]["geometry"]["encoding"] == "WKB"
    for name, want in geo.corners.items():
        geom = df.loc[name, "geometry"]
        if want is None:
            assert geom is None or geom.is_empty, name
            continue
        if name == "antimeridian.tif":
            assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2
            east, west = sorted(geom.geoms, key=lambda g: -g.bounds[0])
            assert east.bounds[2] == pytest.approx(180.0) and west.bounds[0] == pytest.approx(-180.0)
            assert east.bounds[0] == pytest.approx(want[0][0], abs=2e-3)
            assert west.bounds[2] == pytest.approx(want[1][0] - 360, abs=2e-3)
            continue
        assert geom.geom_type == "Polygon"
        lons, lats = [c[0] for c in want], [c[1] for c in want]
        assert geom.bounds == pytest.approx((min(lons), min(lats), max(lons), max(lats)), abs=1e-6)
    row = df.loc["wgs84_0.tif"]
    assert row["crs"] == "EPSG:4326" and len(row["embedding"]) == 32 and row["size"] > 0
    assert str(row["acquired"]) == "2024-05-06 10:11:12" and len(row["sha256"]) == 64
    import pandas as pd

    assert pd.isna(df.loc["plain.jpg", "crs"]) and pd.isna(df.loc["plain.jpg", "acquired"])


def test_bbox_filters_before_ranking(geo: GeoArchive, assets: SearchAssets) -> None:
    query = assets.query[0]
    with Index.open(geo.index, assets.ckpt) as ix:
        everything = ix.search_text(query, k=100)
        africa = (28.0, -12.0, 40.0, -5.0)
        inside = ix.search_text(query, k=2, bbox=africa)
        # the best two inside the box, not the global top two cut down to the box
        want = [h for h in everything if h.name.startswith("wgs84_") and int(h.name[6]) >= 3][:2]
        assert [h.name for h in inside] == [h.name for h in want]
        assert [h.score for h in inside] == pytest.approx([h.score for h in want], abs=1e-5)
        assert [h.rank for h in inside] == [1, 2]
        # the antimeridian footprint answers boxes on both sides of ±180, and only those
        assert [h.name for h in ix.search_text(query, k=5, bbox="179.9,0.1,180,0.2")] == ["antimeridian.tif"]
        assert [h.name for h in ix.search_text(query, k=5, bbox=(-180, 0.1, -179.8, 0.2))] == [
            "antimeridian.tif"
        ]
        assert ix.search_text(query, k=5, bbox="170,0.1,179.5,0.2") == []
        # the equator between the two UTM tiles touches both
        assert {h.name for h in ix.search_text(query, k=5, bbox="15.01,-0.01,15.02,0.01")} == {
            "utm33n.tif",
            "utm33s.tif",
        }
        floor = everything[3].score
        assert [h.name for h in ix.search_text(query, k=100, min_score=floor)] == [
            h.name for h in everything[:4]
        ]
        for bad, message in (
            ("1,2,3", "4 numbers"),
            ("10,0,5,1", "minx <= maxx"),
            ("0,-91,1,0", "latitudes"),
        ):
            with pytest.raises(ConfigError, match=message):
                ix.search_text(query, bbox=bad)


def test_bbox_in_the_cli_and_the_api(
    geo: GeoArchive, assets: SearchAssets, capsys: pytest.CaptureFixture[str]
) -> None:
    query = assets.query[0]
    assert run(["search", str(geo.index), query, "--bbox", "9,44,12,46.5", "--top", "10", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert sorted(h["name"] for h in body["results"]) == ["wgs84_0.tif", "wgs84_1.tif", "wgs84_2.tif"]
    assert body["filters"]["bbox"] == [9, 44, 12, 46.5]
    assert run(["search", str(geo.index), query, "--bbox", "12,44,9,46.5"]) == 2
    assert "minx <= maxx" in capsys.readouterr().err

    pytest.importorskip("fastapi", reason="the serve extra")
    from fastapi.testclient import TestClient

    from rsitr.service import ServiceConfig, create_app

    with Index.open(geo.index, assets.ckpt) as ix, TestClient(create_app(ix, ServiceConfig())) as client:
        r = client.get("/api/search", params={"q": query, "k": 10, "bbox": "9,44,12,46.5"})
        assert r.status_code == 200
        hits = r.json()["results"]
        assert sorted(h["name"] for h in hits) == ["wgs84_0.tif", "wgs84_1.tif", "wgs84_2.tif"]
        assert hits[0]["footprint"]["type"] == "Polygon" and r.json()["bbox"] == [9, 44, 12, 46.5]
        for bad in ("1,2,3", "12,44,9,46", "a,b,c,d", "0,0,181,1"):
            r = client.get("/api/search", params={"q": query, "bbox": bad})
            assert r.status_code == 422 and "bbox" in r.json()["detail"], bad
        r = client.get("/api/search", params={"q": query, "k": 20})
        names = {h["name"]: h for h in r.json()["results"]}
        assert (
            names["plain.jpg"]["footprint"] is None
            and names["antimeridian.tif"]["footprint"]["type"] == "MultiPolygon"
        )
        assert client.get("/api/health").json()["georeferenced"] == 10
        r = client.get("/api/search", params={"q": query, "k": 20, "min_score": 2})
        assert r.status_code == 422
        assert client.get("/static/leaflet/leaflet.js").status_code == 200
        assert client.get("/static/../app.py").status_code == 404


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
@pytest.mark.parametrize("exact_limit", [0, 200_000])
def test_subset_search_keeps_k_inside_the_subset(
    kind: str, exact_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths (exact scoring of the subset; a FAISS id selector) rank only the subset."""
    from rsitr.retrieval.index import VectorIndexConfig, filters
    from rsitr.retrieval.index.vectors import build_vector_index

    monkeypatch.setattr(filters, "EXACT_LIMIT", exact_limit)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(1 << 60, size=4000, replace=False).astype(np.int64)
    index, _ = build_vector_index(x, ids, VectorIndexConfig(kind=kind, nlist=16, nprobe=16))
    subset = np.sort(rng.choice(ids, size=300, replace=False))
    q = x[:5] + 0.1
    scores, found = filters.SubsetSearcher(index).search(q, 10, subset)
    allowed = np.isin(ids, subset)
    exact = q @ x[allowed].T
    want = ids[allowed][np.argsort(-exact, axis=1)[:, :10]]
    assert np.isin(found, subset).all() and (found >= 0).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, want, strict=True)])
    assert recall >= (1.0 if exact_limit or kind == "flat" else 0.9), recall
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    _, empty = filters.SubsetSearcher(index).search(q, 10, np.array([12345], np.int64))
    assert (empty == -1).all()


def test_old_index_is_refused_readonly_until_rebuilt(geo: GeoArchive, assets: SearchAssets) -> None:
    """The footprint columns are added by the next build of an index written before them."""
    import shutil
    import sqlite3

    old = geo.index.parent / "old"
    shutil.copytree(geo.index, old)
    db = sqlite3.connect(old / "meta.sqlite")
    for col in ("lon_min", "lat_min", "lon_max", "lat_max", "footprint", "acquired"):
        db.execute(f"ALTER TABLE images DROP COLUMN {col}")
    db.execute("DROP TABLE footprint_boxes")
    db.commit()
    db.close()
    from rsitr.errors import DataError

    with pytest.raises(DataError, match="older rsitr"):
        Index.open(old, assets.ckpt, load_model=False)
    r = build_index(geo.root, assets.ckpt, old)  # adds the columns and the R*Tree, reads the tags again
    assert r.unchanged == len(geo.corners) and r.added == 0  # nothing embedded again
    with Index.open(old, assets.ckpt) as ix:
        assert ix.count == len(geo.corners)
        hits = ix.search_text(assets.query[0], k=10, bbox="179.9,0.1,180,0.2")
        assert [h.name for h in hits] == ["antimeridian.tif"]
