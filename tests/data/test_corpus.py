"""RetrievalCorpus: validation, relations, blank-caption policy, subsets."""

from __future__ import annotations

import numpy as np
import pytest

from rsitr.data import ImageRecord, RetrievalCorpus
from rsitr.errors import DataError


def make_corpus(groups: list[list[str]], scenes: list[str | None] | None = None) -> RetrievalCorpus:
    images, captions, image_captions, origin = [], [], [], []
    for i, caps in enumerate(groups):
        images.append(ImageRecord(f"img_{i}.tif", scene=None if scenes is None else scenes[i]))
        image_captions.append(list(range(len(captions), len(captions) + len(caps))))
        for c in caps:
            captions.append(c)
            origin.append(("caps.txt", len(captions)))
    return RetrievalCorpus(images, captions, image_captions, "train", "toy", origin, "precomp")


def test_relations_and_counts() -> None:
    c = make_corpus([["a", "b"], [], ["c"]])
    assert (c.num_images, c.num_captions) == (3, 3)
    ids = c.caption_to_image()
    assert ids.dtype == np.int64 and ids.tolist() == [0, 0, 2]


def test_caption_text_ids_match_word_for_word_duplicates() -> None:
    c = make_corpus([["Many  buildings.", "a road"], ["many buildings", "a river"], ["A road ."]])
    ids = c.caption_text_ids()
    assert ids.dtype == np.int64
    assert ids[0] == ids[2] and ids[1] == ids[4]  # case, spacing and the full stop do not matter
    assert len(set(ids.tolist())) == 3


def test_validation_rejects_inconsistent_indices() -> None:
    with pytest.raises(DataError, match=r"toy \[image_captions\]: image_captions must assign every caption"):
        RetrievalCorpus(
            [ImageRecord("a"), ImageRecord("b")], ["x", "y"], [[0], [0]], "t", "toy", [("f", 1)] * 2
        )
    with pytest.raises(DataError, match="caption origins"):
        RetrievalCorpus([ImageRecord("a")], ["x"], [[0]], "t", "toy", [])


def test_drop_blank_captions_train_drops_emptied_images() -> None:
    c = make_corpus([["a", " ", "b"], ["", "\t"], ["c"]])
    assert [(b.caption_index, b.image, b.line) for b in c.blank_captions] == [
        (1, "img_0.tif", 2), (3, "img_1.tif", 4), (4, "img_1.tif", 5)
    ]  # fmt: skip
    new, warnings = c.drop_blank_captions("train")
    assert new.filenames() == ["img_0.tif", "img_2.tif"]
    assert new.captions == ["a", "b", "c"]
    assert new.image_captions == [[0, 1], [2]]
    assert new.caption_origin == [("caps.txt", 1), ("caps.txt", 3), ("caps.txt", 6)]
    assert len(warnings) == 2 and "caps.txt:2" in warnings[0] and "img_1.tif" in warnings[1]
    assert new.warnings[-2:] == warnings
    assert c.num_captions == 6  # the original is untouched


def test_drop_blank_captions_eval_keeps_every_image() -> None:
    c = make_corpus([["a", " "], [""], ["c"]])
    new, warnings = c.drop_blank_captions("eval")
    assert new.filenames() == c.filenames()
    assert new.image_captions == [[0], [], [1]]
    assert "excluded from text-to-image queries" in warnings[0]
    assert "gallery-only" in warnings[1]


def test_drop_blank_captions_without_blanks_and_bad_mode() -> None:
    c = make_corpus([["a"]])
    new, warnings = c.drop_blank_captions("train")
    assert warnings == [] and new.captions == ["a"] and new is not c
    with pytest.raises(ValueError, match="mode='test'"):
        c.drop_blank_captions("test")  # type: ignore[arg-type]


def test_subset_renumbers_captions_in_new_order() -> None:
    c = make_corpus([["a"], ["b", "c"], ["d"]], scenes=["x", "y", None])
    s = c.subset([2, 1])
    assert s.filenames() == ["img_2.tif", "img_1.tif"]
    assert s.captions == ["d", "b", "c"] and s.image_captions == [[0], [1, 2]]
    assert s.caption_origin[0] == ("caps.txt", 4)
    with pytest.raises(ValueError, match="duplicates"):
        c.subset([0, 0])
    with pytest.raises(ValueError, match="out of range"):
        c.subset([3])


def test_label_map_sorted_and_scene_ids() -> None:
    c = make_corpus([["a"], ["b"], ["c"]], scenes=["river", None, "beach"])
    assert c.label_map() == {"beach": 0, "river": 1}
    assert c.scene_ids().tolist() == [1, -1, 0]
