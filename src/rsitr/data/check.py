"""Dataset checks: ``check_corpus`` builds the report behind ``rsitr data check``.

The report says whether a caption source is usable and what it contains; it never modifies the
data. Blank captions are reported with their file and line, together with what the toolkit will
do with them (see :meth:`RetrievalCorpus.drop_blank_captions`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import Any

from rsitr.data.corpus import BlankCaption, RetrievalCorpus
from rsitr.data.formats import detect_format, get_format
from rsitr.data.images import inspect_image
from rsitr.data.loading import load_corpus
from rsitr.data.splitting import split_profile
from rsitr.errors import DataError, RsitrError

logger = logging.getLogger(__name__)

__all__ = ["blank_caption_ranges", "check_corpus", "summarize_corpus"]

_EXAMPLES = 10


def _first(names: list[str], n: int = _EXAMPLES) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def blank_caption_ranges(blanks: list[BlankCaption]) -> list[str]:
    """Describe blank captions per image as ``image (file:first-last, ...)``, in order."""
    per_image: dict[str, list[tuple[str, int]]] = {}
    for b in blanks:
        per_image.setdefault(b.image, []).append((b.file, b.line))
    out = []
    for image, places in per_image.items():
        runs: list[list[Any]] = []  # [file, first, last]
        for file, line in places:
            if runs and runs[-1][0] == file and runs[-1][2] + 1 == line:
                runs[-1][2] = line
            else:
                runs.append([file, line, line])
        where = ", ".join(f"{f}:{a}" if a == b else f"{f}:{a}-{b}" for f, a, b in runs)
        out.append(f"{image} ({where})")
    return out


def _duplicates(corpus: RetrievalCorpus) -> tuple[int, dict[str, int]]:
    """Captions shared across images, and repeats within images (blank captions ignored)."""
    owners: dict[str, set[int]] = {}
    within_images = within_captions = all_identical = 0
    for i, caps in enumerate(corpus.image_captions):
        texts = [corpus.captions[c].strip() for c in caps]
        texts = [t for t in texts if t]
        for t in texts:
            owners.setdefault(t, set()).add(i)
        n_unique = len(set(texts))
        if n_unique < len(texts):
            within_images += 1
            within_captions += len(texts) - n_unique
            all_identical += n_unique == 1
    across = sum(1 for s in owners.values() if len(s) > 1)
    return across, {
        "images": within_images,
        "captions": within_captions,
        "images_all_identical": all_identical,
    }


def _split_overlap(fmt: str, source: Path) -> dict[str, Any] | None:
    """Images present in more than one split of the same source; ``None`` if it has one split."""
    per_split = {s: set(names) for s, names in get_format(fmt).split_files(source).items()}
    if len(per_split) < 2:
        return None
    pairs = {f"{a}/{b}": len(per_split[a] & per_split[b]) for a, b in combinations(sorted(per_split), 2)}
    counts = Counter(name for names in per_split.values() for name in names)
    shared = sorted(name for name, n in counts.items() if n > 1)
    return {
        "splits": {s: len(v) for s, v in sorted(per_split.items())},
        "images": len(shared),
        "pairs": pairs,
        "examples": shared[:_EXAMPLES],
    }


def _deep(corpus: RetrievalCorpus) -> tuple[list[dict[str, str]], dict[str, dict[str, int]]]:
    """Decode every existing image; return the failures and a size/mode summary."""
    paths = [(im.filename, im.path) for im in corpus.images if im.path is not None and im.path.is_file()]

    def probe(item: tuple[str, Path]) -> tuple[str, Any]:
        try:
            return item[0], inspect_image(item[1])
        except DataError as e:
            return item[0], e

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoders release the GIL
        results = list(pool.map(probe, paths))
    corrupt = [{"image": name, "error": str(r)} for name, r in results if isinstance(r, DataError)]
    infos = [r for _, r in results if not isinstance(r, DataError)]
    summary = {
        "sizes": dict(Counter(f"{i.width}x{i.height}" for i in infos).most_common()),
        "modes": dict(Counter(i.mode for i in infos).most_common()),
        "dtypes": dict(Counter(i.dtype for i in infos).most_common()),
    }
    return corrupt, summary


def summarize_corpus(
    corpus: RetrievalCorpus, check_images: bool = False, deep: bool = False
) -> dict[str, Any]:
    """Build the check report of an already loaded corpus (without split overlap).

    Args:
        corpus: the corpus.
        check_images: whether image paths were resolved and should be checked for existence.
        deep: decode every image (needs paths).

    Returns:
        The report dict (see :func:`check_corpus`).
    """
    errors: list[str] = []
    warnings: list[str] = list(corpus.warnings)
    has_captions = corpus.fmt != "folder"
    counts = Counter(len(g) for g in corpus.image_captions)
    blanks = corpus.blank_captions
    blank_images = list(dict.fromkeys(b.image for b in blanks))
    if blanks:
        warnings.append(
            f"{len(blanks)} blank caption(s) in {len(blank_images)} image(s): "
            f"{_first(blank_caption_ranges(blanks), 5)}; training drops them and any "
            "image left without captions; evaluation keeps the images and excludes the blank "
            "captions from text-to-image queries"
        )
    if has_captions and corpus.num_captions == 0:
        errors.append("no captions")
    elif has_captions and len(blanks) == corpus.num_captions:
        errors.append("every caption is blank")
    no_caps = [im.filename for im, g in zip(corpus.images, corpus.image_captions, strict=True) if not g]
    if has_captions and no_caps:
        warnings.append(f"{len(no_caps)} image(s) have no caption: {_first(no_caps)}")
    across, within = _duplicates(corpus)

    missing: list[str] | None = None
    if check_images:
        missing = [im.filename for im in corpus.images if im.path is None or not im.path.is_file()]
        if missing:
            errors.append(f"{len(missing)} of {corpus.num_images} image(s) not found: {_first(missing)}")
    corrupt: list[dict[str, str]] | None = None
    image_summary: dict[str, dict[str, int]] | None = None
    if deep:
        if not check_images:
            warnings.append("--deep needs the image root (--images); images were not decoded")
        else:
            corrupt, image_summary = _deep(corpus)
            if corrupt:
                errors.append(
                    f"{len(corrupt)} image(s) cannot be decoded: "
                    + _first([f"{c['image']} ({c['error']})" for c in corrupt], 3)
                )
    sources = Counter(im.meta.get("scene_source", "none") for im in corpus.images)
    return {
        "source": corpus.source,
        "format": corpus.fmt,
        "split": corpus.split,
        "n_images": corpus.num_images,
        "n_captions": corpus.num_captions,
        "captions_per_image": {str(k): counts[k] for k in sorted(counts)},
        "blank_captions": [{"file": b.file, "line": b.line, "image": b.image} for b in blanks],
        "images_with_blank_captions": blank_images,
        "duplicate_captions_across_images": across,
        "duplicate_captions_within_images": within,
        "missing_images": missing,
        "corrupt_images": corrupt,
        "image_summary": image_summary,
        "split_overlap": None,
        "profile": split_profile(corpus),
        "labelled_images": sum(im.scene is not None for im in corpus.images),
        "label_summary": {
            "scenes": len({im.scene for im in corpus.images if im.scene is not None}),
            "sources": dict(sources.most_common()),
        },
        "errors": errors,
        "warnings": warnings,
    }


def _profile(
    corpus: RetrievalCorpus,
    source: Path,
    split: str | None,
    fmt: str | None,
    labels: str | Path | None,
    dataset: str | None,
    reference_source: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`split_profile` of the checked split, against ``reference_source`` (every image of
    it) when given, else the source's ``train`` split when another split is checked, else its
    own other images."""
    reference = None
    if reference_source is not None:
        reference = load_corpus(reference_source, labels=labels)
        out = split_profile(corpus, reference)
        out["reference"] = str(reference_source)
        return out
    if split not in (None, "train"):
        try:
            reference = load_corpus(source, split="train", fmt=fmt, labels=labels, dataset=dataset)
        except RsitrError:
            reference = None
    out = split_profile(corpus, reference)
    out["reference"] = "train split" if reference is not None else out["reference"]
    return out


