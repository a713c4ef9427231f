"""Score matrices (``.npy``, never pickled) and ``rsitr embed`` archives: reading them with their
ground truth, and averaging several of one corpus (a score-level ensemble)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsitr.errors import ConfigError, DataError
from rsitr.retrieval.metrics import validate_scores
from rsitr.retrieval.relevance import Relevance


def load_scores(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Load and validate an (n_images, n_captions) score matrix from a ``.npy`` file.

    Args:
        path: the file. Object arrays (pickles) are refused.
        mmap: memory-map the file instead of reading it into memory.

    Raises:
        DataError: the file is missing, unreadable, not 2-D, not real-valued, or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path=path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read a .npy score matrix ({msg})", path=path) from None
    if isinstance(arr, np.lib.npyio.NpzFile):  # pragma: no cover - np.load of .npz
        raise DataError("expected a .npy file, got an .npz archive", path=path)
    validate_scores(arr, name=str(path))
    return arr


def load_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image_embeddings, text_embeddings, caption_to_image)`` of an ``rsitr embed`` archive,
    the embeddings as float64.

    Raises:
        DataError: the file is missing or unreadable, lacks one of the three arrays, or their
            shapes disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("image_embeddings", "text_embeddings", "caption_to_image") if k not in z]
            if missing:
                raise DataError(f"not an `rsitr embed` archive: no {missing[0]!r} array", path=path)
            img, txt, c2i = z["image_embeddings"], z["text_embeddings"], z["caption_to_image"]
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot read an .npz archive ({str(e).splitlines()[0]})", path=path) from None
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or len(c2i) != len(txt):
        raise DataError(
            f"inconsistent shapes: images {img.shape}, captions {txt.shape}, caption_to_image {c2i.shape}",
            path=path,
        )
    return img.astype(np.float64), txt.astype(np.float64), c2i.astype(np.int64)


def scores_from_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score matrix and ground truth of an ``rsitr embed`` archive (``.npz``, no pickle).

    Returns:
        ``(scores, caption_to_image)``: (n_images, n_captions) float64 ``image_embeddings @
        text_embeddingsᵀ`` and the (n_captions,) image of each caption.

    Raises:
        DataError: the file is missing or unreadable, or lacks one of the three arrays.
    """
    img, txt, c2i = load_embeddings(path)
    scores = img @ txt.T
    validate_scores(scores, name=str(path))
    return scores, c2i


def save_scores(path: str | Path, scores: np.ndarray) -> None:
    """Write a score matrix atomically as ``.npy``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(scores), allow_pickle=False)
    tmp.replace(path)


def relevance_for(scores_shape: tuple[int, int], cpi: int, path: str) -> Relevance:
    """The contiguous cpi-captions-per-image layout, checked against the matrix shape."""
    if cpi < 1:
        raise ConfigError(f"--captions-per-image must be >= 1, got {cpi}")
    n_img, n_cap = scores_shape
    if n_cap % cpi:
        raise DataError(f"{n_cap} columns are not divisible by --captions-per-image {cpi}", path=path)
    if n_cap != n_img * cpi:
        raise DataError(
            f"{n_cap} columns make {n_cap // cpi} images at {cpi} captions per image, "
            f"but the matrix has {n_img} rows",
            path=path,
        )
    return Relevance.from_captions_per_image(n_img, cpi)


def scores_and_relevance(path: Path, cpi: int, mmap: bool = True) -> tuple[np.ndarray, Relevance]:
    """A ``.npy`` score matrix (captions laid out ``cpi`` per image) or an ``rsitr embed`` ``.npz``
    (cosine scores; its ``caption_to_image`` is the ground truth and ``cpi`` is not used)."""
    if path.suffix == ".npz":
        scores, c2i = scores_from_embeddings(path)
        return scores, Relevance(c2i, scores.shape[0])
    scores = load_scores(path, mmap=mmap)
    return scores, relevance_for(scores.shape, cpi, str(path))


def ensemble_scores(paths: list[Path], cpi: int) -> tuple[np.ndarray, Relevance]:
    """The mean of several score matrices of the same corpus (a score-level ensemble, e.g. of
    seeds: S = (1/M) Σ_m S_m), with their common ground truth.

    Raises:
        DataError: a matrix whose shape or ground truth differs from the first one's (names it).
    """
    total, rel = scores_and_relevance(paths[0], cpi, mmap=False)
    total = np.array(total, dtype=np.float64)
    for path in paths[1:]:
        scores, other = scores_and_relevance(path, cpi)
        if scores.shape != total.shape or not np.array_equal(other.caption_to_image, rel.caption_to_image):
            raise DataError(
                f"cannot ensemble with {paths[0].name}: shape {scores.shape} against {total.shape}, "
                "or another ground truth (embed the same split of the same data)",
                path=path,
            )
        total += scores
    return total / len(paths), rel
