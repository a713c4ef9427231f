"""Tensor transforms: shapes, determinism, augmentation ranges, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rsitr.data import EvalTransform, TrainTransform, to_tensor

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def image(h: int = 40, w: int = 60) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_to_tensor_from_pil_and_array() -> None:
    a = image()
    t = to_tensor(a)
    assert t.shape == (3, 40, 60) and t.dtype == torch.float32
    assert torch.equal(t, to_tensor(Image.fromarray(a)))
    assert t[1, 2, 3].item() == pytest.approx(a[2, 3, 1] / 255)
    assert to_tensor(a[..., 0]).shape == (3, 40, 60)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(a.astype(np.float32))


def test_eval_resizes_and_normalises() -> None:
    flat = np.full((50, 70, 3), 255, dtype=np.uint8)
    out = EvalTransform(32, MEAN, STD)(flat)
    assert out.shape == (3, 32, 32)
    expected = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert EvalTransform((24, 48), MEAN, STD)(flat).shape == (3, 24, 48)


def test_train_is_deterministic_given_a_generator() -> None:
    t = TrainTransform(32, MEAN, STD)
    a = image()
    x1 = t(a, generator=torch.Generator().manual_seed(7))
    x2 = t(a, generator=torch.Generator().manual_seed(7))
    assert x1.shape == (3, 32, 32) and torch.equal(x1, x2)
    others = [t(a, generator=torch.Generator().manual_seed(s)) for s in range(1, 6)]
    assert any(not torch.equal(x1, o) for o in others)


def test_crop_box_respects_scale_and_ratio() -> None:
    t = TrainTransform(16, MEAN, STD, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = t.crop_box(100, 120, g)
        assert top >= 0 and top + h <= 100
        assert left >= 0 and left + w <= 120
        assert 0.5 * 12000 * 0.97 <= h * w <= 12000
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_flips_and_rotation_only_rearrange_pixels() -> None:
    # With the full-image crop and no resize, every augmented output is a flip/rotation of the input.
    a = image(16, 16)
    t = TrainTransform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    base = to_tensor(a)
    variants = {
        tuple(torch.rot90(v, k, dims=(-2, -1)).flatten().tolist())
        for v in (base, base.flip(-1))
        for k in range(4)
    }
    seen = set()
    for s in range(40):
        out = t(a, generator=torch.Generator().manual_seed(s))
        key = tuple(out.flatten().tolist())
        assert key in variants
        seen.add(key)
    assert len(seen) >= 4  # flips and rotations do happen


def test_non_square_output_keeps_its_size() -> None:
    t = TrainTransform((16, 24), MEAN, STD)
    for s in range(20):
        assert t(image(), generator=torch.Generator().manual_seed(s)).shape == (3, 16, 24)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(8, MEAN, STD, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        EvalTransform(8, (0.5,), (0.5,))(image())
