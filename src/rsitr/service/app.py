"""The search service: a FastAPI JSON API over an opened :class:`~rsitr.retrieval.index.Index`
and one web page.

Routes: ``GET /`` (the page), ``GET /api/health``, ``GET /api/search?q=…&k=…``,
``POST /api/search/image`` (multipart ``file``), ``GET /api/images/{id}?size=thumb|large``,
and FastAPI's ``/openapi.json`` and ``/docs``. Images are served only by their integer id in
the index, never by a path taken from the request; uploads are limited in size, type and pixel
count; results carry file names relative to the archive root, never server paths.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route annotations at run
# time, and they use values (limits) from create_app's closure.
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from rsitr import __version__
from rsitr.errors import RsitrError
from rsitr.retrieval.index import Index, SearchResult
from rsitr.service.thumbnails import ThumbnailCache
from rsitr.service.uploads import BodySizeLimit, UploadError, UploadPolicy, decode_upload

logger = logging.getLogger(__name__)

__all__ = ["ServiceConfig", "create_app"]

_PAGE_CSP = (
    "default-src 'none'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


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
    """

    upload: UploadPolicy = field(default_factory=UploadPolicy)
    max_k: int = 100
    max_query_chars: int = 500
    thumb_size: int = 256
    large_size: int = 1024
    cache_bytes: int = 64 << 20
    reload_seconds: float = 2.0


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
    thumbnail: str
    image: str


class SearchResponse(BaseModel):
    """Results of a text or image query."""

    query: str
    k: int
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


def _hit(r: SearchResult) -> Hit:
    m = r.metadata
    return Hit(
        rank=r.rank,
        id=r.id,
        name=r.name,
        score=round(r.score, 6),
        width=m.width,
        height=m.height,
        crs=m.crs,
        bounds=None if m.bounds is None else list(m.bounds),
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
    page = resources.files("rsitr.service").joinpath("static/index.html").read_text(encoding="utf-8")
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

    def respond(query: str, k: int, results: list[SearchResult], t0: float) -> SearchResponse:
        return SearchResponse(
            query=query,
            k=k,
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
        return HTMLResponse(
            page, headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"}
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
        )

    @app.get("/api/search", response_model=SearchResponse, summary="Text→image search")
    def search(
        q: Annotated[str, Query(min_length=1, max_length=cfg.max_query_chars, description="Query text.")],
        k: Annotated[int, Query(ge=1, le=cfg.max_k, description="Number of results.")] = 10,
    ) -> SearchResponse:
        """The ``k`` images that best match the query text, best first."""
        if not q.strip():
            raise HTTPException(422, "empty query")
        refresh()
        t0 = time.perf_counter()
        return respond(q, k, index.search_text(q.strip(), k=k), t0)

    @app.post("/api/search/image", response_model=SearchResponse, summary="Image→image search (upload)")
    async def search_image(
        file: Annotated[UploadFile, File(description="A JPEG, PNG or TIFF image.")],
        k: Annotated[int, Query(ge=1, le=cfg.max_k)] = 10,
    ) -> SearchResponse:
        """The ``k`` indexed images most similar to the uploaded image (413: too large, 415: not
        a JPEG/PNG/TIFF, 422: undecodable)."""
        data = await file.read(cfg.upload.max_bytes + 1)
        try:
            image = await run_in_threadpool(decode_upload, data, file.content_type, cfg.upload)
        except UploadError as e:
            raise HTTPException(e.status, e.detail) from e
        refresh()
        t0 = time.perf_counter()
        results = await run_in_threadpool(index.search_image, image, k)
        return respond(file.filename or "upload", k, results, t0)

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
