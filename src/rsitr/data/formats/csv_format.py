"""CSV captions (GeoRSCLIP / RemoteCLIP test files): one row per caption, ``filename,title``.

Rows are grouped into images by ``filename`` in order of first appearance (GeoRSCLIP sorts the
unique names instead; the grouping is the same, only the image order differs). Other columns are
ignored. A row whose ``title`` is empty is a blank caption; an entirely empty row is skipped with
a warning. A tab-separated file is accepted when its header has tabs and no commas.
``caption_origin`` holds the 1-based line on which each row ends.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rsitr.data.corpus import RetrievalCorpus
from rsitr.data.formats._builder import CorpusBuilder
from rsitr.data.formats._registry import register_format
from rsitr.data.formats._text import read_text, sibling_split_files, split_from_stem
from rsitr.errors import DataError

FILENAME_COLUMN = "filename"
CAPTION_COLUMN = "title"


def _header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError):
        return []
    delim = "\t" if "\t" in line and "," not in line else ","
    return [c.strip().lower() for c in line.strip("\r\n").split(delim)]


def _detect(source: Path, split: str | None) -> bool:
    if not source.is_file() or source.suffix.lower() not in (".csv", ".tsv"):
        return False
    cols = _header(source)
    return FILENAME_COLUMN in cols and CAPTION_COLUMN in cols


def _rows(path: Path) -> tuple[list[tuple[int, str, str]], list[int]]:
    """Return ``[(line, filename, title), ...]`` and the lines of entirely empty rows."""
    text = read_text(path)
    first = text.split("\n", 1)[0]
    delim = "\t" if "\t" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = [c.strip().lower() for c in next(reader)]
    except StopIteration:
        raise DataError("empty CSV file", path=path) from None
    for col in (FILENAME_COLUMN, CAPTION_COLUMN):
        if col not in header:
            raise DataError(
                f"missing column {col!r}; header is {','.join(header)}",
                path=path,
                line=1,
                field=col,
            )
    fi, ti = header.index(FILENAME_COLUMN), header.index(CAPTION_COLUMN)
    rows, empty = [], []
    try:
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                empty.append(line)
                continue
            if len(row) <= max(fi, ti):
                raise DataError(f"row has {len(row)} fields, expected {len(header)}", path=path, line=line)
            name = row[fi].strip()
            if not name:
                raise DataError("empty file name", path=path, line=line, field=FILENAME_COLUMN)
            rows.append((line, name, row[ti]))
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", path=path, line=reader.line_num) from e
    return rows, empty


def _split_files(source: Path) -> dict[str, list[str]]:
    siblings = sibling_split_files(source, source.suffix) or [("", source)]
    out: dict[str, list[str]] = {}
    for name, path in siblings:
        try:
            rows, _ = _rows(path)
        except DataError:
            if path == source:
                raise
            continue
        out.setdefault(name or "all", []).extend(n for _, n, _ in rows)
    return out


@register_format(
    "csv",
    detect=_detect,
    split_files=_split_files,
    priority=40,
    description="CSV with filename,title columns, one row per caption (GeoRSCLIP/RemoteCLIP)",
)
def read_csv(source: Path, split: str | None = None) -> RetrievalCorpus:
    """Read a CSV caption file.

    Args:
        source: the CSV file.
        split: the split name to give the corpus; defaults to the split named by the file
            (``rsitmd_test.csv`` → ``test``), else ``"all"``.

    Returns:
        The corpus, images in order of first appearance.

    Raises:
        DataError: if a column is missing, a row is short or has no file name, or the CSV is
            malformed (naming file and line).
    """
    rows, empty = _rows(source)
    builder = CorpusBuilder(source, split or split_from_stem(source) or "all", "csv")
    file = str(source)
    last_line = rows[-1][0] if rows else 0
    interior = [ln for ln in empty if ln < last_line]
    if interior:
        builder.warn(
            f"{source}: skipped {len(interior)} empty row(s) at line(s) " + ", ".join(map(str, interior[:10]))
        )
    for line, name, title in rows:
        idx = builder.image(name, name, {}, where=f"{file}:{line}", repeats="any")
        builder.caption(idx, title, file, line)
    return builder.build()
