"""Reading and writing score matrices (``.npy``, never pickled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsitr.errors import DataError
from rsitr.retrieval.metrics import validate_scores


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


def save_scores(path: str | Path, scores: np.ndarray) -> None:
    """Write a score matrix atomically as ``.npy``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(scores), allow_pickle=False)
    tmp.replace(path)
