"""The "precomp" text format of AMFMN/GaLR/PE-RSITR: ``{split}_caps.txt`` + ``{split}_filename.txt``.

``{split}_caps.txt`` has one caption per line, image-major. ``{split}_filename.txt`` has either one
line per image (the captions file then has a whole multiple of its lines, e.g. 5 per image) or one
line per caption (equal line counts; consecutive identical names form one image). A blank line
inside the captions file is a blank caption; blank lines at the end of the file are ignored when
the line counts only match without them.
"""

from __future__ import annotations

from pathlib import Path

from rsitr.data.corpus import RetrievalCorpus
from rsitr.data.formats._builder import CorpusBuilder
from rsitr.data.formats._registry import register_format
from rsitr.data.formats._text import read_lines, trailing_blank_count
from rsitr.errors import ConfigError, DataError

CAPS_SUFFIX = "_caps.txt"
FILENAME_SUFFIX = "_filename.txt"


def available_splits(directory: Path) -> list[str]:
    """Splits with both a captions and a file-name file in ``directory``, sorted."""
    if not directory.is_dir():
        return []
    out = []
    for p in directory.glob(f"*{CAPS_SUFFIX}"):
        split = p.name[: -len(CAPS_SUFFIX)]
        if (directory / f"{split}{FILENAME_SUFFIX}").is_file():
            out.append(split)
    return sorted(out)


def _locate(source: Path, split: str | None) -> tuple[Path, str]:
    """Resolve ``source`` (directory or ``*_caps.txt``) and ``split`` to ``(directory, split)``."""
    if source.is_file():
        if not source.name.endswith(CAPS_SUFFIX):
            raise DataError(f"expected a directory or a '*{CAPS_SUFFIX}' file", path=source)
        own = source.name[: -len(CAPS_SUFFIX)]
        if split is not None and split != own:
            raise ConfigError(f"split={split!r} conflicts with the file {source.name}")
        return source.parent, own
    splits = available_splits(source)
    if split is None:
        if len(splits) != 1:
            raise ConfigError(
                f"{source}: precomp directory has splits {', '.join(splits) or '(none)'}; "
                "choose one (split= or --split)"
            )
        return source, splits[0]
    if split not in splits:
        raise DataError(
            f"no {split}{CAPS_SUFFIX} with {split}{FILENAME_SUFFIX}; splits here: "
            f"{', '.join(splits) or '(none)'}",
            path=source,
        )
    return source, split


def _detect(source: Path, split: str | None) -> bool:
    if source.is_file():
        return source.name.endswith(CAPS_SUFFIX)
    if split is not None:
        return (source / f"{split}{CAPS_SUFFIX}").is_file()
    return bool(available_splits(source))


def _read_filenames(path: Path) -> list[str]:
    lines = read_lines(path)
    del lines[len(lines) - trailing_blank_count(lines) :]
    names = [ln.strip() for ln in lines]
    for i, name in enumerate(names):
        if not name:
            raise DataError("blank file name", path=path, line=i + 1)
    if not names:
        raise DataError("no file names", path=path)
    return names


def _split_files(source: Path) -> dict[str, list[str]]:
    directory = source.parent if source.is_file() else source
    return {s: _read_filenames(directory / f"{s}{FILENAME_SUFFIX}") for s in available_splits(directory)}


@register_format(
    "precomp",
    detect=_detect,
    split_files=_split_files,
    priority=10,
    description="directory with {split}_caps.txt and {split}_filename.txt (AMFMN/GaLR)",
)
def read_precomp(source: Path, split: str | None = None) -> RetrievalCorpus:
    """Read one split of a precomp directory.

    Args:
        source: the directory, or its ``{split}_caps.txt``.
        split: the split; may be omitted when the directory has only one.

    Returns:
        The corpus; ``caption_origin`` holds 1-based lines of ``{split}_caps.txt``.

    Raises:
        DataError: if a file is missing or unreadable, a file name is blank, or the line counts
            match neither layout.
        ConfigError: if ``split`` is needed and missing.
    """
    directory, split = _locate(source, split)
    caps_path = directory / f"{split}{CAPS_SUFFIX}"
    names_path = directory / f"{split}{FILENAME_SUFFIX}"
    names = _read_filenames(names_path)
    caps = read_lines(caps_path)
    n_f = len(names)

    def fits(n: int) -> bool:
        return n > 0 and n % n_f == 0

    builder = CorpusBuilder(directory, split, "precomp")
    trailing = trailing_blank_count(caps)
    if trailing and not fits(len(caps)) and fits(len(caps) - trailing):
        builder.warn(
            f"{caps_path}: ignored {trailing} blank line(s) at the end of the file "
            f"(lines {len(caps) - trailing + 1}-{len(caps)})"
        )
        del caps[len(caps) - trailing :]
    n_c = len(caps)
    if not fits(n_c):
        raise DataError(
            f"{n_c} caption lines do not match {n_f} lines of {names_path.name} "
            "(expected an equal count or a whole multiple)",
            path=caps_path,
        )
    file = str(caps_path)
    if n_c == n_f:  # one file-name line per caption
        for j, name in enumerate(names):
            idx = builder.image(name, name, {"split": split}, where=f"{names_path}:{j + 1}")
            builder.caption(idx, caps[j], file, j + 1)
    else:  # one file-name line per image, k captions each
        k = n_c // n_f
        for i, name in enumerate(names):
            idx = builder.image(name, name, {"split": split}, where=f"{names_path}:{i + 1}", repeats="none")
            for j in range(i * k, (i + 1) * k):
                builder.caption(idx, caps[j], file, j + 1)
    return builder.build()
