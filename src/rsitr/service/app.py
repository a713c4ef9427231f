"""The search service: a FastAPI JSON API over an opened :class:`~rsitr.retrieval.index.Index`
and one web page.

Routes: ``GET /`` (the page), ``GET /static/…`` (the page's map library, served by the
package: never a CDN), ``GET /api/health``, ``GET /api/search?q=…&k=…&bbox=…&min_score=…``,
``POST /api/search/image`` (multipart ``file``; same filters), ``GET /api/images/{id}?size=thumb|large``,
and FastAPI's ``/openapi.json`` and ``/docs``. ``bbox`` is ``minx,miny,maxx,maxy`` in EPSG:4326:
only images whose footprint intersects it are ranked. Images are served only by their integer id in
the index, never by a path taken from the request; uploads are limited in size, type and pixel
count; results carry file names relative to the archive root, never server paths.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route annotations at run
# time, and they use values (limits) from create_app's closure.
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from rsitr import __version__
from rsitr.data.footprints import footprint_geometry, parse_bbox
from rsitr.errors import ConfigError, RsitrError
from rsitr.retrieval.index import Index, SearchResult
from rsitr.service.thumbnails import ThumbnailCache
from rsitr.service.uploads import BodySizeLimit, UploadError, UploadPolicy, decode_upload

logger = logging.getLogger(__name__)

__all__ = ["ServiceConfig", "create_app"]

BBOX_HELP = "Only images whose footprint intersects minx,miny,maxx,maxy (EPSG:4326 degrees)."
MIN_SCORE_HELP = "Drop results whose cosine score is below this."


def _page_csp(basemap: str | None) -> str:
    """The page's Content-Security-Policy: this origin only, plus the basemap's tile host if set."""
    tiles = ""
    if basemap:
        parts = urlsplit(basemap)
        tiles = f" {parts.scheme}://{parts.netloc.replace('{s}', '*')}"
    return (
        f"default-src 'none'; img-src 'self' blob: data:{tiles}; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".txt": "text/plain"}


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and sizes of the service.

    Attributes:
        upload: limits on uploaded query images.
        max_k: most results a query may ask for.
        max_query_chars: longest text query.
        thumb_size: longest side of grid thumbnails.
        large_size: longest side of the larger view.
        cache_bytes: budget of the in-memory thumbnail cache.
        reload_seconds: how often to check for a newly published index generation.
        basemap: an optional XYZ tile URL template for the map (``https://…/{z}/{x}/{y}.png``);
            ``None``: footprints are drawn over a plain graticule, and the page loads nothing
            from outside this service.
        basemap_attribution: the attribution text the tile provider requires.
    """

    upload: UploadPolicy = field(default_factory=UploadPolicy)
    max_k: int = 100
    max_query_chars: int = 500
    thumb_size: int = 256
    large_size: int = 1024
    cache_bytes: int = 64 << 20
    reload_seconds: float = 2.0
    basemap: str | None = None
    basemap_attribution: str = ""

    def __post_init__(self) -> None:
        if self.basemap is not None:
            parts = urlsplit(self.basemap)
            if parts.scheme not in ("http", "https") or not parts.netloc or "{z}" not in self.basemap:
                raise ConfigError(
                    f"basemap {self.basemap!r}: expected an http(s) tile URL template "
                    "with {z}, {x} and {y}"
                )


class Hit(BaseModel):
    """One image in a result list."""

    rank: int
    id: int
    name: str
    score: float
    width: int | None
    height: int | None
    crs: str | None
    bounds: list[float] | None
    lonlat_bounds: list[float] | None
    footprint: dict[str, Any] | None
    acquired: str | None
    thumbnail: str
    image: str


class SearchResponse(BaseModel):
    """Results of a text or image query."""

    query: str
    k: int
    bbox: list[float] | None
    min_score: float | None
    count: int
    seconds: float
    results: list[Hit]


class Health(BaseModel):
    """Service state."""

    status: str
    images: int
    generation: int
    kind: str
    dim: int
    method: str
    version: str
    georeferenced: int
    basemap: str | None
    basemap_attribution: str


def _hit(r: SearchResult) -> Hit:
    m = r.metadata
    geometry = None
    if m.footprint is not None:
        from shapely.geometry import mapping

        geometry = mapping(footprint_geometry(m.footprint))
    return Hit(
        rank=r.rank,
        id=r.id,
        name=r.name,
        score=round(r.score, 6),
        width=m.width,
        height=m.height,
        crs=m.crs,
        bounds=None if m.bounds is None else list(m.bounds),
        lonlat_bounds=None if m.lonlat_bounds is None else list(m.lonlat_bounds),
        footprint=geometry,
        acquired=m.acquired,
        thumbnail=f"/api/images/{r.id}",
        image=f"/api/images/{r.id}?size=large",
    )


