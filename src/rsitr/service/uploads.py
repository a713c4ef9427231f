"""Checking uploaded query images: size, declared type, magic bytes, pixel count, decoding."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from rsitr.data.images import load_image
from rsitr.errors import DataError
from rsitr.retrieval.index.ingest import EMBED_MAX_SIDE, image_size

__all__ = ["BodySizeLimit", "UploadError", "UploadPolicy", "decode_upload", "sniff_type"]

_MAGIC = {
    b"\xff\xd8\xff": "image/jpeg",
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
}


class UploadError(Exception):
    """A rejected upload, with the HTTP status to answer.

    Args:
        status: 413 (too large), 415 (not a supported image type) or 422 (undecodable).
        detail: the one-line reason.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class UploadPolicy:
    """Limits on uploaded query images.

    Attributes:
        max_bytes: largest accepted file.
        max_pixels: largest accepted width × height (decompression bombs).
        types: accepted content types (JPEG, PNG, TIFF); the bytes must match too.
    """

    max_bytes: int = 10 << 20
    max_pixels: int = 64_000_000
    types: tuple[str, ...] = ("image/jpeg", "image/png", "image/tiff")


def sniff_type(data: bytes) -> str | None:
    """The image type named by the first bytes, or ``None``."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return kind
    return None


def decode_upload(data: bytes, content_type: str | None, policy: UploadPolicy) -> Image.Image:
    """Validate an uploaded file and decode it to RGB.

    Args:
        data: the file's bytes.
        content_type: the declared type of the multipart part.
        policy: the limits.

    Returns:
        The RGB image (longest side at most the embedding decode size).

    Raises:
        UploadError: 413 if too large (bytes or pixels), 415 if the declared type or the bytes
            are not an accepted image type, 422 if it cannot be decoded.
    """
    if len(data) > policy.max_bytes:
        raise UploadError(413, f"upload of {len(data)} bytes exceeds the limit of {policy.max_bytes}")
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in policy.types:
        raise UploadError(415, f"content type {declared or 'none'!r}; accepted: {', '.join(policy.types)}")
    sniffed = sniff_type(data)
    if sniffed is None or sniffed not in policy.types:
        raise UploadError(415, "the file is not a JPEG, PNG or TIFF image")
    fd, name = tempfile.mkstemp(suffix=".tif" if sniffed == "image/tiff" else ".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:  # Pillow refuses headers that declare over 2 × MAX_IMAGE_PIXELS before we can ask
            Image.open(name).close()
        except Image.DecompressionBombError as e:
            raise UploadError(413, f"image exceeds the pixel limit ({str(e).split('.')[0]})") from None
        except Exception:  # noqa: BLE001 - not a Pillow format (some TIFFs): image_size tries tifffile
            pass
        width, height = image_size(Path(name))
        if width is None or height is None:
            raise UploadError(422, "cannot read the image header")
        if width * height > policy.max_pixels:
            raise UploadError(413, f"image of {width}x{height} pixels exceeds {policy.max_pixels} pixels")
        try:
            return load_image(name, max_side=EMBED_MAX_SIDE)
        except DataError as e:
            raise UploadError(422, str(e).split(": ", 1)[-1]) from e
    finally:
        os.unlink(name)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: answer 413 to any request body larger than ``max_bytes``, without
    reading more of it (checks ``Content-Length`` first, then counts streamed chunks).

    Args:
        app: the wrapped ASGI app.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = b'{"detail":"request body too large (limit %d bytes)"}' % self.max_bytes
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        received = 0
        started = over = False

        async def limited_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            # A handler or body parser that caught _TooLarge answers with its own error (FastAPI:
            # 400 "error parsing the body"): the client gets the 413 instead.
            nonlocal started
            if over:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)
