"""``load_corpus``: read any supported caption source into a :class:`RetrievalCorpus`."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from rsitr.data.corpus import ImageRecord, RetrievalCorpus
from rsitr.data.formats import detect_format, get_format
from rsitr.data.labels import assign_scenes
from rsitr.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["load_corpus", "resolve_images"]


def _candidates(root: Path, im: ImageRecord) -> list[Path]:
    out = []
    if im.meta.get("relpath"):
        out.append(root / str(im.meta["relpath"]))
    if im.meta.get("filepath"):
        out.append(root / str(im.meta["filepath"]) / im.filename)
    out.append(root / im.filename)
    return out


def resolve_images(corpus: RetrievalCorpus, root: str | Path) -> RetrievalCorpus:
    """Set ``path`` of every image by looking it up under an image root.

    For each image the first existing file among ``root/relpath`` (PIR's ``test/x.tif``),
    ``root/filepath/filename`` (Karpathy ``filepath``) and ``root/filename`` is taken; when none
    exists, ``path`` is the first candidate, so a later check reports the file as missing.

    Args:
        corpus: the corpus; it is not modified.
        root: the image directory.

    Returns:
        A new corpus with ``path`` set on every image.

    Raises:
        DataError: if ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("image root is not a directory", path=root)
    images = []
    for im in corpus.images:
        cands = _candidates(root, im)
        path = next((p for p in cands if p.is_file()), cands[0])
        images.append(replace(im, path=path, meta=dict(im.meta)))
    return replace(corpus, images=images, warnings=list(corpus.warnings))


def load_corpus(
    source: str | Path,
    split: str | None = None,
    fmt: str | None = None,
    images: str | Path | None = None,
    labels: str | Path | None = None,
    dataset: str | None = None,
) -> RetrievalCorpus:
    """Read a caption source, resolve image paths and assign scene labels.

    Formats are detected in this order unless ``fmt`` is given: a directory with
    ``{split}_caps.txt`` (any ``*_caps.txt`` without ``split``) → ``precomp``; a ``.json`` object
    with ``images`` → ``karpathy``; a ``.json`` list of records with ``caption`` → ``pir``; a
    ``.csv`` with ``filename,title`` → ``csv``; a directory of images → ``folder``.

    Args:
        source: caption file or directory.
        split: split to read (``None``: the only split of a precomp directory, every image of a
            Karpathy file, the whole file otherwise).
        fmt: a registered format name (see :func:`rsitr.data.list_formats`), or ``None`` to
            detect.
        images: the image root; when given, each image's ``path`` is resolved against it.
        labels: a ``labels.csv`` (``filename,scene``), which takes precedence for scenes.
        dataset: dataset name for the scene rule (``"ucm"`` enables the numeric UC Merced rule);
            ``None`` infers it from the source path.

    Returns:
        The corpus. Warnings raised while reading are in its ``warnings`` (and logged).

    Raises:
        ConfigError: for an unknown ``fmt`` or ``dataset``, or a missing required ``split``.
        DataError: if the source is missing, undetectable or malformed (naming file, line or
            field).
    """
    source = Path(source)
    if not source.exists():
        raise DataError("no such file or directory", path=source)
    spec = get_format(fmt) if fmt is not None else get_format(detect_format(source, split))
    corpus = spec.read(source, split)
    for w in corpus.warnings:
        logger.warning(w)
    if images is not None and spec.name != "folder":
        corpus = resolve_images(corpus, images)
    corpus = assign_scenes(corpus, labels=labels, dataset=dataset)
    logger.info(
        "read %s [%s, %s]: %d images, %d captions",
        source,
        spec.name,
        corpus.split,
        corpus.num_images,
        corpus.num_captions,
    )
    return corpus
