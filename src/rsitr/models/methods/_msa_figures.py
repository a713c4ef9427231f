"""MSA's figures for ``rsitr evaluate --report``, drawn with Pillow (no plotting dependency).

* ``msa_fig3_scale_similarity.png`` (paper Fig. 3): one heatmap per scale of the image–text
  similarity matrix over the first ``num_images`` images and their first captions (rows images,
  columns captions), and boxplots of each scale's diagonal (matching-pair) similarities. Scales
  with an MSCMAT show its scores mⁱ (Eq. 13); scales without one (presets ``base``/``base+m``)
  show the cosine of v^i′ and t^cls′, as the title says.
* ``msa_fig8_attention.png`` (paper Fig. 8): for one caption and its image, the MSCMAT attention
  weight of every scale on every word (mean over heads), one row per scale.

The full pair matrix of a test split would need MSCMAT on every (image, caption) pair (about
6·10⁶ for RSICD val), so the heatmaps use a subset.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# A 5-stop viridis approximation: dark purple → blue → green → yellow.
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → (…, 3) uint8 RGB (viridis-like)."""
    x = np.clip(x, 0, 1) * (len(_STOPS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
    t = (x - lo)[..., None]
    return (_STOPS[lo] * (1 - t) + _STOPS[lo + 1] * t).astype(np.uint8)


def _heatmap(m: np.ndarray, size: int) -> Image.Image:
    lo, hi = float(m.min()), float(m.max())
    img = Image.fromarray(colormap((m - lo) / max(hi - lo, 1e-8)))
    return img.resize((size, size), Image.NEAREST)


def _boxplots(values: list[np.ndarray], labels: list[str], width: int, height: int) -> Image.Image:
    """Box (quartiles), median line and whiskers (1.5 IQR) for each series on a shared axis."""
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    top, bottom, left = 20, height - 30, 50

    def y(v: float) -> float:
        return bottom - (v - lo) / max(hi - lo, 1e-8) * (bottom - top)

    d.line([(left, top), (left, bottom)], fill="black")
    for v in (lo, (lo + hi) / 2, hi):
        d.text((2, y(v) - 5), f"{v:.2f}", fill="black")
    step = (width - left) / len(values)
    for k, (v, label) in enumerate(zip(values, labels, strict=True)):
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        iqr = q3 - q1
        w_lo, w_hi = v[v >= q1 - 1.5 * iqr].min(), v[v <= q3 + 1.5 * iqr].max()
        cx = left + step * (k + 0.5)
        half = step * 0.25
        d.line([(cx, y(w_lo)), (cx, y(q1))], fill="black")
        d.line([(cx, y(q3)), (cx, y(w_hi))], fill="black")
        d.rectangle([cx - half, y(q3), cx + half, y(q1)], outline="black", fill=(160, 190, 230))
        d.line([(cx - half, y(med)), (cx + half, y(med))], fill="red", width=2)
        for o in v[(v < w_lo) | (v > w_hi)]:
            d.ellipse([cx - 2, y(o) - 2, cx + 2, y(o) + 2], outline="gray")
        d.text((cx - half, bottom + 8), label, fill="black")
    return canvas


def _words(method: Any, caption: str, input_ids: torch.Tensor, n: int) -> list[str]:
    tok = getattr(method.text_encoder, "tokenizer", None)
    if hasattr(tok, "convert_ids_to_tokens"):
        return list(tok.convert_ids_to_tokens(input_ids[:n].tolist()))
    return (["[CLS]", *re.findall(r"[a-z0-9]+", caption.lower())] + ["?"] * n)[:n]


@torch.no_grad()
def write_figures(
    method: Any,
    corpus: Any,
    folder: Path,
    features: Any,
    device: str | torch.device = "cpu",
    num_images: int = 100,
    caption: int = 0,
    batch_size: int = 64,
) -> list[Path]:
    """Write Fig. 3 and Fig. 8 of MSA for ``method`` on ``corpus`` into ``folder``.

    Args:
        method: a trained :class:`rsitr.models.methods.msa.MSA`.
        corpus: the evaluated corpus (image paths needed).
        folder: output folder.
        features: the feature extractors (``image_features``, ``text_features``,
            ``first_caption_features``; :mod:`rsitr.retrieval.embed`), passed in by the caller so
            that the models package does not import the retrieval layer.
        device: where to run the model.
        num_images: images (and first captions) in the Fig. 3 matrices.
        caption: index (in the corpus) of the caption shown in Fig. 8, with its own image.
        batch_size: image batch size for the frozen features.

    Returns:
        The PNG paths written.
    """
    first_caption_features = features.first_caption_features
    image_features, text_features = features.image_features, features.text_features
    folder.mkdir(parents=True, exist_ok=True)
    method.eval()
    k = min(num_images, corpus.num_images)
    img_feats, txt_feats = first_caption_features(
        method, corpus, range(k), batch_size=batch_size, device=device
    )
    scales = method.scale_features(img_feats)
    cls = method.embed_text(txt_feats)
    tok, mask = method.text_tokens(txt_feats)
    mats, labels = [], []
    for s in range(1, method.num_scales + 1):
        if str(s) in method.mscmat:
            mats.append(method.mscmat[str(s)](scales[s - 1], tok, mask, cls).cpu().numpy())
        else:
            mats.append((F.normalize(scales[s - 1], dim=-1) @ F.normalize(cls, dim=-1).T).cpu().numpy())
        labels.append(f"scale {s}")
    kind = "MSCMAT score m^i" if len(method.mscmat) else "cos(v^i', t^cls')"
    cell = 220
    fig = Image.new("RGB", (cell * len(mats) + 20, cell + 60 + 240), "white")
    d = ImageDraw.Draw(fig)
    d.text(
        (10, 5),
        f"Fig. 3: per-scale image-text similarity ({kind}), {k} images x first captions",
        fill="black",
    )
    for j, (m, label) in enumerate(zip(mats, labels, strict=True)):
        fig.paste(_heatmap(m, cell - 20), (10 + j * cell, 30))
        d.text((10 + j * cell, cell + 15), f"{label} [{m.min():.2f}, {m.max():.2f}]", fill="black")
    box = _boxplots([np.diagonal(m) for m in mats], labels, cell * len(mats), 230)
    fig.paste(box, (10, cell + 50))
    paths = [folder / "msa_fig3_scale_similarity.png"]
    fig.save(paths[0])

    if len(method.mscmat):
        ci = min(caption, corpus.num_captions - 1)
        ii = int(corpus.caption_to_image()[ci])
        one = corpus.subset([ii])
        f_img, _ = image_features(method, one, batch_size=1, device=device)
        f_img = {n: v.to(device) for n, v in f_img.items()}
        text = corpus.captions[ci]
        f_txt = {n: v.to(device) for n, v in text_features(method, [text], device=device).items()}
        v1 = method.scale_features(f_img)
        t1, m1 = method.text_tokens(f_txt)
        n_tok = int(m1[0].sum())
        ids = method.tokenize([text])["input_ids"][0]
        words = _words(method, text, ids, n_tok)
        rows = []
        for s in method.cfg.align_scales:
            _, w = method.mscmat[str(s)].attend(v1[s - 1], t1, m1)  # (1, 1, h, L)
            rows.append((s, w[0, 0].mean(0)[:n_tok].cpu().numpy()))
        cw, ch, left = 70, 28, 70
        out = Image.new("RGB", (left + cw * n_tok + 10, 50 + ch * len(rows)), "white")
        d = ImageDraw.Draw(out)
        d.text((5, 5), f"Fig. 8: attention per scale (mean over heads): {text[:90]}", fill="black")
        for j, word in enumerate(words):
            d.text((left + j * cw + 2, 25), word[:10], fill="black")
        for r, (s, w) in enumerate(rows):
            y0 = 45 + r * ch
            d.text((5, y0 + 8), f"scale {s}", fill="black")
            rgb = colormap(w / max(float(w.max()), 1e-8))
            for j in range(n_tok):
                d.rectangle(
                    [left + j * cw, y0, left + (j + 1) * cw - 2, y0 + ch - 2],
                    fill=tuple(int(c) for c in rgb[j]),
                )
                d.text(
                    (left + j * cw + 4, y0 + 8),
                    f"{w[j]:.2f}",
                    fill="white" if w[j] < 0.6 * w.max() else "black",
                )
        paths.append(folder / "msa_fig8_attention.png")
        out.save(paths[-1])
    return paths
