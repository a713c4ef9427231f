"""Losses: multi-positive InfoNCE and the VSE++ triplet against direct definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.losses import hinge_triplet, multi_positive_infonce, positives_from_ids
from rsitr.losses.contrastive import batch_positives


def test_infonce_equals_clip_loss_with_unique_ids() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 6)
    pos = positives_from_ids(torch.arange(6))
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert torch.allclose(multi_positive_infonce(logits, pos), ref)


def test_duplicate_images_are_positives_not_negatives() -> None:
    # Captions 0 and 1 describe the same image: raising their cross score must not raise the loss.
    ids = torch.tensor([0, 0, 1])
    pos = positives_from_ids(ids)
    base = torch.eye(3) * 5
    more = base.clone()
    more[0, 1] = more[1, 0] = 5.0
    assert multi_positive_infonce(more, pos) < multi_positive_infonce(base, pos)


def test_batch_positives_add_duplicate_captions_only_when_asked() -> None:
    # Pairs 0 and 2 are different images whose captions are word for word the same text.
    batch = {"image_id": torch.tensor([0, 0, 1, 2]), "text_id": torch.tensor([5, 6, 5, 7])}
    with_text = batch_positives(batch)
    assert with_text[0, 2] and with_text[2, 0] and with_text[0, 1] and not with_text[0, 3]
    only_image = batch_positives({"image_id": batch["image_id"]})
    assert not only_image[0, 2] and only_image[0, 1]
    assert torch.equal(batch_positives(batch, lambda x: x.flip(0)), with_text.flip(0, 1))


def test_triplet_hardest_and_all() -> None:
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.0, 0.1, 0.7]])
    pos = torch.eye(3, dtype=torch.bool)
    m = 0.2
    # pair 0: txt negatives of image 0: 0.5, 0.1 → [0.2-0.9+0.5]+ = 0 ; img negatives of caption 0: 0.8 → 0.1
    # pair 1: txt negs of image 1: 0.8 → 0.4, 0.2 → 0 ; img negs of caption 1: 0.5 → 0.1, 0.1 → 0
    # pair 2: txt negs: 0.0, 0.1 → 0 ; img negs of caption 2: 0.1, 0.2 → 0
    hardest = (0.1 + 0.4 + 0.1) / 3
    assert torch.isclose(hinge_triplet(sim, pos, m, "hardest"), torch.tensor(hardest))
    assert torch.isclose(hinge_triplet(sim, pos, m, "all"), torch.tensor(hardest))
    pos2 = positives_from_ids(torch.tensor([0, 0, 1]))  # captions 0 and 1 share an image
    assert hinge_triplet(sim, pos2, m, "all") < hinge_triplet(sim, pos, m, "all")
