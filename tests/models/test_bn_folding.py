"""BatchNorm folding of frozen EfficientNet-Lite parts: same outputs, originals untouched, and
never used where a part trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rsitr.models.encoders.bn_folding import FoldedInference, fold_batchnorm
from rsitr.models.encoders.efficientnet import EfficientNetLiteEncoder


def _encoder(seed: int = 0) -> EfficientNetLiteEncoder:
    """A random Lite0 whose BatchNorms have non-trivial statistics (a fresh init's are 0 / 1)."""
    torch.manual_seed(seed)
    enc = EfficientNetLiteEncoder(pool="multi", pretrained=False)
    g = torch.Generator().manual_seed(seed)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return enc.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_folded_tower_matches_the_original_and_leaves_it_unchanged(images: torch.Tensor) -> None:
    enc = _encoder()
    m = enc.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded = fold_batchnorm(m.conv_stem, m.bn1, m.blocks, m.conv_head, m.bn2)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in folded.modules())  # all 49 folded
    with torch.no_grad():
        ref = m.bn2(m.conv_head(m.blocks(m.bn1(m.conv_stem(images)))))
        out = folded(images)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_encoder_runs_the_folded_copy_with_the_same_features(images: torch.Tensor) -> None:
    enc = _encoder()
    with torch.no_grad():
        ref = enc(images)  # not frozen: the original modules
    assert not enc.folded._copies
    enc.set_frozen(True)
    with torch.no_grad():
        out = enc(images)
    assert enc.folded._copies  # the frozen pass went through folded copies
    assert torch.allclose(out.pooled, ref.pooled, rtol=1e-4, atol=1e-4)
    for a, b in zip(out.maps, ref.maps, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_a_trainable_or_training_part_is_never_folded(images: torch.Tensor) -> None:
    enc = _encoder()
    fold = FoldedInference()
    m = enc.model
    assert fold(m.conv_head, m.bn2)[0] is m.conv_head  # trainable: the originals
    enc.set_frozen(True)
    assert fold(m.conv_head, m.bn2)[0] is not m.conv_head
    m.bn2.train()  # BatchNorm in training mode uses batch statistics: never folded
    assert fold(m.conv_head, m.bn2)[1] is m.bn2
    # gradients of a trainable tower reach its own parameters
    enc.set_frozen(False)
    enc.train()
    enc(images[:2]).pooled.sum().backward()
    assert m.conv_stem.weight.grad is not None and m.bn1.weight.grad is not None


def test_the_copy_follows_new_weights(images: torch.Tensor) -> None:
    enc = _encoder(0).set_frozen(True)
    other = _encoder(1)
    with torch.no_grad():
        first = enc(images).pooled
        enc.load_state_dict(other.state_dict())  # frozen weights replaced in place
        second = enc(images).pooled
        expected = other(images).pooled
    assert not torch.allclose(first, second)
    assert torch.allclose(second, expected, rtol=1e-4, atol=1e-4)
