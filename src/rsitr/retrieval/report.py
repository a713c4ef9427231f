"""Evaluation report folder: metrics.json, a per-scene recall table and a retrieval gallery."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from rsitr.data.corpus import RetrievalCorpus
from rsitr.errors import DataError
from rsitr.retrieval.metrics import RECALL_KS, RetrievalMetrics


def scene_recalls(metrics: RetrievalMetrics, corpus: RetrievalCorpus) -> list[dict[str, object]]:
    """i2t and t2i R@1/5/10 per scene class (images without a scene are grouped as ``?``)."""
    if metrics.i2t_ranks is None or metrics.t2i_ranks is None:
        raise ValueError("metrics must keep their ranks (keep_ranks=True)")
    scenes = np.array([im.scene or "?" for im in corpus.images])
    c2i = corpus.caption_to_image()
    has_caps = np.bincount(c2i, minlength=corpus.num_images) > 0
    q_scenes = scenes[has_caps]
    t_scenes = scenes[c2i]
    rows = []
    for s in sorted(set(scenes.tolist())):
        ri, rt = metrics.i2t_ranks[q_scenes == s], metrics.t2i_ranks[t_scenes == s]
        row: dict[str, object] = {"scene": s, "images": int((scenes == s).sum()), "captions": int(rt.size)}
        for k in RECALL_KS:
            row[f"i2t_R@{k}"] = round(100.0 * float(np.mean(ri < k)), 2) if ri.size else None
        for k in RECALL_KS:
            row[f"t2i_R@{k}"] = round(100.0 * float(np.mean(rt < k)), 2) if rt.size else None
        rows.append(row)
    return rows


def gallery(
    img: Tensor | np.ndarray,
    txt: Tensor | np.ndarray,
    corpus: RetrievalCorpus,
    out: Path,
    n_queries: int = 4,
    top: int = 5,
    thumb: int = 128,
    seed: int = 0,
) -> Path:
    """A PNG: a few text queries with their top-``top`` images; green border = ground truth."""
    from rsitr.data.images import load_image

    img_np = np.asarray(img, dtype=np.float32)
    txt_np = np.asarray(txt, dtype=np.float32)
    c2i = corpus.caption_to_image()
    rng = np.random.default_rng(seed)
    queries = rng.choice(corpus.num_captions, size=min(n_queries, corpus.num_captions), replace=False)
    text_h = 34
    sheet = Image.new("RGB", (top * (thumb + 6) + 6, len(queries) * (thumb + text_h + 10) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    for r, q in enumerate(queries):
        y = 6 + r * (thumb + text_h + 10)
        draw.text((6, y), corpus.captions[q][:110], fill="black")
        order = np.argsort(-(img_np @ txt_np[q]), kind="stable")[:top]
        for c, i in enumerate(order):
            x = 6 + c * (thumb + 6)
            path = corpus.images[int(i)].path
            try:
                tile = load_image(path).resize((thumb - 6, thumb - 6)) if path is not None else None
            except (DataError, OSError):  # a broken image still gets its (red/green) slot
                tile = None
            colour = "green" if int(i) == int(c2i[q]) else "red"
            draw.rectangle([x, y + text_h, x + thumb - 1, y + text_h + thumb - 1], fill=colour)
            if tile is not None:
                sheet.paste(tile, (x + 3, y + text_h + 3))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def write_report(
    folder: str | Path,
    metrics: RetrievalMetrics,
    corpus: RetrievalCorpus,
    img: Tensor,
    txt: Tensor,
    method: Any = None,
    **figure_kwargs: Any,
) -> Path:
    """Write ``metrics.json``, ``scenes.csv`` and ``gallery.png`` into ``folder``.

    When ``method`` defines ``report_figures(corpus, folder, features=..., **figure_kwargs)``
    (e.g. ``msa``), its method-specific figures are written there too; ``features`` is
    :mod:`rsitr.retrieval.embed`, so the models package never imports the retrieval layer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=1))
    rows = scene_recalls(metrics, corpus)
    with open(folder / "scenes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if all(im.path is not None for im in corpus.images):
        gallery(img, txt, corpus, folder / "gallery.png")
        hook = getattr(method, "report_figures", None)
        if callable(hook):
            from rsitr.retrieval import embed

            hook(corpus, folder, features=embed, **figure_kwargs)
    return folder
