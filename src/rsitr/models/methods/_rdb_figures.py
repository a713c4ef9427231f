"""RDB's motivation plot (paper Fig. 1): image and text embeddings coloured by scene class.

Two rows (the frozen towers' features before adaptation; the trained joint embeddings) by two
columns (images; their first captions), each a 2-D PCA projection, with the leave-one-out 10-NN
scene accuracy of each panel printed on it: the paper's claim is that text features separate
scenes better than image features, and that RDB narrows that gap.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def pca_2d(x: torch.Tensor) -> np.ndarray:
    """Project rows of ``x`` on their two leading principal components."""
    x = x.float() - x.float().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


def knn_accuracy(x: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Leave-one-out k-NN (cosine, majority vote) scene accuracy in percent."""
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    nn_idx = sim.topk(min(k, len(x) - 1), dim=1).indices
    votes = F.one_hot(labels[nn_idx], int(labels.max()) + 1).sum(1)
    return float((votes.argmax(1) == labels).float().mean() * 100)


def _palette(n: int) -> list[tuple[int, int, int]]:
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(1, n), 0.75, 0.85))  # type: ignore[misc]
        for i in range(n)
    ]


def _scatter(points: np.ndarray, labels: np.ndarray, colours: list, size: int, title: str) -> Image.Image:
    panel = Image.new("RGB", (size, size + 24), "white")
    d = ImageDraw.Draw(panel)
    d.text((6, 4), title, fill="black")
    lo, hi = points.min(0), points.max(0)
    xy = (points - lo) / np.where(hi > lo, hi - lo, 1.0) * (size - 16) + 8
    for (px, py), lab in zip(xy, labels, strict=True):
        d.ellipse((px - 2, 24 + py - 2, px + 2, 24 + py + 2), fill=colours[int(lab)])
    d.rectangle((0, 24, size - 1, size + 23), outline="grey")
    return panel


@torch.no_grad()
def write_embedding_plot(
    method: Any,
    corpus: Any,
    folder: Path,
    features: Any,
    device: str | torch.device = "cpu",
    num_images: int = 1000,
    batch_size: int = 64,
) -> list[Path]:
    """Write ``embeddings_pca.png`` and ``embeddings_knn.json`` for up to ``num_images`` labelled images.

    ``features`` provides ``first_caption_features`` (:mod:`rsitr.retrieval.embed`, passed in by
    the caller so that the models package does not import the retrieval layer).

    Returns:
        The files written (none when the corpus has fewer than two labelled scenes).
    """
    first_caption_features = features.first_caption_features
    scenes = np.asarray(corpus.scene_ids())
    keep = np.flatnonzero(scenes >= 0)[:num_images]
    if len(keep) < 3 or len(np.unique(scenes[keep])) < 2:
        return []
    method.eval()
    img_feats, txt_feats = first_caption_features(method, corpus, keep, batch_size=batch_size, device=device)
    from rsitr.models.methods.rdb import _as_float

    before = (
        method.image_tower.frozen_suffix(_as_float(img_feats)).cpu(),
        method.text_tower.frozen_suffix(_as_float(txt_feats)).cpu(),
    )
    after = (method.encode_image(feats=img_feats).cpu(), method.encode_text(feats=txt_feats).cpu())
    labels = torch.as_tensor(scenes[keep])
    names = {v: k for k, v in corpus.label_map().items()}
    colours = _palette(len(names))
    size = 360
    fig = Image.new("RGB", (2 * size + 30, 2 * (size + 24) + 60), "white")
    d = ImageDraw.Draw(fig)
    d.text(
        (10, 6),
        f"RDB embeddings by scene (PCA, {len(keep)} images + first captions); 10-NN scene acc.",
        fill="black",
    )
    knn: dict[str, float] = {}
    for r, (row, feats) in enumerate((("frozen towers", before), ("trained (rdb)", after))):
        for c, (mod, x) in enumerate(zip(("image", "text"), feats, strict=True)):
            acc = knn_accuracy(x, labels)
            knn[f"{row}/{mod}"] = round(acc, 2)
            panel = _scatter(pca_2d(x), labels.numpy(), colours, size, f"{row}, {mod}: 10-NN acc {acc:.1f}%")
            fig.paste(panel, (10 + c * (size + 10), 30 + r * (size + 28)))
    legend = ", ".join(names[i] for i in sorted(names))[:200]
    d.text((10, fig.height - 20), f"{len(names)} scenes: {legend}", fill="black")
    png, js = folder / "embeddings_pca.png", folder / "embeddings_knn.json"
    fig.save(png)
    js.write_text(json.dumps(knn, indent=1))
    return [png, js]
