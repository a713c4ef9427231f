"""Small randomly initialised towers: the fallback when no pretrained weights are installed,
and fast stand-ins for tests.

``tiny-cnn``: four strided conv stages (strides 4/8/16/32), global average pooled.
``tiny-text``: a hashing word tokenizer (no vocabulary file) and a 2-layer Transformer.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import torch
from torch import Tensor, nn

from rsitr.models.encoders._factory import register_image_encoder, register_text_encoder
from rsitr.models.encoders.base import ImageEncoder, ImageOutput, TextEncoder, TextOutput, masked_mean


@register_image_encoder("tiny-cnn")
class TinyCNN(ImageEncoder):
    """Four conv stages (Conv–BN–ReLU, stride 4 then 2, 2, 2); maps at strides 4/8/16/32."""

    name = "tiny-cnn"

    def __init__(self, width: int = 32, image_size: int = 64) -> None:
        super().__init__()
        chs = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(chs):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(
                        c_in,
                        c,
                        kernel_size=4 if i == 0 else 3,
                        stride=4 if i == 0 else 2,
                        padding=0 if i == 0 else 1,
                    ),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(layers)
        self.image_size = image_size
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.num_features = self.token_dim = chs[-1]
        self.feature_info = [{"num_chs": c, "reduction": 4 * 2**i} for i, c in enumerate(chs)]
        self.width = width

    def forward(self, images: Tensor) -> ImageOutput:
        maps = []
        x = images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)
        return ImageOutput(pooled=x.mean((2, 3)), tokens=tokens, mask=mask, maps=maps)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "width": self.width, "weights": "random"}


_WORD = re.compile(r"[a-z0-9]+")


class HashTokenizer:
    """Lower-cased words hashed (CRC32) into ``vocab_size − 2`` buckets; 0 = pad, 1 = CLS."""

    def __init__(self, vocab_size: int = 4096, max_length: int = 32) -> None:
        self.vocab_size = vocab_size
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        ids = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for b, t in enumerate(texts):
            words = _WORD.findall(t.lower())[: self.max_length - 1]
            row = [1] + [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words]
            ids[b, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@register_text_encoder("tiny-text")
class TinyText(TextEncoder):
    """Embedding + 2-layer Transformer encoder; pooled = masked mean of the token states."""

    name = "tiny-text"

    def __init__(self, dim: int = 128, layers: int = 2, vocab_size: int = 4096, max_length: int = 32) -> None:
        super().__init__()
        self.tokenizer = HashTokenizer(vocab_size, max_length)
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.num_features = self.token_dim = dim
        self.max_length = max_length
        self.dim, self.layers, self.vocab_size = dim, layers, vocab_size

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.tokenizer(texts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        mask = attention_mask.bool()
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return TextOutput(pooled=masked_mean(x, mask), tokens=x, mask=mask)

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "dim": self.dim,
            "layers": self.layers,
            "vocab": self.vocab_size,
            "weights": "random",
        }
