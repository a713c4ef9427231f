"""Image transforms on torch tensors; the named training pipelines of ``data.augment``.

Both transforms take a PIL image or a ``uint8`` ``(H, W, C)`` array and return a normalised
``float32`` ``(C, H, W)`` tensor. The pixel operations are torchvision.transforms.v2's; only the
crop sampling is ours, because it draws from an optional ``torch.Generator`` (a fixed generator
gives a fixed output; without one, torch's global generator is used, which DataLoader seeds per
worker), which torchvision's random transforms do not take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "AUGMENTS",
    "EvalTransform",
    "TrainTransform",
    "build_train_transform",
    "normalize",
    "resize",
    "to_tensor",
]

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"size={size!r}: expected positive height and width")
    return h, w


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """Convert an RGB image to a ``float32`` ``(C, H, W)`` tensor in ``[0, 1]``.

    ``TF.to_image`` reads the pixels; the scaling is ``/ 255`` (torchvision's ``to_dtype``
    multiplies by 1/255, which differs in the last bit and would change cached features).

    Args:
        image: a PIL image (converted to RGB) or a ``uint8`` ``(H, W, C)`` / ``(H, W)`` array.

    Returns:
        The tensor (3 channels for PIL images and 2-D arrays).

    Raises:
        ValueError: if the array is not ``uint8`` with 2 or 3 dimensions.
    """
    if isinstance(image, Image.Image):
        img = TF.to_image(image.convert("RGB"))
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 (H, W, C) array, got {a.dtype} {a.shape}")
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        img = TF.to_image(np.ascontiguousarray(a))
    return img.as_subclass(torch.Tensor).to(torch.float32).div_(255.0)


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Resize a ``(C, H, W)`` tensor bilinearly (antialiased when shrinking; ``TF.resize``).

    Args:
        x: the image tensor.
        size: output ``(height, width)`` or one int for a square.

    Returns:
        The resized ``(C, h, w)`` tensor (``x`` itself when the size is already right).
    """
    h, w = _pair(size)
    return TF.resize(x, [h, w], antialias=True)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Return ``(x - mean) / std`` per channel of a ``(C, H, W)`` tensor (``TF.normalize``).

    Raises:
        ValueError: if ``mean``/``std`` do not have one value per channel or ``std`` has a zero.
    """
    c = x.shape[0]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values, got {len(mean)} and {len(std)}")
    if any(s == 0 for s in std):
        raise ValueError(f"std={list(std)} contains 0")
    return TF.normalize(x, [float(m) for m in mean], [float(s) for s in std])


class EvalTransform:
    """Evaluation transform: resize to ``size`` (aspect ratio not kept), then normalise.

    Args:
        size: output ``(height, width)`` or one int for a square.
        mean: per-channel mean (defined by the encoder).
        std: per-channel standard deviation.
    """

    def __init__(self, size: Size, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = _pair(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(
        self, image: Image.Image | np.ndarray, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Transform one image; ``generator`` is accepted for symmetry and unused.

        Returns:
            A ``float32`` ``(3, height, width)`` tensor.
        """
        return normalize(resize(to_tensor(image), self.size), self.mean, self.std)


