"""The in-memory retrieval corpus: images, captions and which caption belongs to which image.

Every caption format reader returns a :class:`RetrievalCorpus`. The corpus keeps, for each
caption, where it came from (file and 1-based line, or 1-based record index for JSON formats) so
that later errors and reports can point at the source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rsitr.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["BlankCaption", "ImageRecord", "RetrievalCorpus"]


@dataclass
class ImageRecord:
    """One image of a corpus.

    Attributes:
        filename: the image name exactly as written in the source (for PIR records the basename of
            the ``image`` path; the full relative path is kept in ``meta["relpath"]``).
        path: the image file resolved against an image root, or ``None`` when no root was given.
        scene: the scene class name, or ``None`` when unknown.
        meta: format-specific extras (``split``, ``relpath``, ``imgid``, ``scene_source``, ...).
    """

    filename: str
    path: Path | None = None
    scene: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BlankCaption:
    """A caption that is empty or whitespace only.

    Attributes:
        caption_index: index into :attr:`RetrievalCorpus.captions`.
        image_index: index of the owning image in :attr:`RetrievalCorpus.images`.
        file: the source file of the caption.
        line: 1-based line (text formats) or record index (JSON formats) in ``file``.
        image: the owning image's file name.
    """

    caption_index: int
    image_index: int
    file: str
    line: int
    image: str


def normalise_caption(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: the 'word for word' comparison key."""
    return " ".join(text.lower().split()).rstrip(" .")


