"""Image → captions ground truth for a score matrix ``S`` (n_images × n_captions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rsitr.errors import DataError


@dataclass(frozen=True)
class Relevance:
    """Which captions (columns of ``S``) describe which image (rows of ``S``).

    Every caption belongs to exactly one image; an image may have any number of captions,
    including none (it is then a candidate for t2i but not an i2t query).

    Attributes:
        caption_to_image: (n_captions,) int64, the image of each caption.
        num_images: number of images (rows).
    """

    caption_to_image: np.ndarray
    num_images: int
    _order: np.ndarray = field(init=False, repr=False)
    _counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        c2i = np.asarray(self.caption_to_image, dtype=np.int64)
        if c2i.ndim != 1:
            raise DataError("caption_to_image must be 1-D", field="caption_to_image")
        if c2i.size and (c2i.min() < 0 or c2i.max() >= self.num_images):
            raise DataError(
                f"caption_to_image values must lie in [0, {self.num_images})",
                field="caption_to_image",
            )
        object.__setattr__(self, "caption_to_image", c2i)
        # Captions grouped by image (stable), for segment reductions over each image's captions.
        object.__setattr__(self, "_order", np.argsort(c2i, kind="stable"))
        object.__setattr__(self, "_counts", np.bincount(c2i, minlength=self.num_images))

    @classmethod
    def from_captions_per_image(cls, num_images: int, captions_per_image: int) -> Relevance:
        """Convenience layout: captions of image i are columns cpi·i … cpi·i + cpi − 1."""
        if captions_per_image < 1:
            raise DataError("captions_per_image must be >= 1", field="captions_per_image")
        return cls(np.repeat(np.arange(num_images), captions_per_image), num_images)

    @classmethod
    def from_image_captions(
        cls, image_captions: Sequence[Sequence[int]], num_captions: int | None = None
    ) -> Relevance:
        """Build from image → caption-index lists (any number of captions per image)."""
        n_cap = num_captions if num_captions is not None else sum(len(c) for c in image_captions)
        c2i = np.full(n_cap, -1, dtype=np.int64)
        for i, caps in enumerate(image_captions):
            idx = np.asarray(caps, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n_cap):
                raise DataError(f"image {i}: caption index out of range", field="image_captions")
            if (c2i[idx] != -1).any():
                raise DataError(f"image {i}: a caption is assigned to two images", field="image_captions")
            c2i[idx] = i
        if (c2i == -1).any():
            j = int(np.flatnonzero(c2i == -1)[0])
            raise DataError(f"caption {j} belongs to no image", field="image_captions")
        return cls(c2i, len(image_captions))

    @property
    def num_captions(self) -> int:
        """Number of captions (columns)."""
        return int(self.caption_to_image.size)

    @property
    def captions_per_image(self) -> np.ndarray:
        """(n_images,) number of captions of each image."""
        return self._counts

    @property
    def query_images(self) -> np.ndarray:
        """Images that have at least one caption: the i2t queries."""
        return np.flatnonzero(self._counts > 0)

    def grouped(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Captions grouped by image.

        Returns:
            ``(images, columns, starts)``: the query images, the caption columns sorted by image,
            and the start offset of each query image's group in ``columns`` (for ``reduceat``).
        """
        images = self.query_images
        starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])[images]
        return images, self._order, starts
