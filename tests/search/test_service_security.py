"""The service's real guards, past FastAPI's parameter validation: files outside the archive are
never served (a symlink, a relpath edited in the metadata database), and uploads between the two
size limits, streamed without Content-Length, declaring huge pixel counts, or in TIFF."""

from __future__ import annotations

import io
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from rsitr.retrieval.index import Index, build_index  # noqa: E402
from rsitr.service import ServiceConfig, UploadPolicy, create_app  # noqa: E402
from tests.search.conftest import SearchAssets  # noqa: E402

MAX_UPLOAD = 200_000
SECRET = b"TOP-SECRET-BYTES"


@pytest.fixture
def tampered(assets: SearchAssets, archive_copy: Path, tmp_path: Path) -> Iterator[tuple[TestClient, dict]]:
    """An index whose metadata points outside the archive: a symlink and two edited relpaths."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    first = sorted(archive_copy.glob("*.jpg"))[0]
    secret.write_bytes(first.read_bytes() + SECRET)  # a real JPEG, with trailing secret bytes
    out = tmp_path / "index"
    build_index(archive_copy, assets.ckpt, out, batch_size=16)
    (archive_copy / "zz_link.jpg").symlink_to(secret)
    db = sqlite3.connect(next(out.rglob("meta.sqlite")))
    ids = [r[0] for r in db.execute("SELECT id FROM images ORDER BY path")]
    edits = {ids[0]: "zz_link.jpg", ids[1]: "../../../../../../etc/passwd", ids[2]: str(secret)}
    with db:
        for i, rel in edits.items():
            db.execute("UPDATE images SET path = ? WHERE id = ?", (rel, i))
    db.close()
    index = Index.open(out, assets.ckpt)
    app = create_app(index, ServiceConfig(upload=UploadPolicy(max_bytes=MAX_UPLOAD)))
    with TestClient(app) as c:
        yield c, {**edits, "untouched": ids[3]}
    index.close()


def test_paths_outside_the_archive_are_never_served(tampered: tuple[TestClient, dict]) -> None:
    client, edits = tampered
    untouched = edits.pop("untouched")
    for image_id in edits:
        for size in ("thumb", "large"):
            r = client.get(f"/api/images/{image_id}", params={"size": size})
            assert r.status_code == 404, (image_id, r.status_code)
            assert not r.headers.get("content-type", "").startswith("image/")
            assert SECRET not in r.content and b"root:" not in r.content
    assert client.get(f"/api/images/{untouched}").status_code == 200  # an untouched id is still served


@pytest.fixture(scope="module")
def client(assets: SearchAssets, built_index: Path) -> Iterator[TestClient]:
    index = Index.open(built_index, assets.ckpt)
    app = create_app(index, ServiceConfig(upload=UploadPolicy(max_bytes=MAX_UPLOAD, max_pixels=50_000_000)))
    with TestClient(app) as c:
        yield c
    index.close()


def test_upload_between_the_handler_and_middleware_limits(client: TestClient) -> None:
    """Larger than the handler's limit, smaller than the middleware's (limit + 64 KiB)."""
    body = b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD + 1000)
    r = client.post("/api/search/image", files={"file": ("big.png", body, "image/png")})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def test_streamed_body_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # a well-formed multipart start, then 640 KiB of file data
        yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
               b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n")  # fmt: skip
        for _ in range(40):
            yield bytes(16 << 10)

    r = client.post(
        "/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 413, (r.status_code, r.text)


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` × ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_png_declaring_twenty_thousand_squared_pixels_is_refused(client: TestClient) -> None:
    bomb = _png_declaring(20_000, 20_000)
    assert len(bomb) < 200
    r = client.post("/api/search/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "pixel" in r.json()["detail"]


def test_valid_tiff_upload_finds_its_image(client: TestClient, assets: SearchAssets) -> None:
    _, name = assets.query
    buf = io.BytesIO()
    Image.open(assets.archive / name).convert("RGB").save(buf, format="TIFF")
    r = client.post(
        "/api/search/image", files={"file": ("query.tif", buf.getvalue(), "image/tiff")}, params={"k": 3}
    )
    assert r.status_code == 200
    assert r.json()["results"][0]["name"] == name