@dataclass
class RetrievalCorpus:
    """Images and captions of one split, with the image → captions relation.

    Attributes:
        images: the images, in source order.
        captions: every caption string, blank ones included (see :meth:`drop_blank_captions`).
        image_captions: for each image, the indices of its captions (any number, possibly none).
        split: split name (``"train"``, ``"test"``, ...; ``"all"`` when a source was read whole).
        source: the file or directory the corpus was read from.
        caption_origin: for each caption, ``(file, n)`` with ``n`` the 1-based line of a text
            format or the 1-based record index of a JSON format.
        fmt: name of the format reader that produced the corpus.
        warnings: messages about anything the reader or a later step changed or could not
            resolve; never silently dropped.

    Raises:
        DataError: if the caption indices do not partition ``range(len(captions))`` or the
            lengths of ``captions`` and ``caption_origin`` differ.
    """

    images: list[ImageRecord]
    captions: list[str]
    image_captions: list[list[int]]
    split: str
    source: str
    caption_origin: list[tuple[str, int]]
    fmt: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.image_captions) != len(self.images):
            raise DataError(
                f"{len(self.image_captions)} caption groups for {len(self.images)} images",
                path=self.source,
                field="image_captions",
            )
        if len(self.caption_origin) != len(self.captions):
            raise DataError(
                f"{len(self.caption_origin)} caption origins for {len(self.captions)} captions",
                path=self.source,
                field="caption_origin",
            )
        flat = np.fromiter(
            (c for caps in self.image_captions for c in caps),
            dtype=np.int64,
            count=sum(len(caps) for caps in self.image_captions),
        )
        if not np.array_equal(np.sort(flat), np.arange(len(self.captions))):
            raise DataError(
                "image_captions must assign every caption index to exactly one image",
                path=self.source,
                field="image_captions",
            )

    # -- sizes and relations ------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        """Number of images."""
        return len(self.images)

    @property
    def num_captions(self) -> int:
        """Number of captions, blank ones included."""
        return len(self.captions)

    def caption_to_image(self) -> np.ndarray:
        """Return the owning image index of every caption.

        Returns:
            An ``int64`` array of shape ``(num_captions,)``.
        """
        lengths = np.fromiter((len(c) for c in self.image_captions), np.int64, len(self.images))
        flat = np.fromiter((c for caps in self.image_captions for c in caps), np.int64, int(lengths.sum()))
        out = np.empty(len(self.captions), dtype=np.int64)
        out[flat] = np.repeat(np.arange(len(self.images), dtype=np.int64), lengths)
        return out

    def caption_text_ids(self) -> np.ndarray:
        """Return, for every caption, the id of its normalised text (lower case, single spaces,
        no trailing full stop): captions with equal ids say the same thing word for word.

        RSICD repeats captions between images (13,594 distinct texts among its 43,675 training
        captions), so this is what ``data.duplicate_captions: positive`` uses.

        Returns:
            An ``int64`` array of shape ``(num_captions,)``.
        """
        norm = [normalise_caption(c) for c in self.captions]
        _, ids = np.unique(np.asarray(norm, dtype=object), return_inverse=True)
        return ids.astype(np.int64)

    def filenames(self) -> list[str]:
        """Return the file name of every image, in order."""
        return [im.filename for im in self.images]

    # -- blank captions -----------------------------------------------------------------------

    @property
    def blank_captions(self) -> list[BlankCaption]:
        """Captions that are empty or whitespace only, in caption order."""
        owner = self.caption_to_image()
        out = []
        for c, text in enumerate(self.captions):
            if not text.strip():
                file, line = self.caption_origin[c]
                i = int(owner[c])
                out.append(BlankCaption(c, i, file, line, self.images[i].filename))
        return out

    def drop_blank_captions(
        self, mode: Literal["train", "eval"] = "train"
    ) -> tuple[RetrievalCorpus, list[str]]:
        """Remove blank captions, following the toolkit's blank-caption policy.

        Training (``mode="train"``) drops every blank caption and then every image left without
        captions. Evaluation (``mode="eval"``) drops blank captions too, so they are never
        text-to-image queries, but keeps every image: an image left without captions stays in the
        gallery and has no image-to-text ground truth. Nothing is removed silently: each change is
        described in the returned warnings (and logged), and also appended to the new corpus's
        ``warnings``.

        Args:
            mode: ``"train"`` or ``"eval"``.

        Returns:
            The new corpus (``self`` is not modified) and the list of warning messages; the list
            is empty and the corpus an equal copy when there was nothing blank.

        Raises:
            ValueError: if ``mode`` is not ``"train"`` or ``"eval"``.
        """
        if mode not in ("train", "eval"):
            raise ValueError(f"mode={mode!r}: expected 'train' or 'eval'")
        blanks = self.blank_captions
        if not blanks:
            return replace(self, warnings=list(self.warnings)), []
        blank_set = {b.caption_index for b in blanks}
        groups = [[c for c in caps if c not in blank_set] for caps in self.image_captions]
        keep_images = [i for i, g in enumerate(groups) if g or mode == "eval"]
        emptied = [self.images[i].filename for i, g in enumerate(groups) if not g]
        where = ", ".join(f"{b.file}:{b.line}" for b in blanks[:5])
        more = f" (+{len(blanks) - 5} more)" if len(blanks) > 5 else ""
        messages = [
            f"{self.source} [{self.split}]: dropped {len(blanks)} blank caption(s) "
            f"at {where}{more}" + (" (excluded from text-to-image queries)" if mode == "eval" else "")
        ]
        if emptied:
            names = ", ".join(emptied[:10]) + (" ..." if len(emptied) > 10 else "")
            if mode == "train":
                messages.append(
                    f"{self.source} [{self.split}]: dropped {len(emptied)} image(s) left "
                    f"without captions: {names}"
                )
            else:
                messages.append(
                    f"{self.source} [{self.split}]: kept {len(emptied)} image(s) without "
                    f"captions as gallery-only (no image-to-text ground truth): {names}"
                )
        for m in messages:
            logger.warning(m)
        new = _select(self, keep_images, groups)
        new.warnings.extend(messages)
        return new, messages

    # -- scenes -------------------------------------------------------------------------------

    def label_map(self) -> dict[str, int]:
        """Map each scene name of this corpus to an id (sorted names, ids from 0).

        Build the map on the training split and pass it to :meth:`scene_ids` of other splits.

        Returns:
            ``{scene: id}``; empty when no image has a scene.
        """
        names = sorted({im.scene for im in self.images if im.scene is not None})
        return {name: i for i, name in enumerate(names)}

    def scene_ids(self, label_map: dict[str, int] | None = None) -> np.ndarray:
        """Return the scene id of every image, ``-1`` where unknown.

        Args:
            label_map: the map built on the training split; defaults to this corpus's own
                :meth:`label_map`. Scenes absent from it become ``-1`` with a logged warning.

        Returns:
            An ``int64`` array of shape ``(num_images,)``.
        """
        if label_map is None:
            label_map = self.label_map()
        ids = np.full(len(self.images), -1, dtype=np.int64)
        unknown: dict[str, int] = {}
        for i, im in enumerate(self.images):
            if im.scene is None:
                continue
            sid = label_map.get(im.scene)
            if sid is None:
                unknown[im.scene] = unknown.get(im.scene, 0) + 1
            else:
                ids[i] = sid
        if unknown:
            listed = ", ".join(f"{k} ({v})" for k, v in sorted(unknown.items()))
            logger.warning(
                "%s [%s]: scenes not in the training label map, set to unknown: %s",
                self.source,
                self.split,
                listed,
            )
        return ids

    # -- selection ----------------------------------------------------------------------------

    def subset(self, image_indices: list[int] | np.ndarray) -> RetrievalCorpus:
        """Return a corpus with only the given images (in the given order) and their captions.

        Args:
            image_indices: indices into :attr:`images`; duplicates are not allowed.

        Returns:
            A new corpus; captions are renumbered in the new image order, origins are kept.

        Raises:
            ValueError: if an index is out of range or repeated.
        """
        idx = [int(i) for i in np.asarray(image_indices, dtype=np.int64).reshape(-1)]
        if len(set(idx)) != len(idx):
            raise ValueError("subset: image_indices contains duplicates")
        bad = [i for i in idx if not 0 <= i < len(self.images)]
        if bad:
            raise ValueError(f"subset: image index {bad[0]} out of range 0..{len(self.images) - 1}")
        return _select(self, idx, self.image_captions)


def _select(corpus: RetrievalCorpus, image_indices: list[int], groups: list[list[int]]) -> RetrievalCorpus:
    """Build a corpus of ``image_indices`` whose captions are ``groups[i]`` (old indices)."""
    images, captions, origin, new_groups = [], [], [], []
    for i in image_indices:
        im = corpus.images[i]
        images.append(replace(im, meta=dict(im.meta)))
        start = len(captions)
        for c in groups[i]:
            captions.append(corpus.captions[c])
            origin.append(corpus.caption_origin[c])
        new_groups.append(list(range(start, len(captions))))
    return RetrievalCorpus(
        images=images,
        captions=captions,
        image_captions=new_groups,
        split=corpus.split,
        source=corpus.source,
        caption_origin=origin,
        fmt=corpus.fmt,
        warnings=list(corpus.warnings),
    )
