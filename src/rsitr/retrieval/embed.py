"""Embedding a corpus with any method, and evaluating a method on a corpus.

This is the single evaluation path used by training (validation), ``rsitr evaluate``,
``rsitr embed`` and the search index: it builds ``S = img @ txtᵀ`` from L2-normalised
embeddings and applies the protocol of :mod:`rsitr.retrieval.metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from rsitr.data.corpus import RetrievalCorpus
from rsitr.errors import ConfigError, DataError
from rsitr.models.encoders.base import trim_padding
from rsitr.retrieval.metrics import RetrievalMetrics, TiePolicy, evaluate_scores
from rsitr.retrieval.relevance import Relevance
from rsitr.retrieval.rerank import QueryBank, get_reranker
from rsitr.retrieval.rerank import rerank as apply_rerank

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


_VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, dims=(-2, -1)),
    "rot180": lambda x: x.rot90(2, dims=(-2, -1)),
    "rot270": lambda x: x.rot90(3, dims=(-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: x.rot90(2, dims=(-2, -1)).transpose(-2, -1),
}
VIEWS = tuple(_VIEWS)
"""The eight views of the dihedral group D4: valid for overhead imagery, which has no 'up'."""

VIEW_SETS = {"none": ("identity",), "flips": ("identity", "hflip", "vflip"), "d4": VIEWS}
"""Named test-time view sets (``--tta``)."""


def apply_view(x: Tensor, view: str) -> Tensor:
    """A deterministic view of a (…, H, W) batch: one of :data:`VIEWS` (flips, 90° turns)."""
    try:
        return _VIEWS[view](x)
    except KeyError:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}") from None


def parse_views(spec: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``none``/``flips``/``d4`` or a comma-separated list of views → a tuple of view names.

    Raises:
        ConfigError: for an unknown view or set name.
    """
    if spec is None or spec == "":
        return ("identity",)
    if isinstance(spec, str):
        if spec in VIEW_SETS:
            return VIEW_SETS[spec]
        spec = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in spec if v not in _VIEWS]
    if bad or not spec:
        raise ConfigError(
            f"--tta: unknown view {bad[0] if bad else spec!r}; use {'|'.join(VIEW_SETS)} or a "
            f"comma-separated list of {', '.join(VIEWS)}"
        )
    return tuple(dict.fromkeys(spec))


def average_views(embeddings: list[Tensor]) -> Tensor:
    """Test-time view averaging: ``normalize(Σ_v normalize(e_v))`` over the views' embeddings."""
    if len(embeddings) == 1:
        return embeddings[0]
    total = torch.stack([torch.nn.functional.normalize(e.float(), dim=-1) for e in embeddings]).sum(0)
    return torch.nn.functional.normalize(total, dim=-1)


def image_loader(
    corpus: RetrievalCorpus,
    method: Any,
    batch_size: int = 64,
    num_workers: int = 0,
    on_error: str = "skip",
    image_size: int | None = None,
) -> DataLoader:
    """A DataLoader of the corpus images, preprocessed for ``method``'s image encoder."""
    from rsitr.data.datasets import ImageDataset, collate_skip_failed
    from rsitr.data.transforms import EvalTransform

    enc = method.image_encoder
    size = image_size or enc.image_size
    ds = ImageDataset(corpus, EvalTransform(size, enc.mean, enc.std), on_error=on_error)  # type: ignore[arg-type]
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_failed)


