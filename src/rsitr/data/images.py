"""Robust image loading to 8-bit RGB, and GeoTIFF georeferencing.

JPEG, PNG and 8-bit TIFF (uncompressed, PackBits, LZW, Deflate) decode with Pillow. Other TIFFs
(16-bit, float, more than 3 bands, planar) decode with tifffile, which reads uncompressed,
PackBits and Deflate data itself; LZW and JPEG-compressed data of such TIFFs need the optional
``imagecodecs`` package (the error message says so). Non-8-bit data is mapped to 8 bits with a
per-band 2–98 percentile stretch; more than three bands are reduced by a band selection (default
the first three); one band becomes gray RGB. Images larger than ``max_side`` are downscaled on
load (tiled pyramid levels are used when the TIFF has them).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

from rsitr.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_SIDE",
    "GeoInfo",
    "ImageFailure",
    "ImageInfo",
    "ImageLoader",
    "inspect_image",
    "load_image",
    "percentile_stretch",
    "read_acquisition_time",
    "read_geo_info",
    "read_image_array",
    "to_rgb8",
]

#: Default longest side, in pixels, above which images are downscaled on load.
DEFAULT_MAX_SIDE = 4096

OnError = Literal["skip", "fail"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Pillow modes whose samples are not 8-bit: read as numpy and stretched like 16-bit TIFFs.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
# Pillow modes read as they are; every other mode (P, 1, CMYK, YCbCr, ...) is converted to RGB.
_RAW_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", *_WIDE_MODES)


@dataclass(frozen=True)
class ImageInfo:
    """What a decoder found in an image file (before any conversion).

    Attributes:
        width: width in pixels.
        height: height in pixels.
        bands: number of samples per pixel.
        dtype: numpy dtype name of the samples (``uint8``, ``uint16``, ...).
        mode: Pillow mode (``RGB``, ``L``, ``I;16``) or ``"<bands>x<dtype>"`` for tifffile.
        decoder: ``"pillow"`` or ``"tifffile"``.
    """

    width: int
    height: int
    bands: int
    dtype: str
    mode: str
    decoder: str


@dataclass(frozen=True)
class GeoInfo:
    """Georeferencing of a GeoTIFF.

    Attributes:
        bounds: ``(min_x, min_y, max_x, max_y)`` of the image's outer pixel edges, in CRS units.
        crs: ``"EPSG:<code>"``, or ``None`` when the GeoTIFF keys name no EPSG code.
        transform: affine ``(a, b, c, d, e, f)`` with ``x = a*col + b*row + c`` and
            ``y = d*col + e*row + f`` for pixel-corner coordinates (the rasterio convention).
        width: width in pixels.
        height: height in pixels.
    """

    bounds: tuple[float, float, float, float]
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be loaded under ``on_error="skip"``.

    Attributes:
        path: the file.
        error: the one-line reason.
    """

    path: str
    error: str


# -- conversion to 8-bit RGB ------------------------------------------------------------------