class TrainTransform:
    """Training augmentation: random resized crop, flips, 90° rotation, normalisation.

    The crop follows the usual RandomResizedCrop sampling (area fraction uniform in ``scale``,
    log-uniform aspect ratio in ``ratio``, 10 tries, then a central crop of the clamped ratio).
    Each flip has probability 0.5; the rotation is ``k * 90°`` with ``k`` uniform in 0..3.

    Args:
        size: output ``(height, width)`` or one int for a square.
        mean: per-channel mean (defined by the encoder).
        std: per-channel standard deviation.
        scale: range of the crop's area fraction.
        ratio: range of the crop's width/height ratio.
        hflip: random horizontal flip.
        vflip: random vertical flip.
        rot90: random rotation by a multiple of 90° (by 0° or 180° only when the output is not
            square, so that its size is kept).

    Raises:
        ValueError: if ``scale`` or ``ratio`` is not an increasing positive range.
    """

    def __init__(
        self,
        size: Size,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={scale!r}: expected 0 < low <= high <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={ratio!r}: expected 0 < low <= high")
        self.size = _pair(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90

    def crop_box(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """Sample a crop ``(top, left, h, w)`` for an image of ``height`` x ``width``."""
        area = height * width
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2, generator=generator).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
            w = round(math.sqrt(target * r))
            h = round(math.sqrt(target / r))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        r = width / height  # fallback: central crop with the ratio clamped into range
        if r < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif r > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(
        self, image: Image.Image | np.ndarray, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Transform one image.

        Args:
            image: PIL image or ``uint8`` ``(H, W, C)`` array.
            generator: source of randomness; the same generator state gives the same output.

        Returns:
            A ``float32`` ``(3, height, width)`` tensor.
        """
        x = to_tensor(image)  # (C, H, W)
        top, left, h, w = self.crop_box(x.shape[1], x.shape[2], generator)
        x = resize(TF.crop(x, top, left, h, w), self.size)
        flips = torch.rand(2, generator=generator).tolist()
        k = int(torch.randint(0, 4, (1,), generator=generator))
        if self.hflip and flips[0] < 0.5:
            x = TF.horizontal_flip(x)
        if self.vflip and flips[1] < 0.5:
            x = TF.vertical_flip(x)
        if self.size[0] != self.size[1]:
            k = (k // 2) * 2  # keep (height, width): 0° or 180° only
        if self.rot90 and k:
            x = torch.rot90(x, k, dims=(-2, -1))
        return normalize(x.contiguous(), self.mean, self.std)


AUGMENTS = ("none", "rs", "crop_flip", "clip")
"""Named training augmentation pipelines (``data.augment``)."""


class _V2Pipeline:
    """A torchvision.transforms.v2 pipeline on a PIL image or uint8 array → normalised tensor."""

    def __init__(self, steps: list, mean: Sequence[float], std: Sequence[float]) -> None:
        from torchvision.transforms import v2

        self.pipeline = v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                                    v2.Normalize(list(mean), list(std))])  # fmt: skip

    def __call__(
        self, image: Image.Image | np.ndarray, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return self.pipeline(image.convert("RGB"))


def build_train_transform(
    name: str, size: Size, mean: Sequence[float], std: Sequence[float]
) -> EvalTransform | TrainTransform | _V2Pipeline:
    """The training transform named by ``data.augment``.

    - ``none``: resize only (MSA trains without augmentation);
    - ``rs``: random resized crop (50–100 %), both flips and 90° turns (:class:`TrainTransform`);
    - ``crop_flip``: random resized crop of 50–100 % and a horizontal flip (CMPAGL §IV-B);
    - ``clip``: bicubic resize and RandAugment (HarMA/RDB), from torchvision.transforms.v2.

    Raises:
        ConfigError: for an unknown name.
    """
    from torchvision.transforms import InterpolationMode, v2

    from rsitr.errors import ConfigError

    hw = _pair(size)
    if name == "none":
        return EvalTransform(hw, mean, std)
    if name == "rs":
        return TrainTransform(hw, mean, std)
    if name == "crop_flip":
        return _V2Pipeline([v2.RandomResizedCrop(hw, scale=(0.5, 1.0), antialias=True),
                            v2.RandomHorizontalFlip()], mean, std)  # fmt: skip
    if name == "clip":
        return _V2Pipeline([v2.Resize(hw, interpolation=InterpolationMode.BICUBIC, antialias=True),
                            v2.RandAugment()], mean, std)  # fmt: skip
    raise ConfigError(f"data.augment: {name!r} is not one of {', '.join(AUGMENTS)}")
