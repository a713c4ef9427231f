"""Decorator registry of caption formats and format auto-detection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rsitr.data.corpus import RetrievalCorpus
from rsitr.errors import ConfigError, DataError

__all__ = [
    "CaptionFormat",
    "detect_format",
    "get_format",
    "list_formats",
    "register_format",
]

Reader = Callable[[Path, "str | None"], RetrievalCorpus]
Detector = Callable[[Path, "str | None"], bool]
SplitLister = Callable[[Path], "dict[str, list[str]]"]


@dataclass(frozen=True)
class CaptionFormat:
    """A registered caption format.

    Attributes:
        name: registry name (snake_case).
        read: ``read(source, split) -> RetrievalCorpus``.
        detect: ``detect(source, split) -> bool``; cheap, reads at most a file header.
        split_files: ``split_files(source) -> {split: [filename, ...]}`` over every split that the
            same source offers (sibling files included), used to find split overlap.
        priority: detection order, lower first.
        description: one line for help texts.
    """

    name: str
    read: Reader
    detect: Detector
    split_files: SplitLister
    priority: int
    description: str


_FORMATS: dict[str, CaptionFormat] = {}


def register_format(
    name: str,
    *,
    detect: Detector,
    split_files: SplitLister,
    priority: int = 100,
    description: str = "",
) -> Callable[[Reader], Reader]:
    """Register a reader function under ``name``.

    Args:
        name: the format name used by ``load_corpus(fmt=...)`` and ``--format``.
        detect: returns whether a source looks like this format.
        split_files: lists the file names of every split of the same source.
        priority: detection order (lower is tried first).
        description: one-line description.

    Returns:
        A decorator that registers and returns the reader unchanged.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def deco(read: Reader) -> Reader:
        if name in _FORMATS:
            raise ValueError(f"caption format {name!r} is already registered")
        _FORMATS[name] = CaptionFormat(name, read, detect, split_files, priority, description)
        return read

    return deco


def list_formats() -> list[str]:
    """Return the registered format names in detection order."""
    return [f.name for f in sorted(_FORMATS.values(), key=lambda f: (f.priority, f.name))]


def get_format(name: str) -> CaptionFormat:
    """Return the format registered under ``name``.

    Args:
        name: a registered format name.

    Returns:
        The :class:`CaptionFormat`.

    Raises:
        ConfigError: if ``name`` is unknown; the message lists the known names.
    """
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError(f"format={name!r} is unknown; known formats: {', '.join(list_formats())}") from None


def detect_format(source: Path, split: str | None = None) -> str:
    """Return the name of the first registered format whose detector accepts ``source``.

    Args:
        source: a caption file or directory.
        split: the requested split, if any (a precomp directory is recognised by
            ``{split}_caps.txt``).

    Returns:
        The format name.

    Raises:
        DataError: if ``source`` does not exist or no format recognises it.
    """
    if not source.exists():
        raise DataError("no such file or directory", path=source)
    for name in list_formats():
        if _FORMATS[name].detect(source, split):
            return name
    raise DataError(
        f"cannot detect the caption format; pass fmt= one of: {', '.join(list_formats())}",
        path=source,
    )
