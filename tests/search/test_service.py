"""The JSON API: text and image search, images by id (cached), health, OpenAPI, the page,
and the safety rules (no path traversal, upload limits on size and type)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from rsitr.retrieval.index import Index  # noqa: E402
from rsitr.service import ServiceConfig, UploadPolicy, create_app  # noqa: E402
from tests.search.conftest import SearchAssets  # noqa: E402

MAX_UPLOAD = 200_000


@pytest.fixture(scope="module")
def client(assets: SearchAssets, built_index: Path) -> Iterator[TestClient]:
    index = Index.open(built_index, assets.ckpt)
    app = create_app(index, ServiceConfig(upload=UploadPolicy(max_bytes=MAX_UPLOAD)))
    with TestClient(app) as c:
        yield c
    index.close()


def jpeg_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_text_search_returns_the_captioned_image_first(client: TestClient, assets: SearchAssets) -> None:
    caption, image = assets.query
    r = client.get("/api/search", params={"q": caption, "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 5 and body["query"] == caption
    top = body["results"][0]
    assert top["name"] == image and top["rank"] == 1
    assert [h["score"] for h in body["results"]] == sorted(
        (h["score"] for h in body["results"]), reverse=True
    )
    assert top["thumbnail"] == f"/api/images/{top['id']}"
    assert "path" not in top  # server paths are never exposed


def test_image_upload_search_and_thumbnails(client: TestClient, assets: SearchAssets) -> None:
    name = "port_00002.jpg"
    r = client.post(
        "/api/search/image?k=3", files={"file": (name, jpeg_bytes(assets.archive / name), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["name"] == name and top["score"] == pytest.approx(1.0, abs=1e-4)

    t = client.get(top["thumbnail"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(t.content)).size == (128, 128)  # never upscaled
    assert client.get(top["thumbnail"], headers={"If-None-Match": t.headers["etag"]}).status_code == 304
    cache = client.app.state.thumbnails  # type: ignore[attr-defined]
    hits = cache.hits
    assert client.get(top["thumbnail"]).content == t.content and cache.hits == hits + 1
    large = client.get(top["image"])
    assert large.status_code == 200 and large.headers["etag"] != t.headers["etag"]


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/images/../../meta.sqlite",
        "/api/images/0",
        "/api/images/-1",
        "/api/images/99999",
        "/api/images/1?size=../../etc/passwd",
        "/api/images/1.5",
    ],
)
def test_images_are_served_by_id_only(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert 400 <= r.status_code < 500
    assert not r.headers.get("content-type", "").startswith("image/")


def test_upload_limits(client: TestClient, assets: SearchAssets) -> None:
    big = Image.effect_noise((600, 600), 100).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    assert len(buf.getvalue()) > MAX_UPLOAD
    r = client.post("/api/search/image", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413

    r = client.post("/api/search/image", files={"file": ("notes.png", b"just some text", "image/png")})
    assert r.status_code == 415
    r = client.post("/api/search/image", files={"file": ("notes.txt", b"just some text", "text/plain")})
    assert r.status_code == 415
    jpeg = jpeg_bytes(next(assets.archive.glob("*.jpg")))
    r = client.post("/api/search/image", files={"file": ("x.svg", jpeg, "image/svg+xml")})
    assert r.status_code == 415  # declared type not accepted, whatever the bytes
    r = client.post("/api/search/image", files={"file": ("cut.jpg", jpeg[:200], "image/jpeg")})
    assert r.status_code == 422  # looks like a JPEG, does not decode
    r = client.post("/api/search/image")
    assert r.status_code == 422


def test_query_validation_health_openapi_and_page(client: TestClient) -> None:
    assert client.get("/api/search", params={"q": "", "k": 5}).status_code == 422
    assert client.get("/api/search", params={"q": "ships", "k": 0}).status_code == 422
    assert client.get("/api/search", params={"q": "ships", "k": 10_000}).status_code == 422
    assert client.get("/api/search", params={"q": "x" * 501}).status_code == 422
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == 40 and health["kind"] == "flat"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/images/{image_id}", "/api/health"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and 'type="file"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
