"""CMPAGL's figure for ``rsitr evaluate --report``, drawn with Pillow.

``cmpagl_fig7_attention.png`` (paper Fig. 7): for the first ``num_images`` images of the split, the
image and the attention of the last Gswin block (:meth:`CMPAGL.attention_maps`: the Gswin tower's,
or with ``gswin_on_map`` the Gswin's on the frozen map) overlaid as a heatmap, with the image's
first caption. Image towers other than Gswin (the baseline row) have no such map, and no figure is
written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from rsitr.data.images import load_image
from rsitr.data.transforms import EvalTransform
from rsitr.errors import DataError
from rsitr.models.methods._msa_figures import colormap

_logger = logging.getLogger(__name__)

FIGURE = "cmpagl_fig7_attention.png"


def write_attention_figure(
    method: Any,
    corpus: Any,
    folder: Path,
    num_images: int = 6,
    thumb: int = 192,
    alpha: float = 0.5,
    device: str | torch.device | None = None,
) -> list[Path]:
    """Write Fig. 7 into ``folder``; returns the files written (none for a non-Gswin tower).

    Args:
        method: a ``cmpagl`` method.
        corpus: the evaluated corpus (images with paths).
        folder: output folder.
        num_images: images shown, one row each (original | overlay).
        thumb: side of each tile in pixels.
        alpha: heatmap opacity in the overlay.
        device: where to run the encoder (default: the method's).
    """
    enc = method.image_encoder
    if getattr(method, "gswin", None) is None and not hasattr(enc, "attention_maps"):
        _logger.info("cmpagl figures: %s has no Gswin attention maps; Fig. 7 skipped", enc.name)
        return []
    device = device or next(method.parameters()).device
    tf = EvalTransform(enc.image_size, enc.mean, enc.std)
    rows: list[tuple[Image.Image, np.ndarray, str]] = []
    for i, im in enumerate(corpus.images):
        if len(rows) == num_images:
            break
        try:
            pil = load_image(im.path).convert("RGB")
        except (DataError, OSError):  # an unreadable image is skipped; the next one takes its row
            continue
        x = tf(pil)[None].to(device)
        m = method.attention_maps(x)  # (1, h', w')
        heat = F.interpolate(m[:, None].float(), size=(thumb, thumb), mode="bilinear", align_corners=False)
        caps = corpus.image_captions[i]
        caption = corpus.captions[caps[0]] if caps else ""
        rows.append((pil.resize((thumb, thumb)), heat[0, 0].cpu().numpy(), caption))
    if not rows:
        return []
    text_h, pad = 28, 6
    sheet = Image.new("RGB", (2 * thumb + 3 * pad, len(rows) * (thumb + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (img, heat, caption) in enumerate(rows):
        y = pad + r * (thumb + text_h + pad)
        draw.text((pad, y), caption[:70], fill="black")
        overlay = Image.blend(img, Image.fromarray(colormap(heat)), alpha)
        sheet.paste(img, (pad, y + text_h))
        sheet.paste(overlay, (2 * pad + thumb, y + text_h))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / FIGURE
    sheet.save(out)
    return [out]
