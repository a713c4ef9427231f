"""Karpathy-style JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}, ...]}, ...]}``.

Used by MSA, RemoteCLIP and torchrs for RSICD, RSITMD, UCM- and Sydney-Captions. One file holds
every split; ``caption_origin`` holds the 1-based index of the image record in ``images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsitr.data.corpus import RetrievalCorpus
from rsitr.data.formats._builder import CorpusBuilder
from rsitr.data.formats._registry import register_format
from rsitr.data.formats._text import first_char, read_json
from rsitr.errors import DataError


def _detect(source: Path, split: str | None) -> bool:
    return source.is_file() and source.suffix.lower() == ".json" and first_char(source) == "{"


def _records(path: Path) -> list[Any]:
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise DataError("not a Karpathy JSON file: no 'images' list", path=path, field="images")
    return obj["images"]


def _filename(path: Path, k: int, rec: Any) -> str:
    if not isinstance(rec, dict):
        raise DataError("image record is not an object", path=path, field=f"images[{k}]")
    name = rec.get("filename")
    if not isinstance(name, str) or not name.strip():
        raise DataError("missing or empty file name", path=path, field=f"images[{k}].filename")
    return name.strip()


def _split_files(source: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, rec in enumerate(_records(source)):
        out.setdefault(str(rec.get("split", "")), []).append(_filename(source, k, rec))
    return out


@register_format(
    "karpathy",
    detect=_detect,
    split_files=_split_files,
    priority=20,
    description="Karpathy JSON with images[].filename, split, sentences[].raw",
)
def read_karpathy(source: Path, split: str | None = None) -> RetrievalCorpus:
    """Read a Karpathy-style JSON file.

    Args:
        source: the JSON file.
        split: keep only images whose ``split`` equals it; ``None`` keeps every image (the corpus
            split is then ``"all"`` and each image has ``meta["split"]``).

    Returns:
        The corpus.

    Raises:
        DataError: if the file is not valid Karpathy JSON (naming the offending field), or no
            image has the requested split.
    """
    records = _records(source)
    builder = CorpusBuilder(source, split or "all", "karpathy")
    file = str(source)
    seen_splits: set[str] = set()
    for k, rec in enumerate(records):
        name = _filename(source, k, rec)
        rec_split = str(rec.get("split", ""))
        seen_splits.add(rec_split)
        if split is not None and rec_split != split:
            continue
        meta: dict[str, Any] = {"split": rec_split}
        for key in ("imgid", "filepath"):
            if key in rec:
                meta[key] = rec[key]
        key = f"{rec['filepath']}/{name}" if "filepath" in rec else name
        idx = builder.image(key, name, meta, where=f"{file} images[{k}]", repeats="none")
        sentences = rec.get("sentences", [])
        if not isinstance(sentences, list):
            raise DataError("'sentences' is not a list", path=source, field=f"images[{k}].sentences")
        for s, sent in enumerate(sentences):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(map(str, sent["tokens"]))
            if not isinstance(raw, str):
                raise DataError(
                    "sentence has no 'raw' text", path=source, field=f"images[{k}].sentences[{s}]"
                )
            builder.caption(idx, raw, file, k + 1)
    if split is not None and not builder.images:
        raise DataError(
            f"no image has split {split!r}; splits present: {', '.join(sorted(seen_splits))}",
            path=source,
            field="split",
        )
    return builder.build()
