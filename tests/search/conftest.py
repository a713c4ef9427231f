"""Fixtures: a small synthetic archive, a tiny checkpoint trained to memorise its captions,
a second (mismatched) checkpoint, and an index of the archive built once per session."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TINY = {
    "image_encoder": "tiny-cnn",
    "text_encoder": "tiny-text",
    "image_encoder_kwargs": {"width": 8},
    "text_encoder_kwargs": {"dim": 32},
    "embed_dim": 32,
    "head": "mlp",
    "head_hidden": 128,
    "dropout": 0.0,
}


@dataclass(frozen=True)
class SearchAssets:
    """Paths and captions shared by the search tests.

    Attributes:
        archive: the synthetic image folder (40 JPEGs, 128 px) — never modified by tests.
        captions: image file name → its captions.
        ckpt: a tiny ``dual`` checkpoint whose heads were fitted to the archive's captions.
        other_ckpt: another tiny checkpoint (different weights).
        query: a caption (unique in the corpus) and the image it describes; the checkpoint
            ranks that image first for it.
    """

    archive: Path
    captions: dict[str, list[str]]
    ckpt: Path
    other_ckpt: Path
    query: tuple[str, str]


def _fit_heads(
    method: torch.nn.Module, archive: Path, names: list[str], caps: list[str], owner: list[int]
) -> torch.Tensor:
    """Fit the projection heads on frozen tiny-tower features until every caption ranks its
    image first (bounded); returns the caption→image logits."""
    from rsitr.data import load_image
    from rsitr.data.transforms import EvalTransform

    enc = method.image_encoder
    tr = EvalTransform(enc.image_size, enc.mean, enc.std)
    x = torch.stack([tr(load_image(archive / n, max_side=1024)) for n in names])
    with torch.no_grad():
        fi = method.image_features(x)["pooled"]
        tok = method.tokenize(caps)
        ft = method.text_features(tok["input_ids"], tok["attention_mask"])["pooled"]
    target = torch.tensor(owner)
    params = [p for n, p in method.named_parameters() if "head" in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(800):
        img = F.normalize(method.embed_image({"pooled": fi}), dim=-1)
        txt = F.normalize(method.embed_text({"pooled": ft}), dim=-1)
        logits = txt @ img.T * 20.0
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, torch.arange(len(names)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (logits.argmax(1) == target).float().mean() > 0.98:
            break
    return logits.detach()


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> SearchAssets:
    from rsitr.data.synth import generate_scenes
    from rsitr.models import create_method
    from rsitr.models.checkpoint import save_method

    root = tmp_path_factory.mktemp("search")
    generate_scenes(root / "synth", n=40, size=128, seed=0, workers=1)
    data = json.loads((root / "synth" / "dataset_synth.json").read_text())
    names = [im["filename"] for im in data["images"]]
    captions = {im["filename"]: [s["raw"] for s in im["sentences"]] for im in data["images"]}
    caps = [c for n in names for c in captions[n]]
    owner = [i for i, n in enumerate(names) for _ in captions[n]]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    try:
        torch.manual_seed(0)
        method = create_method("dual", TINY, pretrained=False)
        method.image_encoder.set_frozen(True)
        method.text_encoder.set_frozen(True)
        logits = _fit_heads(method, root / "synth" / "images", names, caps, owner)
        save_method(method.eval(), root / "ckpt" / "model.safetensors")
        torch.manual_seed(1)
        save_method(
            create_method("dual", TINY, pretrained=False).eval(), root / "other" / "model.safetensors"
        )
    finally:
        torch.set_num_threads(threads)
    counts: dict[str, int] = {}
    for c in caps:
        counts[c] = counts.get(c, 0) + 1
    pick = next(
        j for j, c in enumerate(caps) if counts[c] == 1 and int(logits[j].argmax()) == owner[j] and j > 20
    )
    return SearchAssets(
        archive=root / "synth" / "images",
        captions=captions,
        ckpt=root / "ckpt",
        other_ckpt=root / "other",
        query=(caps[pick], names[owner[pick]]),
    )


@pytest.fixture
def archive_copy(assets: SearchAssets, tmp_path: Path) -> Path:
    """A private copy of the archive that a test may change."""
    dst = tmp_path / "archive"
    shutil.copytree(assets.archive, dst)
    return dst


@pytest.fixture(scope="session")
def built_index(assets: SearchAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the (unchanged) archive with the fitted checkpoint."""
    from rsitr.retrieval.index import build_index

    out = tmp_path_factory.mktemp("built") / "index"
    build_index(assets.archive, assets.ckpt, out, batch_size=16)
    return out