def percentile_stretch(array: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Map each band linearly so its ``low``–``high`` percentile range spans 0–255.

    Percentiles are computed on at most about a million pixels (a regular subsample) and ignore
    NaNs; a constant band maps to 0.

    Args:
        array: ``(H, W)`` or ``(H, W, C)`` array of any numeric dtype.
        low: lower percentile.
        high: upper percentile.

    Returns:
        A ``uint8`` array of the same shape.
    """
    a = array[..., None] if array.ndim == 2 else array
    h, w, c = a.shape
    step = max(1, math.ceil(math.sqrt(h * w / float(1 << 20))))
    sample = a[::step, ::step].reshape(-1, c).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN band
        lo, hi = np.nanpercentile(sample, [low, high], axis=0)  # (C,) each
    lo = np.nan_to_num(lo)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)
    out = np.empty(a.shape, dtype=np.uint8)
    for b in range(c):  # band by band keeps the float temporary at one band
        band = (a[..., b].astype(np.float32) - np.float32(lo[b])) * scale[b]
        np.nan_to_num(band, copy=False, nan=0.0)
        out[..., b] = np.clip(band, 0, 255).round().astype(np.uint8)
    return out.reshape(array.shape)


def to_rgb8(array: np.ndarray, bands: Sequence[int] | None = None, stretch: bool | None = None) -> np.ndarray:
    """Convert an ``(H, W)`` or ``(H, W, C)`` array of any dtype to ``(H, W, 3)`` ``uint8``.

    Args:
        array: image samples.
        bands: the 1 or 3 band indices to use (0-based); default the first three bands, or the
            first band when there are fewer than three.
        stretch: apply :func:`percentile_stretch`; ``None`` stretches every dtype other than
            ``uint8``. Without stretch, integers are scaled by their dtype's maximum and floats
            are taken as 0–1.

    Returns:
        A C-contiguous ``uint8`` RGB array.

    Raises:
        ConfigError: if ``bands`` has the wrong length or an index out of range.
    """
    a = array[..., None] if array.ndim == 2 else array
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {array.shape}")
    c = a.shape[2]
    if bands is not None:
        idx = [int(b) for b in bands]
        if len(idx) not in (1, 3) or any(not 0 <= b < c for b in idx):
            raise ConfigError(f"bands={list(bands)}: expected 1 or 3 indices in 0..{c - 1}")
        a = a[..., idx]
    else:
        a = a[..., :3] if c >= 3 else a[..., :1]
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if stretch is None:
        stretch = a.dtype != np.uint8
    if stretch:
        a = percentile_stretch(a)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer):
            a = np.clip(a.astype(np.float32) * (255.0 / np.iinfo(a.dtype).max), 0, 255)
        else:
            a = np.clip(np.nan_to_num(a.astype(np.float32)) * 255.0, 0, 255)
        a = a.round().astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _box_reduce(a: np.ndarray, max_side: int) -> np.ndarray:
    """Average ``k x k`` blocks so the longest side is below ``2 * max_side`` (k integer)."""
    k = max(a.shape[0], a.shape[1]) // max_side
    if k < 2:
        return a
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    blocks = a[:h, :w].reshape(h // k, k, w // k, k, *a.shape[2:])
    out = blocks.mean(axis=(1, 3), dtype=np.float32)
    return out.round().astype(a.dtype) if np.issubdtype(a.dtype, np.integer) else out


def _target_size(h: int, w: int, max_side: int | None) -> tuple[int, int] | None:
    """``(width, height)`` after downscaling to ``max_side``, or ``None`` when it fits."""
    if max_side is None or max(h, w) <= max_side:
        return None
    s = max_side / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


# -- decoders ---------------------------------------------------------------------------------


def _is_tiff(path: Path) -> bool:
    if path.suffix.lower() in (".tif", ".tiff"):
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _pillow_ok_for(page: tifffile.TiffPage) -> bool:
    """Whether Pillow decodes this TIFF page faithfully (8-bit, chunky, 1/3/4 samples)."""
    pm = tifffile.PHOTOMETRIC
    samples = {
        pm.MINISBLACK: (1,),
        pm.MINISWHITE: (1,),
        pm.PALETTE: (1,),
        pm.RGB: (3, 4),
        pm.YCBCR: (3,),
        pm.SEPARATED: (4,),
    }
    return (
        page.bitspersample == 8
        and page.sampleformat == tifffile.SAMPLEFORMAT.UINT
        and page.samplesperpixel in samples.get(page.photometric, ())
        and (page.samplesperpixel == 1 or page.planarconfig == tifffile.PLANARCONFIG.CONTIG)
    )


def _check_complete(tif: tifffile.TiffFile, page: tifffile.TiffPage, path: Path) -> None:
    size = tif.filehandle.size
    for off, count in zip(page.dataoffsets, page.databytecounts, strict=False):
        if count and off + count > size:
            raise DataError(
                f"truncated TIFF: image data ends at byte {off + count}, file has {size}",
                path=path,
            )


def _to_hwc(a: np.ndarray, axes: str, path: Path) -> np.ndarray:
    keep = [i for i, n in enumerate(a.shape) if n > 1 or axes[i] in "YX"]
    a = a.reshape([a.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if len(axes) == 2:
        return a if axes == "YX" else a.T
    if len(axes) != 3 or "Y" not in axes or "X" not in axes:
        raise DataError(f"unsupported TIFF layout (axes {axes!r}, shape {a.shape})", path=path)
    band_axis = next(i for i, ax in enumerate(axes) if ax not in "YX")
    order = [axes.index("Y"), axes.index("X"), band_axis]
    return np.transpose(a, order)


def _read_tifffile(
    path: Path, max_side: int | None, prefer_pillow: bool
) -> tuple[np.ndarray, ImageInfo] | None:
    """Decode with tifffile; ``None`` when ``prefer_pillow`` and Pillow can decode the page."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        _check_complete(tif, page, path)
        if prefer_pillow and _pillow_ok_for(page):
            return None
        series = tif.series[0]
        if any(ax not in "YXSC" for ax in series.axes):  # a stack of pages: read the first image
            a = _to_hwc(page.asarray(), page.axes, path)
        else:
            level = series
            if max_side is not None:
                for lv in series.levels[1:]:  # smallest pyramid level still at least max_side
                    shape = dict(zip(lv.axes, lv.shape, strict=True))
                    if max(shape.get("Y", 0), shape.get("X", 0)) >= max_side:
                        level = lv
            a = _to_hwc(level.asarray(), level.axes, path)
    bands = 1 if a.ndim == 2 else a.shape[2]
    info = ImageInfo(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        bands=bands,
        dtype=a.dtype.name,
        mode=f"{bands}x{a.dtype.name}",
        decoder="tifffile",
    )
    return a, info


def _read_pillow(path: Path, max_side: int | None) -> tuple[np.ndarray, ImageInfo]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt-EXIF and decompression-bomb warnings
        with Image.open(path) as im:
            info = ImageInfo(
                width=im.width,
                height=im.height,
                bands=len(im.getbands()),
                dtype="uint8" if im.mode not in _WIDE_MODES else "",
                mode=im.mode,
                decoder="pillow",
            )
            if im.format == "JPEG" and max_side is not None and max(im.size) > max_side:
                s = max_side / max(im.size)
                im.draft("RGB", (math.ceil(im.width * s), math.ceil(im.height * s)))
            im.load()
            if im.mode in _RAW_MODES:  # keep all bands (alpha or a 4th band is dropped later)
                a = np.asarray(im)
                info = ImageInfo(info.width, info.height, info.bands, a.dtype.name, im.mode, "pillow")
                return a, info
            return np.asarray(im.convert("RGB")), info


def _decode(path: Path, max_side: int | None, raw: bool = False) -> tuple[np.ndarray, ImageInfo]:
    """Decode to a raw array: tifffile for TIFFs that Pillow cannot represent (or for every TIFF
    when ``raw``, so that all bands stay selectable), else Pillow; each falls back to the other."""
    if not path.is_file():
        raise DataError("image file not found", path=path)
    tiff = _is_tiff(path)
    errors: list[str] = []
    if tiff:
        try:
            out = _read_tifffile(path, max_side, prefer_pillow=not raw)
            if out is not None:
                return out
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for bad input
            errors.append(f"tifffile: {e}")
    try:
        return _read_pillow(path, max_side)
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large to decode safely: {e}", path=path) from e
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        errors.append(f"Pillow: {e}")
    if tiff and not raw and len(errors) == 1:  # Pillow was preferred and failed: try tifffile
        try:
            out = _read_tifffile(path, max_side, prefer_pillow=False)
            assert out is not None
            return out
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(f"tifffile: {e}")
    reason = "; ".join(errors)
    if "imagecodecs" in reason:
        reason += " (install the 'imagecodecs' package to decode this TIFF compression)"
    raise DataError(f"cannot decode image: {reason}", path=path)


# -- public loading API -----------------------------------------------------------------------


def read_image_array(
    path: str | Path,
    max_side: int | None = DEFAULT_MAX_SIDE,
    bands: Sequence[int] | None = None,
    stretch: bool | None = None,
) -> np.ndarray:
    """Load an image file as an ``(H, W, 3)`` ``uint8`` RGB array.

    Args:
        path: JPEG, PNG or TIFF/GeoTIFF file.
        max_side: downscale (keeping the aspect ratio) so the longest side is at most this;
            ``None`` keeps the full size.
        bands: band indices for multi-band images (see :func:`to_rgb8`).
        stretch: percentile stretch; ``None`` stretches non-8-bit data only.

    Returns:
        The RGB array.

    Raises:
        DataError: if the file is missing, truncated, corrupt or cannot be decoded; the message
            names the file.
        ConfigError: if ``bands`` does not fit the image.
    """
    path = Path(path)
    a, _ = _decode(path, max_side, raw=bands is not None)
    size = _target_size(a.shape[0], a.shape[1], max_side)  # from the full extent
    if size is None or max_side is None:
        return to_rgb8(a, bands=bands, stretch=stretch)
    if max(a.shape[:2]) > 2 * max_side:
        a = _box_reduce(a, max_side)  # cheap first step for huge rasters, before the stretch
    rgb = to_rgb8(a, bands=bands, stretch=stretch)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def load_image(
    path: str | Path,
    max_side: int | None = DEFAULT_MAX_SIDE,
    bands: Sequence[int] | None = None,
    stretch: bool | None = None,
) -> Image.Image:
    """Load an image file as an RGB ``PIL.Image`` (see :func:`read_image_array`).

    Args:
        path: JPEG, PNG or TIFF/GeoTIFF file.
        max_side: longest side after loading; ``None`` keeps the full size.
        bands: band indices for multi-band images.
        stretch: percentile stretch; ``None`` stretches non-8-bit data only.

    Returns:
        An image in mode ``RGB``.

    Raises:
        DataError: if the file cannot be read or decoded.
        ConfigError: if ``bands`` does not fit the image.
    """
    return Image.fromarray(read_image_array(path, max_side, bands, stretch), mode="RGB")


def inspect_image(path: str | Path, max_side: int | None = DEFAULT_MAX_SIDE) -> ImageInfo:
    """Decode an image fully and describe it (for deep dataset checks).

    Args:
        path: the image file.
        max_side: as in :func:`read_image_array`; the reported size is the stored size.

    Returns:
        The :class:`ImageInfo`.

    Raises:
        DataError: if the file cannot be read or decoded.
    """
    return _decode(Path(path), max_side)[1]


class ImageLoader:
    """Callable image loader with an error policy, for datasets.

    Args:
        on_error: ``"fail"`` raises :class:`DataError`; ``"skip"`` logs a warning, records an
            :class:`ImageFailure` in :attr:`failures` and returns ``None``.
        max_side: longest side after loading (``None``: full size).
        bands: band indices for multi-band images.
        stretch: percentile stretch; ``None`` stretches non-8-bit data only.

    Raises:
        ConfigError: if ``on_error`` is not ``"skip"`` or ``"fail"``.
    """

    def __init__(
        self,
        on_error: OnError = "fail",
        max_side: int | None = DEFAULT_MAX_SIDE,
        bands: Sequence[int] | None = None,
        stretch: bool | None = None,
    ) -> None:
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error={on_error!r}: expected 'skip' or 'fail'")
        self.on_error = on_error
        self.max_side = max_side
        self.bands = None if bands is None else tuple(bands)
        self.stretch = stretch
        self.failures: list[ImageFailure] = []

    def __call__(self, path: str | Path) -> Image.Image | None:
        """Load ``path`` as RGB, or return ``None`` after recording the failure (skip policy).

        Raises:
            DataError: under ``on_error="fail"``, if the image cannot be loaded.
        """
        try:
            return load_image(path, self.max_side, self.bands, self.stretch)
        except DataError as e:
            if self.on_error == "fail":
                raise
            self.failures.append(ImageFailure(str(path), str(e)))
            logger.warning("skipping unreadable image: %s", e)
            return None


# -- georeferencing ---------------------------------------------------------------------------

_TAG_PIXEL_SCALE = 33550
_TAG_TIEPOINT = 33922
_TAG_TRANSFORMATION = 34264
_TAG_GEOKEYS = 34735
_KEY_RASTER_TYPE = 1025
_KEY_GEOGRAPHIC = 2048
_KEY_PROJECTED = 3072
_USER_DEFINED = 32767


def _geokeys(values: Sequence[int]) -> dict[int, int]:
    """Short-valued keys of a GeoKeyDirectory (``[ver, rev, minor, n, (id, loc, count, v)*]``)."""
    out = {}
    n = int(values[3]) if len(values) >= 4 else 0
    for k in range(n):
        key_id, location, _count, value = (int(v) for v in values[4 + 4 * k : 8 + 4 * k])
        if location == 0:
            out[key_id] = value
    return out


def read_geo_info(path: str | Path) -> GeoInfo | None:
    """Read the bounds and CRS of a GeoTIFF from its ModelTiepoint/ModelPixelScale (or
    ModelTransformation) tags and GeoKeyDirectory.

    Args:
        path: an image file.

    Returns:
        The :class:`GeoInfo`, or ``None`` for a non-TIFF file or a TIFF without georeferencing.

    Raises:
        DataError: if the file is missing or is a TIFF that cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", path=path)
    if not _is_tiff(path):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = {
                code: page.tags[code].value
                for code in (_TAG_PIXEL_SCALE, _TAG_TIEPOINT, _TAG_TRANSFORMATION, _TAG_GEOKEYS)
                if code in page.tags
            }
            width, height = int(page.imagewidth), int(page.imagelength)
    except Exception as e:  # noqa: BLE001 - tifffile raises several types for bad files
        raise DataError(f"cannot read TIFF tags: {e}", path=path) from e
    keys = _geokeys(tags.get(_TAG_GEOKEYS, ()))
    if _TAG_TRANSFORMATION in tags and len(tags[_TAG_TRANSFORMATION]) >= 8:
        m = [float(v) for v in tags[_TAG_TRANSFORMATION]]
        a, b, c, d, e, f = m[0], m[1], m[3], m[4], m[5], m[7]
    elif _TAG_TIEPOINT in tags and _TAG_PIXEL_SCALE in tags:
        tp = [float(v) for v in tags[_TAG_TIEPOINT]]
        sx, sy = (float(v) for v in tags[_TAG_PIXEL_SCALE][:2])
        i0, j0, x0, y0 = tp[0], tp[1], tp[3], tp[4]
        a, b, c, d, e, f = sx, 0.0, x0 - i0 * sx, 0.0, -sy, y0 + j0 * sy
    else:
        return None
    if keys.get(_KEY_RASTER_TYPE) == 2:  # PixelIsPoint: raster coordinates are pixel centres
        c, f = c - 0.5 * (a + b), f - 0.5 * (d + e)
    xs = [a * u + b * v + c for u in (0, width) for v in (0, height)]
    ys = [d * u + e * v + f for u in (0, width) for v in (0, height)]
    code = keys.get(_KEY_PROJECTED) or keys.get(_KEY_GEOGRAPHIC)
    crs = f"EPSG:{code}" if code and code != _USER_DEFINED else None
    return GeoInfo(
        bounds=(min(xs), min(ys), max(xs), max(ys)),
        crs=crs,
        transform=(a, b, c, d, e, f),
        width=width,
        height=height,
    )


_TAG_DATETIME = 306  # TIFF/EXIF DateTime, "YYYY:MM:DD HH:MM:SS"
_EXIF_DATETIME_ORIGINAL = 36867


def _iso_datetime(value: object) -> str | None:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    text = text.strip().strip("\x00")
    if len(text) < 19 or text[4] != ":" or text[7] != ":":
        return None
    iso = f"{text[0:4]}-{text[5:7]}-{text[8:10]}T{text[11:19]}"
    return iso if iso[:4].isdigit() and iso[5:7].isdigit() and iso[8:10].isdigit() else None


def read_acquisition_time(path: str | Path) -> str | None:
    """The date tag of an image as ISO 8601 (``YYYY-MM-DDTHH:MM:SS``), else ``None``.

    TIFFs: the DateTime tag (306). Other files: EXIF DateTimeOriginal, then DateTime. Unreadable
    or malformed tags give ``None``: the time is optional metadata.
    """
    path = Path(path)
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                tag = tif.pages.first.tags.get(_TAG_DATETIME)
                return None if tag is None else _iso_datetime(tag.value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                exif = im.getexif()
                value = exif.get_ifd(0x8769).get(_EXIF_DATETIME_ORIGINAL) or exif.get(_TAG_DATETIME)
        return None if value is None else _iso_datetime(value)
    except Exception:  # noqa: BLE001 - optional metadata: never fail the image for it
        return None