def check_corpus(
    source: str | Path,
    split: str | None = None,
    fmt: str | None = None,
    images: str | Path | None = None,
    labels: str | Path | None = None,
    deep: bool = False,
    dataset: str | None = None,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Check a caption source and report whether it is usable.

    Args:
        source: caption file or directory (any format of :func:`rsitr.data.load_corpus`).
        split: split to check (the report's ``split_overlap`` covers every split).
        fmt: format name, or ``None`` to detect.
        images: image root; enables ``missing_images`` (and ``--deep`` decoding).
        labels: ``labels.csv`` with ``filename,scene``.
        deep: decode every image, reporting ``corrupt_images`` and ``image_summary``.
        dataset: dataset name for the scene rule (``"ucm"``), ``None`` to infer.
        reference: training data whose captions define the profile's ``verbatim_overlap``.

    Returns:
        A JSON-serialisable dict with keys ``source``, ``format``, ``split``, ``n_images``,
        ``n_captions``, ``captions_per_image`` (``{"5": n_images_with_5, ...}``),
        ``blank_captions`` (``[{file, line, image}]``), ``images_with_blank_captions`` (names),
        ``duplicate_captions_across_images`` (caption strings shared by more than one image),
        ``duplicate_captions_within_images`` (``{images, captions, images_all_identical}``),
        ``missing_images`` (names; ``None`` without ``images``), ``corrupt_images``
        (``[{image, error}]``; ``None`` without ``deep``), ``image_summary`` (sizes, modes,
        dtypes; with ``deep``), ``split_overlap`` (``{splits, images, pairs, examples}``;
        ``None`` for a single-split source), ``profile`` (:func:`split_profile` figures:
        distinct captions per image, identical-caption images, verbatim overlap with the train
        split, scene mix), ``labelled_images``, ``label_summary``,
        ``errors`` and ``warnings``. The source is usable when ``errors`` is empty.

    Raises:
        ConfigError: for an unknown format or dataset, or a missing required split.
    """
    source = Path(source)
    try:
        corpus = load_corpus(source, split=split, fmt=fmt, images=images, labels=labels, dataset=dataset)
    except DataError as e:  # unreadable or malformed: a report with every key, and the error
        empty = RetrievalCorpus([], [], [], split or "", str(source), [], fmt or "")
        report = summarize_corpus(empty)
        report["errors"] = [str(e)]
        return report
    check_images = images is not None or corpus.fmt == "folder"
    report = summarize_corpus(corpus, check_images=check_images, deep=deep)
    try:
        overlap = _split_overlap(corpus.fmt or detect_format(source, split), source)
    except DataError as e:
        overlap = None
        report["warnings"].append(f"split overlap not checked: {e}")
    report["split_overlap"] = overlap
    report["profile"] = _profile(corpus, source, split, fmt, labels, dataset, reference)
    if overlap and overlap["images"]:
        report["warnings"].append(
            f"{overlap['images']} image(s) appear in more than one split "
            f"({', '.join(f'{k}: {v}' for k, v in overlap['pairs'].items() if v)}): "
            + _first(overlap["examples"], 5)
        )
    return report