def create_app(index: Index, config: ServiceConfig | None = None) -> FastAPI:
    """Build the FastAPI app serving ``index``.

    Args:
        index: an opened index (its model loaded or loadable).
        config: limits and sizes; default :class:`ServiceConfig`.

    Returns:
        The ASGI app (with the request-body limit applied).
    """
    cfg = config or ServiceConfig()
    thumbs = ThumbnailCache(cfg.cache_bytes)
    static_root = resources.files("rsitr.service").joinpath("static")
    page = static_root.joinpath("index.html").read_text(encoding="utf-8")
    static_files = {f"leaflet/{f.name}": f for f in static_root.joinpath("leaflet").iterdir() if f.is_file()}
    csp = _page_csp(cfg.basemap)
    geo_count: list[tuple[int, int]] = []

    def georeferenced() -> int:
        """Images of the loaded generation with a footprint (counted once per generation)."""
        if not geo_count or geo_count[0][0] != index.generation:
            geo_count[:] = [(index.generation, index.store.count_georeferenced())]
        return geo_count[0][1]

    last_check = [0.0]
    app = FastAPI(
        title="rsitr search",
        version=__version__,
        description="Search an indexed remote-sensing image archive by text or by image.",
    )

    def refresh() -> None:
        now = time.monotonic()
        if now - last_check[0] >= cfg.reload_seconds:
            last_check[0] = now
            index.reload_if_changed()

    def filters(bbox: str | None, min_score: float | None) -> dict[str, Any]:
        try:
            box = parse_bbox(bbox or None)
        except ConfigError as e:
            raise HTTPException(422, str(e)) from e
        return {"bbox": box, "min_score": min_score}

    def respond(
        query: str, k: int, results: list[SearchResult], t0: float, f: dict[str, Any]
    ) -> SearchResponse:
        return SearchResponse(
            query=query,
            k=k,
            bbox=None if f["bbox"] is None else list(f["bbox"].as_tuple()),
            min_score=f["min_score"],
            count=len(results),
            seconds=round(time.perf_counter() - t0, 4),
            results=[_hit(r) for r in results],
        )

    @app.exception_handler(RsitrError)
    async def _rsitr_error(request: Request, exc: RsitrError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        """The search page."""
        headers = {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(page, headers=headers)

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str) -> Response:
        """The page's vendored files (the map library), by name from the package only."""
        file = static_files.get(name)
        if file is None:
            raise HTTPException(404, "not found")
        return Response(
            file.read_bytes(),
            media_type=_STATIC_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream"),
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/api/health", response_model=Health, summary="Service and index state")
    def health() -> Health:
        """Number of indexed images, loaded generation, index kind and model."""
        return Health(
            status="ok",
            images=index.count,
            generation=index.generation,
            kind=index.kind,
            dim=index.dim,
            method=str(index.manifest.identity.get("method", "")),
            version=__version__,
            georeferenced=georeferenced(),
            basemap=cfg.basemap,
            basemap_attribution=cfg.basemap_attribution,
        )

    @app.get("/api/search", response_model=SearchResponse, summary="Text→image search")
    def search(
        q: Annotated[str, Query(min_length=1, max_length=cfg.max_query_chars, description="Query text.")],
        k: Annotated[int, Query(ge=1, le=cfg.max_k, description="Number of results.")] = 10,
        bbox: Annotated[str | None, Query(description=BBOX_HELP, max_length=200)] = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1, description=MIN_SCORE_HELP)] = None,
    ) -> SearchResponse:
        """The ``k`` images that best match the query text, best first (422: bad bbox)."""
        if not q.strip():
            raise HTTPException(422, "empty query")
        f = filters(bbox, min_score)
        refresh()
        t0 = time.perf_counter()
        return respond(q, k, index.search_text(q.strip(), k=k, **f), t0, f)

    @app.post("/api/search/image", response_model=SearchResponse, summary="Image→image search (upload)")
    async def search_image(
        file: Annotated[UploadFile, File(description="A JPEG, PNG or TIFF image.")],
        k: Annotated[int, Query(ge=1, le=cfg.max_k)] = 10,
        bbox: Annotated[str | None, Query(description=BBOX_HELP, max_length=200)] = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1, description=MIN_SCORE_HELP)] = None,
    ) -> SearchResponse:
        """The ``k`` indexed images most similar to the uploaded image (413: too large, 415: not
        a JPEG/PNG/TIFF, 422: undecodable)."""
        f = filters(bbox, min_score)
        data = await file.read(cfg.upload.max_bytes + 1)
        try:
            image = await run_in_threadpool(decode_upload, data, file.content_type, cfg.upload)
        except UploadError as e:
            raise HTTPException(e.status, e.detail) from e
        refresh()
        t0 = time.perf_counter()
        results = await run_in_threadpool(lambda: index.search_image(image, k, **f))
        return respond(file.filename or "upload", k, results, t0, f)

    @app.get(
        "/api/images/{image_id}",
        summary="An indexed image by id (JPEG thumbnail or larger view)",
        responses={200: {"content": {"image/jpeg": {}}}, 304: {}, 404: {}},
        response_class=Response,
    )
    def image(
        image_id: int,
        request: Request,
        size: Annotated[Literal["thumb", "large"], Query()] = "thumb",
    ) -> Response:
        """An indexed image by id as a JPEG (``thumb``: grid size, ``large``: the larger view),
        with an ETag; unknown ids answer 404. No path is ever taken from the request."""
        meta = index.get(image_id) if image_id > 0 else None
        path = index.image_path(image_id) if meta is not None else None
        if meta is None or path is None or not path.is_file():
            raise HTTPException(404, f"no image with id {image_id}")
        side = cfg.thumb_size if size == "thumb" else cfg.large_size
        etag = f'"{meta.sha256[:20]}-{side}"'
        headers = {
            "ETag": etag,
            "Cache-Control": "private, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        try:
            data = thumbs.get((meta.sha256, side), path, side)
        except RsitrError as e:
            raise HTTPException(404, f"image {image_id} cannot be read") from e
        return Response(data, media_type="image/jpeg", headers=headers)

    app.state.index = index
    app.state.thumbnails = thumbs
    app.state.config = cfg
    # Multipart overhead on top of the largest accepted file.
    app.add_middleware(BodySizeLimit, max_bytes=cfg.upload.max_bytes + (64 << 10))
    return app
