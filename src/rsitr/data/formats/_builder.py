"""Incremental construction of a :class:`RetrievalCorpus`, shared by the readers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsitr.data.corpus import ImageRecord, RetrievalCorpus


class CorpusBuilder:
    """Collect images and captions in source order, merging repeated images by key.

    A key seen again later (not on the directly preceding entry) is a repeat: its captions go to
    the first image with that key, and the repeat is reported in the corpus warnings.

    Args:
        source: the file or directory being read.
        split: the split name of the corpus.
        fmt: the format name.
    """

    def __init__(self, source: Path, split: str, fmt: str) -> None:
        self.source = source
        self.split = split
        self.fmt = fmt
        self.images: list[ImageRecord] = []
        self.groups: list[list[int]] = []
        self.captions: list[str] = []
        self.origin: list[tuple[str, int]] = []
        self.warnings: list[str] = []
        self._index: dict[str, int] = {}
        self._last_key: str | None = None
        self._repeats: list[str] = []

    def image(
        self,
        key: str,
        filename: str,
        meta: dict[str, Any] | None = None,
        where: str = "",
        repeats: str = "consecutive",
    ) -> int:
        """Return the index of the image ``key``, adding it if new.

        Args:
            key: identity of the image within the source (file name or relative path).
            filename: file name as written in the source.
            meta: format-specific extras for a new image.
            where: ``file:line`` of this entry, for the repeat warning.
            repeats: which later entries of an existing key continue its image silently:
                ``"consecutive"`` (the directly preceding entry had the same key; layouts with
                one entry per caption), ``"any"`` (records of one caption each, in any order) or
                ``"none"`` (one entry per image: every repeat is reported).

        Returns:
            The image index.
        """
        idx = self._index.get(key)
        if idx is None:
            idx = len(self.images)
            self._index[key] = idx
            self.images.append(ImageRecord(filename=filename, meta=dict(meta or {})))
            self.groups.append([])
        elif repeats == "none" or (repeats == "consecutive" and key != self._last_key):
            self._repeats.append(f"{key} ({where})" if where else key)
        self._last_key = key
        return idx

    def caption(self, image_index: int, text: str, file: str, line: int) -> None:
        """Append a caption of image ``image_index`` read at ``file:line``."""
        self.groups[image_index].append(len(self.captions))
        self.captions.append(text)
        self.origin.append((file, line))

    def warn(self, message: str) -> None:
        """Record a warning for the corpus."""
        self.warnings.append(message)

    def build(self) -> RetrievalCorpus:
        """Return the corpus; repeated images are reported in its ``warnings``."""
        warnings = list(self.warnings)
        if self._repeats:
            listed = ", ".join(self._repeats[:5]) + (" ..." if len(self._repeats) > 5 else "")
            warnings.append(
                f"{self.source}: {len(self._repeats)} entr(ies) repeat an earlier image; their "
                f"captions were merged into the first: {listed}"
            )
        return RetrievalCorpus(
            images=self.images,
            captions=self.captions,
            image_captions=self.groups,
            split=self.split,
            source=str(self.source),
            caption_origin=self.origin,
            fmt=self.fmt,
            warnings=warnings,
        )