@torch.no_grad()
def image_features(
    method: Any,
    corpus: RetrievalCorpus,
    view: str = "identity",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    on_error: str = "skip",
    image_size: int | None = None,
    start: int = 0,
    stop: int | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Frozen-part image features of ``corpus.images[start:stop]``.

    Returns:
        ``(feats, valid)``: named (N, …) CPU tensors and an (N,) bool mask, False for images
        that could not be read (their features are zeros; they are reported in the log).
    """
    stop = corpus.num_images if stop is None else stop
    sub = corpus.subset(list(range(start, stop))) if (start, stop) != (0, corpus.num_images) else corpus
    n = sub.num_images
    loader = image_loader(sub, method, batch_size, num_workers, on_error, image_size)
    out: dict[str, Tensor] = {}
    valid = torch.zeros(n, dtype=torch.bool)
    done = 0
    method.eval()
    for batch in loader:
        if batch is None:
            continue
        ids = batch["image_id"]
        x = apply_view(batch["image"].to(device), view)
        feats = method.image_features(x)
        for k, v in feats.items():
            v = _storage(method, v)
            if k not in out:
                out[k] = torch.zeros((n, *v.shape[1:]), dtype=v.dtype)
            out[k][ids] = v
        valid[ids] = True
        done += len(ids)
        if progress is not None:
            progress(done, n)
    if not valid.all():
        bad = [sub.images[i].filename for i in torch.nonzero(~valid).flatten().tolist()]
        logger.warning(
            "%d image(s) could not be read and get zero features: %s", len(bad), ", ".join(bad[:5])
        )
    return out, valid


@torch.no_grad()
def text_features(
    method: Any,
    captions: list[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """Frozen-part text features of ``captions`` (named (M, …) CPU tensors).

    When the method declares its ``padded_text_keys`` (the sequence-shaped outputs, possibly
    none), captions are encoded in batches of similar length with the all-padding columns
    trimmed, and those outputs are zero-padded back to the tokenizer's length: the same features
    for about half the compute on short captions. Otherwise every batch keeps the full length.
    """
    out: dict[str, Tensor] = {}
    method.eval()
    seq_keys = getattr(method, "padded_text_keys", None)
    if not captions:
        return out
    tokens = method.tokenize(list(captions))  # once: (M, L) ids and mask
    full = tokens["input_ids"].shape[1]
    order = np.arange(len(captions))
    if seq_keys is not None:
        order = np.argsort(tokens["attention_mask"].ne(0).sum(1).numpy(), kind="stable")
    for s in range(0, len(captions), batch_size):
        rows = torch.from_numpy(order[s : s + batch_size])
        tok = {k: v[rows] for k, v in tokens.items()}
        if seq_keys is not None:
            tok = trim_padding(tok)
        feats = method.text_features(tok["input_ids"].to(device), tok["attention_mask"].to(device))
        for k, v in feats.items():
            v = _storage(method, v, text=True)
            if seq_keys is not None and k in seq_keys and v.shape[1] < full:
                v = torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, full - v.shape[1]))
            if k not in out:
                out[k] = torch.zeros((len(captions), *v.shape[1:]), dtype=v.dtype)
            out[k][rows] = v
        if progress is not None:
            progress(min(s + batch_size, len(captions)), len(captions))
    return out


def first_caption_features(
    method: Any,
    corpus: RetrievalCorpus,
    images: list[int] | np.ndarray,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Frozen-part features of ``images`` (corpus indices) and of each one's first caption (lowest
    caption index), both moved to ``device``: the paired inputs of the methods' report figures."""
    images = [int(i) for i in images]
    img, _ = image_features(method, corpus.subset(images), batch_size=batch_size, device=device)
    caps = [corpus.captions[min(corpus.image_captions[i])] for i in images]
    txt = text_features(method, caps, device=device)
    return {k: v.to(device) for k, v in img.items()}, {k: v.to(device) for k, v in txt.items()}


def _storage(method: Any, v: Tensor, text: bool = False) -> Tensor:
    """A feature as stored: floating ones in the method's ``cache_dtype`` (``text_cache_dtype``
    for text features, when the method sets one); masks and indices as is."""
    if v.is_floating_point():
        dtype = getattr(method, "cache_dtype", torch.float32)
        if text:
            dtype = getattr(method, "text_cache_dtype", None) or dtype
        return v.to(dtype).cpu()
    return v.cpu()


def _slice(feats: dict[str, Tensor], s: int, e: int, device: str | torch.device) -> dict[str, Tensor]:
    return {k: v[s:e].to(device) for k, v in feats.items()}


@torch.no_grad()
def view_progress(progress: Progress | None, view: int, n_views: int) -> Progress | None:
    """``progress`` over all views: view ``view`` of ``n_views`` reports ``(view·total + done,
    n_views·total)``, so one bar runs once from 0 to the end instead of once per view."""
    if progress is None or n_views == 1:
        return progress
    return lambda done, total: progress(view * total + done, n_views * total)


def embed_from_features(
    encode: Callable[..., Tensor],
    feats: dict[str, Tensor],
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Apply a method's ``encode_image``/``encode_text`` to cached features, in batches."""
    n = next(iter(feats.values())).shape[0]
    parts = [
        encode(feats=_slice(feats, s, s + batch_size, device)).float().cpu() for s in range(0, n, batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def embed_corpus(
    method: Any,
    corpus: RetrievalCorpus,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    on_error: str = "skip",
    image_feats: dict[str, Tensor] | None = None,
    text_feats: dict[str, Tensor] | None = None,
    progress: Progress | None = None,
    views: tuple[str, ...] = ("identity",),
) -> tuple[Tensor, Tensor]:
    """L2-normalised image (N, D) and caption (M, D) embeddings of a corpus.

    Cached frozen features, when given, replace running the frozen towers. With several
    ``views``, each image embedding is the normalised mean over those views
    (:func:`average_views`; test-time augmentation for overhead imagery).
    """
    method.eval()
    if image_feats is not None:
        img = embed_from_features(method.encode_image, image_feats, device=device)
    else:
        per_view = []
        for v, view in enumerate(views):
            feats, _ = image_features(
                method, corpus, view=view, batch_size=batch_size, device=device, num_workers=num_workers,
                on_error=on_error, progress=view_progress(progress, v, len(views)),
            )  # fmt: skip
            per_view.append(embed_from_features(method.encode_image, feats, device=device))
        img = average_views(per_view)
    if text_feats is None:
        text_feats = text_features(method, corpus.captions, device=device)
    txt = embed_from_features(method.encode_text, text_feats, device=device)
    return img, txt


def save_embeddings(path: str | Path, img: Tensor, txt: Tensor, corpus: RetrievalCorpus) -> Path:
    """Write L2-normalised embeddings of ``corpus`` as an ``rsitr embed`` archive (npz, no pickle,
    written atomically): ``image_embeddings``, ``text_embeddings``, ``image_names``,
    ``captions`` and ``caption_to_image``, the ground truth that ``load_embeddings`` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        image_embeddings=img.detach().cpu().float().numpy(),
        text_embeddings=txt.detach().cpu().float().numpy(),
        image_names=np.array(corpus.filenames(), dtype=str),
        captions=np.array(corpus.captions, dtype=str),
        caption_to_image=corpus.caption_to_image(),
    )
    tmp.replace(path)
    return path


def evaluate_embeddings(
    img: Tensor | np.ndarray,
    txt: Tensor | np.ndarray,
    corpus: RetrievalCorpus,
    ties: TiePolicy = "pessimistic",
    rerank: str = "none",
    rerank_params: dict[str, Any] | None = None,
    bank: tuple[Tensor | np.ndarray, Tensor | np.ndarray] | None = None,
) -> RetrievalMetrics:
    """Protocol metrics of precomputed embeddings on ``corpus`` (any captions per image).

    ``bank`` = (bank image embeddings, bank caption embeddings), e.g. of the training split,
    is the query bank of a non-transductive reranker (``qb-norm``).
    """
    img_np = _np64(img)
    txt_np = _np64(txt)
    scores = img_np @ txt_np.T
    rel = Relevance.from_image_captions(corpus.image_captions, corpus.num_captions)
    qbank = None
    if bank is not None:
        qbank = QueryBank(text=_np64(bank[1]) @ img_np.T, image=_np64(bank[0]) @ txt_np.T)
    out = apply_rerank(scores, rerank, bank=qbank, **(rerank_params or {}))
    metrics = evaluate_scores(out.i2t, rel, ties, t2i_scores=out.t2i, rerank=rerank, keep_ranks=True)
    if rerank != "none":
        metrics.extra["transductive"] = get_reranker(rerank).transductive
    return metrics


def _np64(x: Tensor | np.ndarray) -> np.ndarray:
    return (x.numpy() if isinstance(x, Tensor) else np.asarray(x)).astype(np.float64)


def evaluate_corpus(
    method: Any,
    corpus: RetrievalCorpus,
    *,
    ties: TiePolicy = "pessimistic",
    rerank: str = "none",
    rerank_params: dict[str, Any] | None = None,
    itm_rescore: int = 0,
    bank_corpus: RetrievalCorpus | None = None,
    **embed_kwargs: Any,
) -> tuple[RetrievalMetrics, RetrievalCorpus, Tensor, Tensor]:
    """Embed ``corpus`` with ``method`` and compute the protocol metrics.

    Blank captions are excluded from the t2i queries (their images stay candidates), as the
    data layer's evaluation policy says; the report counts them. With ``itm_rescore`` = k > 0,
    each query's top-k dual-stream candidates are re-scored by the method's ITM head
    (ALBEF-style, ``method.itm_rescore``) instead of ``rerank``: slower, 2·k·(N + M) passes of
    the multimodal encoder. ``bank_corpus`` (e.g. the training split) is embedded as the query
    bank of a non-transductive reranker (``qb-norm``); its images use the same views.

    Returns:
        ``(metrics, evaluated corpus, image embeddings, caption embeddings)``.
    """
    if itm_rescore and not hasattr(method, "itm_rescore"):
        raise ConfigError(f"--itm-rescore: method {method.name!r} has no ITM head (cmpagl has one)")
    t0 = time.perf_counter()
    clean, warnings = corpus.drop_blank_captions("eval")
    views = tuple(embed_kwargs.pop("views", ("identity",)))
    if itm_rescore and len(views) > 1:
        raise ConfigError("--itm-rescore works on one view: drop --tta")
    method.eval()
    clean, per_view, unreadable = _readable_image_features(method, clean, views, embed_kwargs)
    if unreadable:
        warnings = [*warnings, f"{len(unreadable)} unreadable image(s) excluded with their captions: "
                    + ", ".join(unreadable[:5]) + (" …" if len(unreadable) > 5 else "")]  # fmt: skip
    device = embed_kwargs.get("device", "cpu")
    if itm_rescore:
        img_f = per_view[0]
        txt_f = text_features(method, clean.captions, device=device)
        img, txt = embed_corpus(method, clean, image_feats=img_f, text_feats=txt_f, **embed_kwargs)
        i2t, t2i = method.itm_rescore(img.double() @ txt.double().T, img_f, txt_f, k=itm_rescore)
        rel = Relevance.from_image_captions(clean.image_captions, clean.num_captions)
        metrics = evaluate_scores(
            i2t.numpy(), rel, ties, t2i_scores=t2i.numpy(), rerank=f"itm@{itm_rescore}", keep_ranks=True
        )
    else:
        img = average_views([embed_from_features(method.encode_image, f, device=device) for f in per_view])
        txt = embed_from_features(method.encode_text, text_features(method, clean.captions, device=device),
                                  device=device)  # fmt: skip
        bank = None
        if rerank != "none" and get_reranker(rerank).needs_bank:
            if bank_corpus is None:
                raise ConfigError(f"--rerank {rerank}: needs a query bank split (--query-bank train)")
            bank_clean = bank_corpus.drop_blank_captions("eval")[0]
            bank = embed_corpus(method, bank_clean, **{**embed_kwargs, "views": views})  # progress restarts
        metrics = evaluate_embeddings(img, txt, clean, ties, rerank, rerank_params, bank=bank)
    if unreadable:
        metrics.extra["unreadable_images"] = unreadable
    metrics.extra.update(
        n_images=clean.num_images,
        n_captions=clean.num_captions,
        seconds=round(time.perf_counter() - t0, 3),
    )
    if warnings:
        metrics.extra["warnings"] = warnings
    return metrics, clean, img, txt


def _readable_image_features(
    method: Any, corpus: RetrievalCorpus, views: tuple[str, ...], embed_kwargs: dict[str, Any]
) -> tuple[RetrievalCorpus, list[dict[str, Tensor]], list[str]]:
    """Image features of every view, with unreadable images (and their captions) left out.

    An image that cannot be read has no embedding, so it is neither a query nor a candidate:
    it is excluded from the evaluation and named in the report, never scored with zero
    features. If no image can be read, that is an error.

    Returns:
        ``(corpus of the readable images, features per view, file names of the excluded)``.
    """
    keys = ("batch_size", "device", "num_workers", "on_error", "progress", "image_size")
    kw = {k: v for k, v in embed_kwargs.items() if k in keys}
    per_view, valid = [], torch.ones(corpus.num_images, dtype=torch.bool)
    for v, view in enumerate(views):
        kw["progress"] = view_progress(embed_kwargs.get("progress"), v, len(views))
        feats, ok = image_features(method, corpus, view=view, **kw)
        per_view.append(feats)
        valid &= ok
    if valid.all():
        return corpus, per_view, []
    unreadable = [corpus.images[i].filename for i in torch.nonzero(~valid).flatten().tolist()]
    if not valid.any():
        raise DataError(
            f"none of the {corpus.num_images} images of the split could be read (first: {unreadable[0]})",
            path=corpus.source,
        )
    keep = torch.nonzero(valid).flatten()
    return corpus.subset(keep.numpy()), [{k: v[keep] for k, v in f.items()} for f in per_view], unreadable


def evaluate_method(method: Any, corpus: RetrievalCorpus, **kwargs: Any) -> RetrievalMetrics:
    """The metrics of :func:`evaluate_corpus` alone."""
    return evaluate_corpus(method, corpus, **kwargs)[0]
