"""A caption corpus for image→caption search: a text file or any supported caption source."""

from __future__ import annotations

from pathlib import Path

from rsitr.errors import DataError

__all__ = ["read_captions"]


def read_captions(path: str | Path) -> list[str]:
    """Read the captions to rank for an image.

    A ``.txt`` file holds one caption per line; anything else is read with
    :func:`rsitr.data.load_corpus` (Karpathy JSON, PIR JSON, CSV, precomp folder) and all its
    captions are used. Blank captions and exact duplicates are dropped (first kept).

    Args:
        path: the caption file or folder.

    Returns:
        The captions, in file order.

    Raises:
        DataError: if the file is missing, unreadable, or holds no caption.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("caption file not found", path=path)
    if path.suffix.lower() == ".txt":
        try:
            raw = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read captions: {e}", path=path) from e
    else:
        from rsitr.data import load_corpus

        raw = load_corpus(path).captions
    captions = list(dict.fromkeys(c.strip() for c in raw if c.strip()))
    if not captions:
        raise DataError("no caption in the file", path=path)
    return captions
