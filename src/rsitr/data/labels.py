"""Scene labels of corpus images.

A scene comes from, in order of precedence:

1. an explicit ``labels.csv`` (columns ``filename,scene``);
2. the PIR/HarMA ``label_name`` field;
3. a dataset rule applied to the file name:

   * UC Merced (only when the dataset is UCM): ``N.tif`` → class ``(N - 1) // 100`` of
     :data:`UCM_CLASSES`;
   * otherwise (RSITMD, RSICD, ...): the stem prefix before the last ``_`` when that prefix is
     alphabetic (``storagetanks_4367.tif`` → ``storagetanks``; ``00001.jpg`` → none);
4. none.

The label map (scene → id) is built on the training split only, see
:meth:`RetrievalCorpus.label_map` and :meth:`RetrievalCorpus.scene_ids`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

from rsitr.data.corpus import ImageRecord, RetrievalCorpus
from rsitr.data.formats._text import read_lines
from rsitr.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "UCM_CLASSES",
    "assign_scenes",
    "infer_dataset",
    "read_labels_csv",
    "scene_from_filename",
]

#: The 21 UC Merced land-use classes in alphabetical order (UCM-Captions ``N.tif`` class order).
UCM_CLASSES: tuple[str, ...] = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)  # fmt: skip

#: Dataset names understood by :func:`assign_scenes` (``None`` = infer from the source path).
DATASETS: tuple[str, ...] = ("rsicd", "rsitmd", "sydney", "ucm", "other")

_UCM_NAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)
_PREFIX = re.compile(r"^([A-Za-z]+)_[^_]*$")


def _basename(filename: str) -> str:
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


def infer_dataset(source: str | Path) -> str | None:
    """Guess the dataset from the name of a caption source.

    The words of the source's own name are looked at, and for a file (a name with a suffix) also
    those of its parent directory: ``ucm_precomp``, ``UCM_captions/dataset.json`` → ``"ucm"``.

    Args:
        source: the caption file or directory.

    Returns:
        ``"ucm"``, ``"sydney"``, ``"rsitmd"`` or ``"rsicd"`` when a word starts with that name
        (``ucmerced`` counts as ``ucm``), else ``None``.
    """
    path = Path(source)
    names = [path.name, path.parent.name] if path.suffix else [path.name]
    words = [w for n in names for w in re.split(r"[^a-z0-9]+", n.lower()) if w]
    for name in ("rsitmd", "rsicd", "sydney", "ucm"):
        if any(w.startswith(name) for w in words):
            return name
    return None


def scene_from_filename(filename: str, dataset: str | None = None) -> str | None:
    """Apply the dataset naming rule to an image file name.

    Args:
        filename: the image name (a relative path is reduced to its basename).
        dataset: ``"ucm"`` enables the numeric UC Merced rule; any other value (or ``None``) the
            alphabetic-prefix rule.

    Returns:
        The scene name, or ``None`` when the rule gives none.
    """
    name = _basename(filename)
    if dataset == "ucm":
        m = _UCM_NAME.match(name)
        if m is None:
            return None
        n = int(m.group(1))
        return UCM_CLASSES[(n - 1) // 100] if 1 <= n <= 100 * len(UCM_CLASSES) else None
    if dataset == "sydney":
        return None  # numeric names, no class rule
    m = _PREFIX.match(name.rsplit(".", 1)[0] if "." in name else name)
    return m.group(1) if m else None


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """Read ``filename,scene`` rows.

    Args:
        path: the CSV file; the first line must be a header with ``filename`` and ``scene``.

    Returns:
        ``{filename: scene}``.

    Raises:
        DataError: naming file and line for a missing column, an empty field or a file name
            listed twice with different scenes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("labels file not found", path=path)
    lines = read_lines(path)
    if not lines:
        raise DataError("empty labels file", path=path)
    header = [c.strip().lower() for c in lines[0].split(",")]
    for col in ("filename", "scene"):
        if col not in header:
            raise DataError(f"missing column {col!r}", path=path, line=1, field=col)
    fi, si = header.index("filename"), header.index("scene")
    out: dict[str, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) <= max(fi, si) or not cells[fi] or not cells[si]:
            raise DataError("expected a file name and a scene", path=path, line=n)
        name, scene = cells[fi], cells[si]
        if out.get(name, scene) != scene:
            raise DataError(f"{name} is listed with scenes {out[name]!r} and {scene!r}", path=path, line=n)
        out[name] = scene
    return out


def assign_scenes(
    corpus: RetrievalCorpus,
    labels: str | Path | dict[str, str] | None = None,
    dataset: str | None = None,
) -> RetrievalCorpus:
    """Set ``scene`` (and ``meta["scene_source"]``) of every image by the precedence above.

    Args:
        corpus: the corpus; it is not modified.
        labels: a ``labels.csv`` path or an already read ``{filename: scene}`` map; names are
            matched as written, then by basename.
        dataset: one of :data:`DATASETS`; ``None`` infers it from ``corpus.source``.

    Returns:
        A new corpus with scenes set. If a labels file was given, images absent from it are
        reported in the corpus warnings.

    Raises:
        ConfigError: if ``dataset`` is unknown.
        DataError: if the labels file is invalid.
    """
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"dataset={dataset!r} is unknown; known: {', '.join(DATASETS)}")
    if dataset is None:
        dataset = infer_dataset(corpus.source)
    table = read_labels_csv(labels) if isinstance(labels, (str, Path)) else labels
    images: list[ImageRecord] = []
    unlisted = 0
    for im in corpus.images:
        scene, origin = None, None
        if table is not None:
            scene = table.get(im.filename) or table.get(_basename(im.filename))
            origin = "labels_csv" if scene else None
            unlisted += scene is None
        if scene is None and isinstance(im.meta.get("label_name"), str) and im.meta["label_name"]:
            scene, origin = im.meta["label_name"], "label_name"
        if scene is None:
            scene = scene_from_filename(im.filename, dataset)
            origin = f"rule:{'ucm' if dataset == 'ucm' else 'prefix'}" if scene else None
        meta = dict(im.meta)
        if origin is None:
            meta.pop("scene_source", None)
        else:
            meta["scene_source"] = origin
        images.append(replace(im, scene=scene, meta=meta))
    warnings = list(corpus.warnings)
    if unlisted:
        msg = (
            f"{corpus.source} [{corpus.split}]: {unlisted} image(s) not listed in the labels "
            "file; their scene falls back to label_name or the file-name rule"
        )
        logger.warning(msg)
        warnings.append(msg)
    return replace(corpus, images=images, warnings=warnings)
