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
    # image 0 has two violating negative captions (0.40 and 0.45 against its 0.50), so the
    # hardest (max) and all (sum) modes must differ
    sim = torch.tensor([[0.50, 0.40, 0.45], [0.30, 0.60, 0.10], [0.20, 0.50, 0.70]])
    pos = torch.eye(3, dtype=torch.bool)
    m = 0.2
    # pair 0: captions of image 0: [.2-.5+.4]+ = .10, [.2-.5+.45]+ = .15; images of caption 0: 0, 0
    # pair 1: captions of image 1: 0, 0; images of caption 1: [.2-.6+.4]+ = 0, [.2-.6+.5]+ = .10
    # pair 2: nothing violates
    hardest = (0.15 + 0.10) / 3
    total = (0.10 + 0.15 + 0.10) / 3
    assert torch.isclose(hinge_triplet(sim, pos, m, "hardest"), torch.tensor(hardest), atol=1e-6)
    assert torch.isclose(hinge_triplet(sim, pos, m, "all"), torch.tensor(total), atol=1e-6)
    pos2 = positives_from_ids(torch.tensor([0, 0, 1]))  # captions 0 and 1 share an image
    assert hinge_triplet(sim, pos2, m, "all") < hinge_triplet(sim, pos, m, "all")
