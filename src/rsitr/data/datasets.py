"""PyTorch datasets over a :class:`RetrievalCorpus`.

* :class:`CaptionPairDataset` — one item per caption, for training.
* :class:`ImageDataset` and :class:`CaptionDataset` — one item per image / caption, for
  embedding a corpus at evaluation time.

Unreadable images never crash an epoch under ``on_error="skip"`` (the default): the item comes
back with ``failed=True``, ``image=None`` and the reason in ``error``, and
:func:`collate_skip_failed` drops such items from the batch and logs each one. No other image is
substituted, so ids in a batch always match their images. With ``on_error="fail"`` the
:class:`~rsitr.errors.DataError` propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rsitr.data.corpus import RetrievalCorpus
from rsitr.data.images import DEFAULT_MAX_SIDE, ImageFailure, ImageLoader, OnError
from rsitr.data.transforms import to_tensor
from rsitr.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["CaptionDataset", "CaptionPairDataset", "ImageDataset", "collate_skip_failed"]

Transform = Callable[[Image.Image], torch.Tensor]
Item = dict[str, Any]


def _require_paths(corpus: RetrievalCorpus) -> None:
    missing = [im.filename for im in corpus.images if im.path is None]
    if missing:
        raise ConfigError(
            f"{corpus.source}: {len(missing)} image(s) have no path (first: {missing[0]}); "
            "pass images=<image root> to load_corpus"
        )


class _ImageSource:
    """Loads corpus images through an :class:`ImageLoader` and a transform."""

    def __init__(
        self,
        corpus: RetrievalCorpus,
        transform: Transform | None,
        on_error: OnError,
        max_side: int | None,
        bands: Sequence[int] | None,
    ) -> None:
        _require_paths(corpus)
        self.corpus = corpus
        self.transform = transform
        self.loader = ImageLoader(on_error=on_error, max_side=max_side, bands=bands)

    def load(self, image_index: int) -> Item:
        path = self.corpus.images[image_index].path
        assert path is not None  # checked in __init__
        image = self.loader(path)
        if image is None:
            error = self.loader.failures[-1].error
            return {"image": None, "path": str(path), "failed": True, "error": error}
        x = self.transform(image) if self.transform is not None else to_tensor(image)
        return {"image": x, "path": str(path), "failed": False, "error": ""}


class CaptionPairDataset(Dataset):
    """Training pairs: one item per (non-blank) caption with its image.

    Blank captions are removed first by ``corpus.drop_blank_captions("train")`` (which also
    drops images left without captions); the messages are logged and kept in :attr:`warnings`.
    Ids in the items refer to :attr:`corpus`, the cleaned corpus.

    Items are dicts: ``image`` (transformed tensor, or ``None`` if it failed), ``caption``
    (str), ``image_id``, ``caption_id``, ``scene`` (id, ``-1`` if unknown), ``path``, ``failed``
    (bool) and ``error`` (str).

    Args:
        corpus: a training corpus whose images have paths.
        transform: PIL image → tensor (e.g. :class:`~rsitr.data.transforms.TrainTransform`);
            default :func:`~rsitr.data.transforms.to_tensor`.
        label_map: scene → id; default the corpus's own :meth:`RetrievalCorpus.label_map`.
        on_error: ``"skip"`` (flag the item) or ``"fail"`` (raise) for unreadable images.
        max_side: longest image side after loading.
        bands: band indices for multi-band images.

    Raises:
        ConfigError: if an image has no path or ``on_error`` is invalid.
    """

    def __init__(
        self,
        corpus: RetrievalCorpus,
        transform: Transform | None = None,
        label_map: dict[str, int] | None = None,
        on_error: OnError = "skip",
        max_side: int | None = DEFAULT_MAX_SIDE,
        bands: Sequence[int] | None = None,
    ) -> None:
        self.corpus, self.warnings = corpus.drop_blank_captions("train")
        self._images = _ImageSource(self.corpus, transform, on_error, max_side, bands)
        self.caption_to_image = self.corpus.caption_to_image()
        self.label_map = self.corpus.label_map() if label_map is None else dict(label_map)
        self.scenes = self.corpus.scene_ids(self.label_map)

    @property
    def failures(self) -> list[ImageFailure]:
        """Images that failed to load in this process (see :class:`ImageLoader`)."""
        return self._images.loader.failures

    def __len__(self) -> int:
        return self.corpus.num_captions

    def __getitem__(self, index: int) -> Item:
        i = int(self.caption_to_image[index])
        item = self._images.load(i)
        item.update(
            caption=self.corpus.captions[index],
            image_id=i,
            caption_id=int(index),
            scene=int(self.scenes[i]),
        )
        return item


class ImageDataset(Dataset):
    """Evaluation images: one item per image of the corpus.

    Items are dicts: ``image``, ``image_id``, ``scene``, ``path``, ``failed``, ``error``. Keep
    ``image_id`` from the batch to place embeddings, since failed items are dropped by
    :func:`collate_skip_failed`.

    Args:
        corpus: an evaluation corpus whose images have paths.
        transform: PIL image → tensor (e.g. :class:`~rsitr.data.transforms.EvalTransform`).
        label_map: scene → id built on the training split; default the corpus's own.
        on_error: ``"skip"`` or ``"fail"`` for unreadable images.
        max_side: longest image side after loading.
        bands: band indices for multi-band images.

    Raises:
        ConfigError: if an image has no path or ``on_error`` is invalid.
    """

    def __init__(
        self,
        corpus: RetrievalCorpus,
        transform: Transform | None = None,
        label_map: dict[str, int] | None = None,
        on_error: OnError = "skip",
        max_side: int | None = DEFAULT_MAX_SIDE,
        bands: Sequence[int] | None = None,
    ) -> None:
        self.corpus = corpus
        self._images = _ImageSource(corpus, transform, on_error, max_side, bands)
        self.scenes = corpus.scene_ids(label_map)

    @property
    def failures(self) -> list[ImageFailure]:
        """Images that failed to load in this process."""
        return self._images.loader.failures

    def __len__(self) -> int:
        return self.corpus.num_images

    def __getitem__(self, index: int) -> Item:
        item = self._images.load(int(index))
        item.update(image_id=int(index), scene=int(self.scenes[index]))
        return item


class CaptionDataset(Dataset):
    """Evaluation captions: one item per caption, ``{caption, caption_id, image_id}``.

    Args:
        corpus: an evaluation corpus without blank captions; apply
            ``corpus.drop_blank_captions("eval")`` first, which keeps every image.

    Raises:
        DataError: if the corpus has a blank caption (naming its file and line).
    """

    def __init__(self, corpus: RetrievalCorpus) -> None:
        blanks = corpus.blank_captions
        if blanks:
            b = blanks[0]
            raise DataError(
                f"blank caption of {b.image} ({len(blanks)} in all); call "
                "corpus.drop_blank_captions('eval') before building evaluation datasets",
                path=b.file,
                line=b.line,
            )
        self.corpus = corpus
        self.caption_to_image = corpus.caption_to_image()

    def __len__(self) -> int:
        return self.corpus.num_captions

    def __getitem__(self, index: int) -> Item:
        return {
            "caption": self.corpus.captions[index],
            "caption_id": int(index),
            "image_id": int(self.caption_to_image[index]),
        }


def collate_skip_failed(batch: list[Item]) -> Item | None:
    """Collate dict items, dropping (and logging) items whose image failed to load.

    Tensors are stacked, ints become ``int64`` tensors, everything else becomes a list; the
    ``failed`` and ``error`` keys are removed and ``num_dropped`` is added.

    Args:
        batch: items from one of the datasets of this module.

    Returns:
        The batch dict, or ``None`` when every item failed (skip that step).
    """
    ok = [b for b in batch if not b.get("failed", False)]
    for b in batch:
        if b.get("failed", False):
            logger.warning("dropped item (image %s): %s", b.get("image_id"), b.get("error"))
    if not ok:
        return None
    out: Item = {}
    for key in ok[0]:
        if key in ("failed", "error"):
            continue
        values = [b[key] for b in ok]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    out["num_dropped"] = len(batch) - len(ok)
    return out
