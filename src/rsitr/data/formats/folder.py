"""A directory of images without captions (an unlabelled archive to index or to check)."""

from __future__ import annotations

import os
from pathlib import Path

from rsitr.data.corpus import ImageRecord, RetrievalCorpus
from rsitr.data.formats._registry import register_format

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})


def iter_image_files(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _has_image(root: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in filenames):
            return True
    return False


def _detect(source: Path, split: str | None) -> bool:
    return source.is_dir() and _has_image(source)


def _split_files(source: Path) -> dict[str, list[str]]:
    return {}


@register_format(
    "folder",
    detect=_detect,
    split_files=_split_files,
    priority=90,
    description="directory of .jpg/.jpeg/.png/.tif/.tiff images (recursive), no captions",
)
def read_folder(source: Path, split: str | None = None) -> RetrievalCorpus:
    """List the images of a directory as a corpus without captions.

    Args:
        source: the directory; it is also the image root (``ImageRecord.path`` is set).
        split: the split name to give the corpus; default ``"all"``.

    Returns:
        The corpus; ``filename`` is the POSIX path relative to ``source``.
    """
    images = [
        ImageRecord(
            filename=p.relative_to(source).as_posix(),
            path=p,
            meta={"relpath": p.relative_to(source).as_posix()},
        )
        for p in iter_image_files(source)
    ]
    return RetrievalCorpus(
        images=images,
        captions=[],
        image_captions=[[] for _ in images],
        split=split or "all",
        source=str(source),
        caption_origin=[],
        fmt="folder",
    )
