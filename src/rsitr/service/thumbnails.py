"""Thumbnails of indexed images, rendered once and kept in a byte-bounded LRU cache."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from rsitr.data.images import load_image

__all__ = ["ThumbnailCache", "render_jpeg"]


def render_jpeg(path: Path, max_side: int, quality: int = 85) -> bytes:
    """Decode an image with the data layer (GeoTIFFs stretched to 8 bits) and encode a JPEG
    whose longest side is at most ``max_side``.

    Raises:
        DataError: if the file cannot be read.
    """
    image = load_image(path, max_side=max_side)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


class ThumbnailCache:
    """A thread-safe LRU cache of encoded thumbnails, bounded by total bytes.

    Args:
        max_bytes: the cache's budget; the least recently used entries go first.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int], path: Path, max_side: int) -> bytes:
        """The JPEG for ``key`` (content hash, size), rendering ``path`` on a miss.

        Raises:
            DataError: if the file cannot be read.
        """
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        data = render_jpeg(path, max_side)  # outside the lock: decoding is slow
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old)
        return data
