"""Deterministic text views of captions, for cached text-side augmentation.

With frozen text towers the caption features are cached, so text augmentation is a *view*
computed once per caption, like the image views: ``identity`` or ``worddrop`` (each word
dropped with probability 0.15, seeded by the caption's index, at least three words kept and the
final full stop kept).
"""

from __future__ import annotations

import numpy as np

TEXT_VIEWS = ("identity", "worddrop")
WORDDROP_P = 0.15


def text_view(captions: list[str], view: str, offset: int = 0) -> list[str]:
    """The ``view`` of each caption; caption ``i`` uses the seed ``offset + i``.

    Raises:
        ValueError: for an unknown view.
    """
    if view == "identity":
        return list(captions)
    if view != "worddrop":
        raise ValueError(f"unknown text view {view!r}; known: {', '.join(TEXT_VIEWS)}")
    out = []
    for i, text in enumerate(captions):
        words = text.split()
        tail = [words.pop()] if words and words[-1] == "." else []
        if len(words) <= 3:
            out.append(text)
            continue
        keep = np.random.default_rng(offset + i).random(len(words)) >= WORDDROP_P
        if keep.sum() < 3:
            keep[:3] = True
        out.append(" ".join([w for w, k in zip(words, keep, strict=True) if k] + tail))
    return out
