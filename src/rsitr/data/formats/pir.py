"""The PIR/HarMA fine-tuning JSON format (a list of records, one file per split).

Training files have one record per caption: ``{caption, image, image_id, label_name, label}``.
Validation and test files have one record per image: ``{image, caption: [...]}`` (some with
``label_name``). ``image`` is a path relative to the image root such as ``test/x.tif``: the
basename becomes :attr:`ImageRecord.filename`, the full path is kept in ``meta["relpath"]``.
``caption_origin`` holds the 1-based record index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsitr.data.corpus import RetrievalCorpus
from rsitr.data.formats._builder import CorpusBuilder
from rsitr.data.formats._registry import register_format
from rsitr.data.formats._text import first_char, read_json, sibling_split_files, split_from_stem
from rsitr.errors import DataError


def _detect(source: Path, split: str | None) -> bool:
    return source.is_file() and source.suffix.lower() == ".json" and first_char(source) == "["


def _records(path: Path) -> list[dict[str, Any]]:
    obj = read_json(path)
    if not isinstance(obj, list):
        raise DataError("not a PIR JSON file: expected a list of records", path=path)
    for k, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError("record is not an object", path=path, field=f"[{k}]")
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError("missing or empty image path", path=path, field=f"[{k}].image")
        if "caption" not in rec:
            raise DataError("record has no caption", path=path, field=f"[{k}].caption")
    return obj


def _record_split(image: str) -> str | None:
    """The first folder of a relative image path (``test/x.tif`` → ``test``), if any."""
    head, sep, _ = image.strip().replace("\\", "/").lstrip("/").partition("/")
    return head if sep else None


def _basename(image: str) -> str:
    return image.strip().replace("\\", "/").rsplit("/", 1)[-1]


def _file_split(path: Path, records: list[dict[str, Any]]) -> str:
    prefixes = {_record_split(r["image"]) for r in records}
    if len(prefixes) == 1 and None not in prefixes:
        return str(prefixes.pop())
    return split_from_stem(path) or "all"


def _split_files(source: Path) -> dict[str, list[str]]:
    siblings = sibling_split_files(source, source.suffix) or [("", source)]
    out: dict[str, list[str]] = {}
    for name, path in siblings:
        try:
            records = _records(path)
        except DataError:
            if path == source:
                raise
            continue  # a sibling that is not PIR JSON is not part of this source
        key = name or _file_split(path, records)
        out.setdefault(key, []).extend(_basename(r["image"]) for r in records)
    return out


@register_format(
    "pir",
    detect=_detect,
    split_files=_split_files,
    priority=30,
    description="PIR/HarMA JSON list of {image, caption[, label_name]} records",
)
def read_pir(source: Path, split: str | None = None) -> RetrievalCorpus:
    """Read a PIR/HarMA JSON file.

    Args:
        source: the JSON file.
        split: if given and the records' image paths start with a split folder
            (``train/``, ``test/``), keep only records of that split.

    Returns:
        The corpus. Its split is ``split``, else the records' common folder, else the split
        named by the file (``rsitmd_test.json``), else ``"all"``.

    Raises:
        DataError: if the file is not a list of records with ``image`` and ``caption``, a caption
            is not text, or no record has the requested split.
    """
    records = _records(source)
    has_prefix = all(_record_split(r["image"]) is not None for r in records)
    if split is not None and has_prefix:
        present = sorted({str(_record_split(r["image"])) for r in records})
        records_k = [(k, r) for k, r in enumerate(records) if _record_split(r["image"]) == split]
        if not records_k:
            raise DataError(
                f"no record has split {split!r}; image folders present: {', '.join(present)}",
                path=source,
                field="split",
            )
    else:
        records_k = list(enumerate(records))
    builder = CorpusBuilder(source, split or _file_split(source, records), "pir")
    file = str(source)
    for k, rec in records_k:
        relpath = rec["image"].strip()
        meta: dict[str, Any] = {"relpath": relpath}
        rec_split = _record_split(relpath)
        if rec_split is not None:
            meta["split"] = rec_split
        for key in ("image_id", "label_name", "label"):
            if key in rec:
                meta[key] = rec[key]
        caps = rec["caption"]
        one_caption = isinstance(caps, str)  # training layout: one record per caption
        idx = builder.image(
            relpath,
            _basename(relpath),
            meta,
            where=f"{file} [{k}]",
            repeats="any" if one_caption else "none",
        )
        caps = [caps] if one_caption else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DataError("caption is not text or a list of text", path=source, field=f"[{k}].caption")
        for text in caps:
            builder.caption(idx, text, file, k + 1)
    return builder.build()
