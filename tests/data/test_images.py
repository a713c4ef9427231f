"""Image loading: formats, compressions, corrupt files, stretch, downscaling, georeferencing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from rsitr.data import ImageLoader, inspect_image, load_image, read_geo_info, read_image_array
from rsitr.data.images import percentile_stretch, to_rgb8
from rsitr.errors import ConfigError, DataError


def rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- 8-bit formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["tiff_lzw", "packbits", None])
def test_tiff_compressions_decode_exactly(tmp_path: Path, compression: str | None) -> None:
    a = rgb()
    p = tmp_path / "x.tif"
    Image.fromarray(a).save(p, compression=compression)
    out = read_image_array(p)
    assert out.dtype == np.uint8 and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


def test_png_gray_palette_and_alpha_become_rgb(tmp_path: Path) -> None:
    g = rgb()[..., 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = read_image_array(tmp_path / "g.png")
    assert out.shape == (24, 32, 3) and (out == g[..., None]).all()
    a = rgb()
    Image.fromarray(np.dstack([a, np.zeros_like(g)])).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image_array(tmp_path / "a.png"), a)
    Image.fromarray(a).quantize(8).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"


def test_real_packbits_and_plain_tiffs(formats_dir: Path) -> None:
    d = formats_dir / "images_tif"
    for name, side in (("sydney_1.tif", 500), ("ucm_1.tif", 256)):
        out = read_image_array(d / name)
        assert out.shape == (side, side, 3)
        np.testing.assert_array_equal(out, tifffile.imread(d / name))
    info = inspect_image(d / "sydney_1.tif")
    assert (info.width, info.height, info.mode) == (500, 500, "RGB")
    assert read_geo_info(d / "sydney_1.tif") is None


# -- corrupt input ----------------------------------------------------------------------------


def test_corrupt_jpeg_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image"):
        read_image_array(p)


def test_truncated_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "t.jpg"
    Image.fromarray(rgb(64, 64)).save(p, quality=95)
    p.write_bytes(p.read_bytes()[:400])
    with pytest.raises(DataError, match=r"t\.jpg: cannot decode image"):
        read_image_array(p)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_truncated_tiff(tmp_path: Path, dtype: type) -> None:
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, rgb(64, 64).astype(dtype), photometric="rgb")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t\.tif: truncated TIFF"):
        read_image_array(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")


# -- multi-band, 16-bit -----------------------------------------------------------------------


def four_band_uint16(h: int = 40, w: int = 50) -> np.ndarray:
    ramp = np.linspace(0, 10000, h * w).reshape(h, w)
    bands = [ramp + 300, ramp * 2 + 50, ramp * 0.5 + 7000, 12000 - ramp]  # band 3 decreases
    return np.stack(bands, axis=-1).astype(np.uint16)


def test_16bit_4band_geotiff_stretched_and_band_selection(tmp_path: Path) -> None:
    a = four_band_uint16()
    p = tmp_path / "ms.tif"
    tifffile.imwrite(p, a, photometric="minisblack", planarconfig="contig", compression="zlib")
    out = read_image_array(p)
    assert out.dtype == np.uint8 and out.shape == (40, 50, 3)
    # each band's 2-98 % range spans 0..255: saturated ends, mid-grey in the middle
    assert (out[0, 0] == 0).all() and (out[-1, -1] == 255).all()
    assert 110 < int(out[20, 25, 0]) < 145
    picked = read_image_array(p, bands=(3, 1, 0))
    assert picked[0, 0, 0] == 255 and picked[-1, -1, 0] == 0  # band 3 decreases
    np.testing.assert_array_equal(picked[..., 2], out[..., 0])
    gray = read_image_array(p, bands=(2,))
    assert (gray[..., 0] == gray[..., 2]).all()
    with pytest.raises(ConfigError, match=r"bands=\[4\]"):
        read_image_array(p, bands=(4,))
    info = inspect_image(p)
    assert (info.bands, info.dtype, info.decoder) == (4, "uint16", "tifffile")


def test_planar_16bit_tiff_matches_contiguous(tmp_path: Path) -> None:
    a = four_band_uint16()
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(a, -1, 0), photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(read_image_array(p), to_rgb8(a))


def test_multipage_tiff_reads_first_page(tmp_path: Path) -> None:
    pages = np.stack(
        [np.full((8, 10), 100 * k, dtype=np.uint16) + np.arange(10, dtype=np.uint16) for k in range(3)]
    )
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, pages, photometric="minisblack")
    out = read_image_array(p)
    assert out.shape == (8, 10, 3)
    np.testing.assert_array_equal(out, to_rgb8(pages[0]))


def test_16bit_lzw_grayscale(tmp_path: Path) -> None:
    g = (np.linspace(0, 60000, 32 * 32).reshape(32, 32)).astype(np.uint16)
    p = tmp_path / "g16.tif"
    Image.fromarray(g).save(p, compression="tiff_lzw")  # tifffile needs imagecodecs here; Pillow reads it
    out = read_image_array(p)
    assert out.shape == (32, 32, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_percentile_stretch_constant_and_nan_bands() -> None:
    a = np.zeros((10, 10, 2), dtype=np.float32)
    a[..., 1] = np.nan
    out = percentile_stretch(a)
    assert out.dtype == np.uint8 and (out == 0).all()


def test_to_rgb8_without_stretch_scales_by_dtype() -> None:
    a = np.full((2, 2), 65535, dtype=np.uint16)
    assert (to_rgb8(a, stretch=False) == 255).all()


# -- downscaling ------------------------------------------------------------------------------


def test_large_images_are_downscaled(tmp_path: Path) -> None:
    big = np.zeros((1500, 3000, 3), dtype=np.uint8)
    big[:, 1500:] = 200
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(big).save(tmp_path / "big.png")
    for name in ("big.jpg", "big.png"):
        out = read_image_array(tmp_path / name, max_side=1000)
        assert out.shape == (500, 1000, 3)
        assert out[:, :400].mean() < 10 and out[:, 600:].mean() > 190
    assert read_image_array(tmp_path / "big.png", max_side=None).shape == (1500, 3000, 3)
    tifffile.imwrite(tmp_path / "big16.tif", np.repeat(four_band_uint16(), 60, axis=0), planarconfig="contig")
    out = read_image_array(tmp_path / "big16.tif", max_side=512)
    assert max(out.shape[:2]) == 512 and out.shape[1] == round(50 * 512 / 2400)


# -- georeferencing ---------------------------------------------------------------------------


def write_geotiff(path: Path, raster_type: int = 1) -> None:
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, raster_type, 3072, 0, 1, 32633)
    tifffile.imwrite(
        path,
        four_band_uint16(),
        photometric="minisblack",
        planarconfig="contig",
        extratags=[
            (33550, "d", 3, (10.0, 20.0, 0.0), True),
            (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
            (34735, "H", len(geokeys), geokeys, True),
        ],
    )


def test_geotiff_bounds_and_crs(tmp_path: Path) -> None:
    p = tmp_path / "geo.tif"
    write_geotiff(p)
    g = read_geo_info(p)
    assert g is not None
    assert g.crs == "EPSG:32633" and (g.width, g.height) == (50, 40)
    assert g.bounds == pytest.approx((500000.0, 4000000.0 - 40 * 20, 500000.0 + 50 * 10, 4000000.0))
    assert g.transform == pytest.approx((10.0, 0.0, 500000.0, 0.0, -20.0, 4000000.0))
    write_geotiff(p, raster_type=2)  # PixelIsPoint: the tiepoint is a pixel centre
    g = read_geo_info(p)
    assert (
        g is not None and g.bounds[0] == pytest.approx(499995.0) and g.bounds[3] == pytest.approx(4000010.0)
    )


def test_no_georeferencing(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "plain.tif", rgb())
    Image.fromarray(rgb()).save(tmp_path / "x.jpg")
    assert read_geo_info(tmp_path / "plain.tif") is None
    assert read_geo_info(tmp_path / "x.jpg") is None


# -- error policy -----------------------------------------------------------------------------


def test_loader_skip_records_failures_and_fail_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    good = tmp_path / "good.png"
    Image.fromarray(rgb()).save(good)
    skip = ImageLoader(on_error="skip")
    assert skip(good) is not None
    assert skip(bad) is None
    assert [f.path for f in skip.failures] == [str(bad)] and "bad.png" in skip.failures[0].error
    with pytest.raises(DataError, match=r"bad\.png"):
        ImageLoader(on_error="fail")(bad)
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        ImageLoader(on_error="ignore")  # type: ignore[arg-type]


def test_four_band_uint8_tiff_keeps_bands_selectable(tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    p = tmp_path / "rgbn.tif"
    tifffile.imwrite(p, a, photometric="rgb", extrasamples=["unspecified"])
    np.testing.assert_array_equal(read_image_array(p), a[..., :3])  # no stretch for 8-bit data
    np.testing.assert_array_equal(read_image_array(p, bands=(3, 2, 1)), a[..., [3, 2, 1]])
