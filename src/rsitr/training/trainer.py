"""The training loop: one ``Trainer`` for every method, on CPU or across GPUs.

Per epoch: a seeded permutation of the training captions (so a resumed run sees exactly the
batches it would have seen), micro-batches split over ranks and accumulation steps, AdamW with
separate backbone/head learning rates, warm-up + decay, optional AMP and clipping; then
validation on the *validation* split (never test), an atomic ``last`` checkpoint and, when the
selection metric improves, a ``best`` checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from rsitr.data.corpus import RetrievalCorpus
from rsitr.data.loading import load_corpus
from rsitr.data.text_views import text_view
from rsitr.errors import ConfigError, RsitrError, TrainingError
from rsitr.faults import crash_point
from rsitr.models import create_method
from rsitr.models.encoders.base import trim_padding
from rsitr.models.methods.base import RetrievalMethod
from rsitr.models.registry import get_method_class
from rsitr.retrieval.embed import (
    average_views,
    embed_from_features,
    evaluate_embeddings,
    evaluate_method,
    image_features,
    save_embeddings,
    text_features,
)
from rsitr.retrieval.metrics import RetrievalMetrics
from rsitr.training.checkpoint import (
    git_commit,
    load_training_state,
    recover_checkpoint,
    save_checkpoint,
)
from rsitr.training.config import TrainConfig
from rsitr.training.distributed import DistInfo, all_gather_with_grad, barrier, init_distributed, wrap_ddp
from rsitr.training.feature_cache import FeatureCache, cache_key, data_fingerprint, text_fingerprint
from rsitr.training.schedule import build_scheduler

logger = logging.getLogger(__name__)

NO_DECAY = ("bias", "norm", "logit_scale", "ln_", "bn")
#: the best checkpoint's val embeddings, one view and the cached views averaged (``rsitr embed`` format)
VAL_EMBEDDINGS = {"plain": "val_embeddings.npz", "tta": "val_embeddings_tta.npz"}


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; optionally request deterministic kernels (warn-only)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; explicit names are checked."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return name


def load_split(cfg: TrainConfig, split: str, source: str | None = None) -> RetrievalCorpus:
    """Read one split of the configured data."""
    from rsitr.data import load_corpus

    d = cfg.data
    if not (source or d.source):
        raise ConfigError("data.source: not set (a caption file or folder)")
    return load_corpus(source or d.source, split=split, fmt=d.format, images=d.images, labels=d.labels)


@dataclass
class FeatureSet:
    """Cached frozen features of one corpus: image features of every view, stacked (V, N, …) per
    key, and caption features."""

    image_stack: dict[str, Tensor]
    image_valid: Tensor
    text: dict[str, Tensor]
    text_views: list[dict[str, Tensor]] = field(default_factory=list)

    @property
    def n_views(self) -> int:
        return next(iter(self.image_stack.values())).shape[0]

    @property
    def image_views(self) -> list[dict[str, Tensor]]:
        """One ``{key: (N, …)}`` per view: slices of the stack, not copies."""
        return [{k: t[i] for k, t in self.image_stack.items()} for i in range(self.n_views)]


@dataclass
class EpochRecord:
    """What one epoch produced (logged to JSONL and kept in the state)."""

    epoch: int
    train: dict[str, float]
    val: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Trainer:
    """Train a method from a :class:`TrainConfig`.

    Args:
        cfg: the resolved configuration.
        resume: continue from ``<out_dir>/last`` if it exists.
        show_progress: draw progress bars (rank 0 only).
        stop_after: end this run after that many epochs (the schedule still spans
            ``optim.epochs``); ``--resume`` continues it. For time-budgeted sessions.
        max_steps: end the epoch after that many optimiser steps, then validate and stop
            (``--smoke``). :attr:`step_seconds` holds the wall time of every step.
        write_checkpoints: save ``best``/``last`` (``--smoke`` does not: a full-size model takes
            longer to write than its two steps take to run).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        show_progress: bool = True,
        stop_after: int | None = None,
        max_steps: int | None = None,
        write_checkpoints: bool = True,
    ) -> None:
        self.cfg = cfg
        self.max_steps = max_steps
        self.write_checkpoints = write_checkpoints
        self.step_seconds: list[float] = []
        self.resume = resume
        self.stop_after = stop_after
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(self.device)
        self.show_progress = show_progress and self.dist.is_main
        self.out = Path(cfg.out_dir)
        self.history: list[dict[str, Any]] = []
        self._scopes: dict[str, RetrievalCorpus | None] = {}
        self._fingerprints: dict[tuple[str, ...], str] = {}  # image paths → data_fingerprint
        self._loaded: dict[str, tuple[dict[str, Tensor], Tensor]] = {}
        self._setup_done = False  # after setup, feature reads are rank 0's alone (no barriers)

    # --- setup -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", record.get("epoch", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, step)

    def _carve_if_needed(self) -> None:
        """Write ``data.source`` from ``data.carve_from`` when it does not exist (rank 0 first)."""
        d = self.cfg.data
        if not d.carve_from or Path(d.source).exists():
            return
        if self.dist.is_main:
            from rsitr.data.splitting import PROFILES, make_split

            if d.carve_profile not in PROFILES:
                raise ConfigError(f"data.carve_profile: unknown profile {d.carve_profile!r}")
            if not d.images:
                raise ConfigError("data.images: needed to carve a split (pHash of every image)")
            path, res = make_split(
                d.carve_from, d.images, PROFILES[d.carve_profile], profile_name=d.carve_profile,
                labels=d.labels, seed=d.carve_seed, out=d.source,
            )  # fmt: skip
            logger.info("data: carved %s (%d val images, profile %s)", path, len(res.val), d.carve_profile)
        barrier()

    def _build_data(self) -> None:
        cfg = self.cfg
        self._carve_if_needed()
        train = load_split(cfg, cfg.data.train_split)
        if cfg.data.max_train_images is not None and cfg.data.max_train_images < train.num_images:
            rng = np.random.default_rng(cfg.seed)
            keep = np.sort(rng.choice(train.num_images, cfg.data.max_train_images, replace=False))
            train = train.subset(keep)
        self.train_corpus, warns = train.drop_blank_captions("train")
        for w in warns:
            logger.warning("%s", w)
        self.label_map = self.train_corpus.label_map()
        self.val_corpus = load_split(cfg, cfg.data.val_split, cfg.data.val_source).drop_blank_captions(
            "eval"
        )[0]
        logger.info(
            "data: train %d images / %d captions, val %d / %d",
            self.train_corpus.num_images,
            self.train_corpus.num_captions,
            self.val_corpus.num_images,
            self.val_corpus.num_captions,
        )

    def _progress(self, label: str) -> Any:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn(label),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not self.show_progress,
            transient=True,
        )

    def _rank0_first(
        self,
        cache: FeatureCache,
        payload: dict[str, Any],
        n: int,
        compute: Any,
        bar: Any,
        task: Any,
        memo: bool = True,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Rank 0 computes (or reads) the cached feature set first; the other ranks then read it.
        With ``memo``, a set already read during setup (train and val share the source-wide caption
        set) is not re-read; image sets are not kept (they are the large ones: each is read, its
        rows copied out, and dropped). Setup then drops the memo, and a later read (the best
        checkpoint's val views, on rank 0 alone) goes to disk with no barrier: every set it needs
        was extracted during setup."""
        if self._setup_done:
            return cache.get(payload, n, compute, lambda d, t: bar.update(task, completed=d))
        key = cache_key(payload)
        if key in self._loaded:
            return self._loaded[key]
        out: tuple[dict[str, Tensor], Tensor] | None = None
        for rank_turn in (True, False):
            if rank_turn == self.dist.is_main:
                out = cache.get(payload, n, compute, lambda d, t: bar.update(task, completed=d))
            barrier()
        assert out is not None
        if memo:
            self._loaded[key] = out
        return out

    def _cache_scope(self, corpus: RetrievalCorpus) -> tuple[RetrievalCorpus, np.ndarray, np.ndarray]:
        """The corpus whose frozen features are cached, and where ``corpus`` sits in it.

        Features are cached for every image and caption of the source file (all its splits), so a
        re-split of the same data (``rsitr data split``) reuses them. Falls back to ``corpus``
        itself when the whole source cannot be read or does not hold every image of it.

        Returns:
            ``(scope, image_rows, caption_rows)``: rows of ``corpus``'s images and captions in
            ``scope``.
        """
        own = (corpus, np.arange(corpus.num_images), np.arange(corpus.num_captions))
        d = self.cfg.data
        key = corpus.source
        if key not in self._scopes:
            try:
                self._scopes[key] = load_corpus(corpus.source, fmt=d.format, images=d.images, labels=d.labels)
            except RsitrError:
                self._scopes[key] = None
        scope = self._scopes[key]
        if scope is None or scope.num_images < corpus.num_images:
            return own
        row_of = {im.filename: i for i, im in enumerate(scope.images)}
        rows = np.array([row_of.get(im.filename, -1) for im in corpus.images], dtype=np.int64)
        if (rows < 0).any():
            return own
        caption_rows = np.empty(corpus.num_captions, dtype=np.int64)
        for i, caps in zip(rows, corpus.image_captions, strict=True):
            free: dict[str, list[int]] = {}
            for c in scope.image_captions[i]:
                free.setdefault(scope.captions[c], []).append(c)
            for c in caps:
                hits = free.get(corpus.captions[c])
                if not hits:
                    return own
                caption_rows[c] = hits.pop(0)
        return scope, rows, caption_rows

    def _features(
        self,
        corpus: RetrievalCorpus,
        views: tuple[str, ...],
        role: str,
        text_views: tuple[str, ...] = ("identity",),
    ) -> FeatureSet:
        """Frozen features of ``corpus`` from the cache (computed once, rank 0 first)."""
        m = self.method
        cache = FeatureCache(self.cfg.cache.dir)
        size = self.cfg.data.image_size or m.image_encoder.image_size
        base = {"method": m.name, "hook": type(m).__qualname__, "image_size": size}
        scope, rows, caption_rows = self._cache_scope(corpus)
        rows_t, caption_rows_t = torch.from_numpy(rows), torch.from_numpy(caption_rows)
        stack: dict[str, Tensor] = {}  # (V, N, …): each view's rows go straight into it
        n_img = scope.num_images
        valid = torch.ones(corpus.num_images, dtype=torch.bool)
        files = tuple(f"{im.filename}:{im.path}" for im in scope.images)
        if files not in self._fingerprints:  # one content hash per scope, not per view and split
            self._fingerprints[files] = data_fingerprint(scope)
        for i, view in enumerate(views):
            payload = {
                **base,
                **m.image_cache_identity(),
                "encoder": m.image_encoder.identity(),
                "view": view,
                "data": self._fingerprints[files],
            }

            def compute(s: int, e: int, view: str = view) -> tuple[dict[str, Tensor], Tensor]:
                return image_features(
                    m, scope, view=view, batch_size=self.cfg.cache.batch_size, device=self.device,
                    num_workers=self.cfg.num_workers, on_error=self.cfg.data.on_error, image_size=size,
                    start=s, stop=e,
                )  # fmt: skip

            with self._progress(f"{role} images [{view}]") as bar:
                task = bar.add_task("", total=n_img)
                feats, ok = self._rank0_first(cache, payload, n_img, compute, bar, task, memo=False)
            _put_rows(stack, i, len(views), feats, rows_t)
            valid &= ok[rows_t]
            del feats  # the source-wide set: peak = the stack + one set
        texts = []
        for tview in text_views:
            payload = {
                **base,
                **m.text_cache_identity(),
                "encoder": m.text_encoder.identity(),
                "text": text_fingerprint(scope.captions),
            }
            if tview != "identity":
                payload["text_view"] = tview

            def compute_text(s: int, e: int, tview: str = tview) -> tuple[dict[str, Tensor], Tensor]:
                f = text_features(m, text_view(scope.captions[s:e], tview, offset=s), device=self.device)
                return f, torch.ones(e - s, dtype=torch.bool)

            with self._progress(f"{role} captions [{tview}]") as bar:
                task = bar.add_task("", total=scope.num_captions)
                text_cache = FeatureCache(self.cfg.cache.dir, shard_size=8192)
                text, _ = self._rank0_first(text_cache, payload, scope.num_captions, compute_text, bar, task)
            texts.append({k: v[caption_rows_t] for k, v in text.items()})
        return FeatureSet(stack, valid, texts[0], texts)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        backbone = {id(p) for p in self.method.param_groups()["backbone"]}
        trainable = [(n, p) for n, p in self.method.named_parameters() if p.requires_grad]
        groups = []
        for group, lr in (("head", o.lr), ("backbone", o.backbone_lr)):
            sel = [(n, p) for n, p in trainable if (id(p) in backbone) == (group == "backbone")]
            decays = [o.decay_norm_bias or (p.ndim > 1 and not any(k in n.lower() for k in NO_DECAY))
                      for n, p in sel]  # fmt: skip
            decay = [p for (_, p), d in zip(sel, decays, strict=True) if d]
            no_decay = [p for (_, p), d in zip(sel, decays, strict=True) if not d]
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": o.weight_decay, "name": group})
            if no_decay:
                groups.append(
                    {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{group}_no_decay"}
                )
        if not groups:
            raise ConfigError(f"method {self.cfg.method!r} has no trainable parameters with this config")
        if o.name == "sgd":
            return torch.optim.SGD(groups, momentum=o.momentum)  # type: ignore[arg-type]
        opt = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return opt(groups, betas=tuple(o.betas))  # type: ignore[arg-type]

    # --- batches -------------------------------------------------------------------------------
    def _sampled_captions(self, usable_img: np.ndarray) -> np.ndarray:
        """Training caption indices of readable images under ``data.caption_sampling``
        (``distinct``: the first caption of each distinct text of an image)."""
        caps = np.flatnonzero(usable_img[self.caption_to_image])
        if self.cfg.data.caption_sampling != "distinct":
            return caps
        text = self.train_corpus.caption_text_ids()
        key = self.caption_to_image[caps] * (int(text.max()) + 1) + text[caps]
        _, first = np.unique(key, return_index=True)
        return np.sort(caps[first])

    def _epoch_batches(self, epoch: int, usable: Tensor) -> list[list[Tensor]]:
        """This rank's micro-batches of caption indices: [[micro]*grad_accum per step]."""
        o = self.cfg.optim
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = usable[torch.randperm(usable.numel(), generator=g)]
        if self.cfg.data.caption_sampling == "image":  # the first caption of each image in ``order``
            _, first = np.unique(self.caption_to_image[order.numpy()], return_index=True)
            order = order[torch.from_numpy(np.sort(first))]
        global_bs = min(o.batch_size, order.numel())
        n_steps = order.numel() // global_bs
        per_micro = global_bs // (self.dist.world_size * o.grad_accum)
        if per_micro < 2:
            raise ConfigError(
                f"optim.batch_size={o.batch_size} is too small for {self.dist.world_size} rank(s) × "
                f"{o.grad_accum} accumulation step(s)"
            )
        steps = []
        for s in range(n_steps):
            batch = order[s * global_bs : (s + 1) * global_bs]
            micros = []
            for a in range(o.grad_accum):
                k = a * self.dist.world_size + self.dist.rank
                micros.append(batch[k * per_micro : (k + 1) * per_micro])
            steps.append(micros)
        return steps

    def _cached_batch(
        self, caps: Tensor, epoch: int, step: int, offset: int, global_bs: int
    ) -> dict[str, Any]:
        """A micro-batch from the cached features. The random view of each pair is drawn for the
        whole global batch of the step and sliced at ``offset``, so every rank layout (and
        ``grad_accum``) sees the views of a one-process run."""
        img_ids = torch.as_tensor(self.caption_to_image[caps.numpy()])
        g = torch.Generator().manual_seed((self.cfg.seed * 7919 + epoch) * 100_003 + step)
        part = slice(offset, offset + len(caps))
        feats = self.train_feats
        assert feats is not None
        views = torch.randint(feats.n_views, (global_bs,), generator=g)[part]  # one cached view per pair
        return {
            "image_feats": {k: v[views, img_ids].to(self.device) for k, v in feats.image_stack.items()},
            "text_feats": self._text_batch(caps, g, part, global_bs),
            "image_id": (caps if self.positives == "diagonal" else img_ids).to(self.device),
            "scene": torch.as_tensor(self.scenes[img_ids.numpy()]).to(self.device),
            **self._text_id(caps),
        }

    def _text_batch(self, caps: Tensor, g: torch.Generator, part: slice, global_bs: int) -> dict[str, Tensor]:
        """Cached caption features of ``caps``, one random text view per pair (drawn as the views)."""
        assert self.train_feats is not None
        tv = self.train_feats.text_views
        if len(tv) <= 1:
            return {k: v[caps].to(self.device) for k, v in self.train_feats.text.items()}
        pick = torch.randint(len(tv), (global_bs,), generator=g)[part]
        return {k: torch.stack([t[k][caps] for t in tv])[pick, torch.arange(len(caps))].to(self.device)
                for k in tv[0]}  # fmt: skip

    def _text_id(self, caps: Tensor) -> dict[str, Tensor]:
        """``{"text_id": …}`` (normalised caption text ids) under ``duplicate_captions: positive``."""
        return {} if self.text_ids is None else {"text_id": self.text_ids[caps].to(self.device)}

    def _raw_loader(self, batches: list[list[Tensor]]) -> Any:
        """Image-loading iterator over this epoch's micro-batches (workers decode in parallel)."""
        from torch.utils.data import DataLoader

        from rsitr.data.datasets import collate_skip_failed

        sampler = [m.tolist() for micros in batches for m in micros]
        return iter(
            DataLoader(
                self.pair_dataset,
                batch_sampler=sampler,
                collate_fn=collate_skip_failed,
                num_workers=self.cfg.num_workers,
            )
        )

    def _raw_batch(self, items: dict[str, Any] | None) -> dict[str, Any] | None:
        """Tokenize a collated micro-batch and move it to the device (None: skip the step)."""
        if items is None or len(items["caption"]) < 2:
            return None
        tok = trim_padding(self.method.tokenize(list(items["caption"])))
        return {
            "image": items["image"].to(self.device),
            "input_ids": tok["input_ids"].to(self.device),
            "attention_mask": tok["attention_mask"].to(self.device),
            "image_id": torch.as_tensor(items[self._id_key]).to(self.device),
            "scene": items["scene"].to(self.device),
            **self._text_id(torch.as_tensor(items["caption_id"])),
        }

    def _check_finite(self, terms: dict[str, Tensor], total: Any, step: int, epoch: int) -> None:
        """Stop on a NaN/inf loss before it reaches the weights; ``last`` keeps the previous epoch.

        Under DDP every rank learns whether any rank saw one, so all stop together.
        """
        finite = torch.isfinite(total.detach()).all()  # type: ignore[union-attr]
        if self.dist.enabled:
            flag = finite.float().reshape(1)  # on this rank's device: CPU for gloo, CUDA for NCCL
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool().all()
        if bool(finite):
            return
        bad = [k for k, v in terms.items() if k.endswith("_loss") and not torch.isfinite(v.detach()).all()]
        raise TrainingError(
            f"non-finite loss at step {step + 1} (epoch {epoch + 1}): "
            f"{', '.join(bad) or 'on another rank'}; the last good checkpoint is {self.out / 'last'} "
            "(lower optim.lr or set optim.clip_grad, then --resume)"
        )

    # --- evaluation ----------------------------------------------------------------------------
    def validate(self) -> RetrievalMetrics:
        """Metrics on the validation split (cached features when available)."""
        self.method.eval()
        if self.val_feats is not None:
            img = embed_from_features(
                self.method.encode_image, self.val_feats.image_views[0], device=self.device
            )
            txt = embed_from_features(self.method.encode_text, self.val_feats.text, device=self.device)
            corpus, valid = self.val_corpus, self.val_feats.image_valid
            if not valid.all():  # unreadable val images: left out with their captions, as evaluate does
                keep = torch.nonzero(valid).flatten()
                caps = [c for i in keep.tolist() for c in corpus.image_captions[i]]
                img, txt, corpus = img[keep], txt[caps], corpus.subset(keep.numpy())
            return evaluate_embeddings(img, txt, corpus, self.cfg.ties)
        return evaluate_method(
            self.method, self.val_corpus, ties=self.cfg.ties, device=self.device,
            num_workers=self.cfg.num_workers,
            on_error=self.cfg.data.on_error,
        )  # fmt: skip

    def _val_extras(self) -> dict[str, Any]:
        """The best checkpoint's val metrics with test-time views (the cached views averaged) and
        with non-transductive QB-Norm (query bank: the training captions and images)."""
        assert self._best_state is not None and self.train_feats is not None
        self.method.load_state_dict(self._best_state)
        self.method.eval()
        views = tuple(self.cfg.cache.views)
        val = self._features(self.val_corpus, views, "val")
        enc_img, enc_txt = self.method.encode_image, self.method.encode_text
        per_view = [embed_from_features(enc_img, f, device=self.device) for f in val.image_views]
        txt = embed_from_features(enc_txt, val.text, device=self.device)
        bank = (
            embed_from_features(enc_img, self.train_feats.image_views[0], device=self.device),
            embed_from_features(enc_txt, self.train_feats.text, device=self.device),
        )
        out: dict[str, Any] = {"tta_views": list(views)}
        for name, img in (("plain", per_view[0]), ("tta", average_views(per_view))):
            if self.dist.is_main:  # for ensembles and rerank tuning: rsitr evaluate-scores / tune-rerank
                save_embeddings(self.out / VAL_EMBEDDINGS[name], img, txt, self.val_corpus)
            for rerank in ("none", "qb-norm"):
                m = evaluate_embeddings(
                    img, txt, self.val_corpus, self.cfg.ties, rerank, bank=bank if rerank != "none" else None
                )
                key = name if rerank == "none" else f"{name}+qb-norm"
                out[key] = {"mR": round(m.mR, 2), "i2t": m.i2t, "t2i": m.t2i}
        logger.info(
            "best checkpoint on val: mR %.2f, with test-time views %.2f, QB-Norm %.2f, both %.2f",
            out["plain"]["mR"], out["tta"]["mR"], out["plain+qb-norm"]["mR"], out["tta+qb-norm"]["mR"],
        )  # fmt: skip
        return out

    # --- main loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train, validate every ``eval_every`` epochs, checkpoint; returns the summary."""
        cfg = self.cfg
        t_start = time.perf_counter()
        seed_everything(cfg.seed, cfg.deterministic)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if cfg.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        config_yaml = yaml.safe_dump({**cfg.to_dict(), "git_commit": git_commit()}, sort_keys=False)
        if self.dist.is_main:
            (self.out / "config.yaml").write_text(config_yaml)
        self._build_data()
        model_cfg = dict(cfg.model)
        # model.positives: which pairs of a batch are positives, for every method. ``image``: the
        # captions of the same image (the default); ``diagonal``: only the pair itself (the
        # papers' batch diagonal), done by giving each pair its caption index as its id.
        self.positives = model_cfg.pop("positives", "image")
        if self.positives not in ("image", "diagonal"):
            raise ConfigError(f"model.positives: {self.positives!r} is not one of image, diagonal")
        if self.positives == "diagonal" and cfg.data.duplicate_captions == "positive":
            raise ConfigError("model.positives=diagonal contradicts data.duplicate_captions=positive")
        self._id_key = "caption_id" if self.positives == "diagonal" else "image_id"
        fields = {f.name for f in dataclasses.fields(get_method_class(cfg.method).Config)}
        if "num_classes" in fields and not model_cfg.get("num_classes"):
            model_cfg["num_classes"] = len(self.label_map)  # scene classes of the training split
        self.method: RetrievalMethod = create_method(cfg.method, model_cfg, pretrained=cfg.pretrained).to(
            self.device
        )
        groups = self.method.param_groups()
        n_train = sum(p.numel() for g in groups.values() for p in g)
        n_all = sum(p.numel() for p in self.method.parameters())
        self.n_trainable, self.n_params = n_train, n_all
        logger.info(
            "method %s: %d trainable of %d parameters (%.2f%%)",
            cfg.method,
            n_train,
            n_all,
            100 * n_train / max(1, n_all),
        )
        if hasattr(self.method, "trainable_summary"):
            logger.info("trainable parameters by part: %s", self.method.trainable_summary())
        use_cache = cfg.cache.enabled == "on" or (cfg.cache.enabled == "auto" and self.method.cacheable)
        if use_cache and not self.method.cacheable:
            raise ConfigError("cache.enabled=on needs frozen towers (model.freeze_image/freeze_text)")
        self.caption_to_image = self.train_corpus.caption_to_image()
        self.scenes = np.asarray(self.train_corpus.scene_ids(self.label_map), dtype=np.int64)
        self.text_ids = (
            torch.from_numpy(self.train_corpus.caption_text_ids())
            if cfg.data.duplicate_captions == "positive"
            else None
        )
        t_feat = time.perf_counter()
        self.train_feats = self.val_feats = None
        if use_cache:
            self.train_feats = self._features(
                self.train_corpus, tuple(cfg.cache.views), "train", tuple(cfg.cache.text_views)
            )
            self.val_feats = self._features(self.val_corpus, ("identity",), "val")
            usable_img = self.train_feats.image_valid.numpy()
            self._loaded.clear()
            self._setup_done = True
        else:
            from rsitr.data.datasets import CaptionPairDataset
            from rsitr.data.transforms import build_train_transform

            enc = self.method.image_encoder
            size = cfg.data.image_size or enc.image_size
            self.pair_dataset = CaptionPairDataset(
                self.train_corpus,
                build_train_transform(cfg.data.augment, size, enc.mean, enc.std),
                self.label_map,
                on_error=cfg.data.on_error,
            )
            usable_img = np.ones(self.train_corpus.num_images, dtype=bool)
        feature_seconds = time.perf_counter() - t_feat
        usable = torch.from_numpy(self._sampled_captions(usable_img))

        if self.dist.enabled:
            self.method.gather = all_gather_with_grad
            model: torch.nn.Module = wrap_ddp(self.method, self.device)
        else:
            model = self.method
        optimizer = self._optimizer()
        steps_per_epoch = len(self._epoch_batches(0, usable))
        self.method.set_schedule(steps_per_epoch)
        o = cfg.optim
        scheduler = build_scheduler(
            optimizer, steps_per_epoch * o.epochs, o.warmup_steps, o.schedule,
            steps_per_epoch=steps_per_epoch, milestones=o.milestones, gamma=o.gamma, floor=o.lr_floor,
            decay_epochs=o.decay_epochs,
        )  # fmt: skip
        start_epoch, step, best = 0, 0, -math.inf
        best_epoch = -1
        self._best_state: dict[str, Tensor] | None = None
        last_dir, best_dir = self.out / "last", self.out / "best"
        if self.resume and recover_checkpoint(last_dir) is not None:
            state = load_training_state(last_dir, self.method, optimizer)
            start_epoch, step, best = state["epoch"], state["step"], state["best"]
            best_epoch = state.get("best_epoch", -1)
            self.history = state.get("history", [])
            scheduler.load_state_dict(state["scheduler"])
            logger.info("resumed from %s at epoch %d (step %d)", last_dir, start_epoch, step)
        elif self.resume:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", last_dir)

        amp = cfg.amp and self.device.startswith("cuda")
        train_seconds = 0.0
        end_epoch = (
            cfg.optim.epochs
            if self.stop_after is None
            else min(cfg.optim.epochs, start_epoch + self.stop_after)
        )
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 31 + epoch)  # dropout: the same on a resumed run
            self.method.train()
            sums: dict[str, float] = {}
            batches = self._epoch_batches(epoch, usable)
            raw = None if use_cache else self._raw_loader(batches)
            with self._progress(f"epoch {epoch + 1}/{cfg.optim.epochs}") as bar:
                task = bar.add_task("", total=len(batches))
                for done, micros in enumerate(batches, start=1):
                    if self.max_steps is not None and step >= self.max_steps:
                        break
                    t_step = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    for a, micro in enumerate(micros):
                        if raw is None:
                            offset = (a * self.dist.world_size + self.dist.rank) * len(micro)
                            global_bs = len(micro) * len(micros) * self.dist.world_size
                            batch = self._cached_batch(micro, epoch, step, offset, global_bs)
                        else:
                            batch = self._raw_batch(next(raw))
                        if batch is None:
                            continue
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                            terms = model(batch)
                        total = sum(v for k, v in terms.items() if k.endswith("_loss"))
                        self._check_finite(terms, total, step, epoch)
                        (total / len(micros)).backward()  # type: ignore[union-attr]
                        for k, v in terms.items():
                            sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micros)
                        sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / len(micros)  # type: ignore[union-attr]
                    if cfg.optim.clip_grad > 0:
                        torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    scheduler.step()
                    self.method.on_step_end()
                    if self.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    self.step_seconds.append(time.perf_counter() - t_step)
                    step += 1
                    crash_point(f"step-{step}")
                    bar.update(task, advance=1)
                    if step % cfg.log_every == 0:
                        running = {f"train/{k}": v / max(1, done) for k, v in sums.items()}
                        self._log({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **running})
            self.method.on_epoch_end()
            train_seconds += time.perf_counter() - t0
            rec = EpochRecord(epoch + 1, {k: v / max(1, len(batches)) for k, v in sums.items()})
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
                metrics = self.validate()
                rec.val = metrics.to_dict()
                score = metrics.mR if cfg.select_metric == "mR" else _lookup(rec.val, cfg.select_metric)
                if score > best and self.dist.is_main:
                    best, best_epoch = score, epoch + 1
                    self._best_state = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
                    if self.write_checkpoints:
                        save_checkpoint(
                            best_dir, self.method, None, {"epoch": epoch + 1, "val": rec.val}, config_yaml
                        )
            rec.seconds = round(time.perf_counter() - t0, 2)
            self.history.append(rec.__dict__)
            self._log(
                {
                    "epoch": epoch + 1,
                    **{f"train/{k}": v for k, v in rec.train.items()},
                    **_flat("val", rec.val),
                }
            )
            if self.dist.is_main:
                logger.info(
                    "epoch %d: loss %.4f%s",
                    epoch + 1,
                    rec.train.get("loss", float("nan")),
                    f", val mR {rec.val['mR']:.2f}" if rec.val else "",
                )
                state = {
                    "epoch": epoch + 1, "step": step, "best": best, "best_epoch": best_epoch,
                    "history": self.history, "seed": cfg.seed, "scheduler": scheduler.state_dict(),
                }  # fmt: skip
                if self.write_checkpoints:
                    save_checkpoint(last_dir, self.method, optimizer, state, config_yaml)
            barrier()
        summary = {
            "method": cfg.method,
            "best_epoch": best_epoch,
            f"best_val_{cfg.select_metric}": best,
            "best_val": next((h["val"] for h in self.history if h["epoch"] == best_epoch), {}),
            "epochs": cfg.optim.epochs,
            "feature_seconds": round(feature_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "checkpoint": str(best_dir),
            "ties": cfg.ties,
            "trainable_params": self.n_trainable,
            "total_params": self.n_params,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
        }
        if self.dist.is_main and self.train_feats is not None and self._best_state is not None:
            summary["best_val_extras"] = self._val_extras()
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.tb is not None:
            self.tb.close()
        return summary


def _lookup(d: dict[str, Any], dotted: str) -> float:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"select_metric: {dotted!r} is not in the validation report")
        node = node[part]
    return float(node)


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(f"{prefix}/{k}", v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = v
    return out


def _put_rows(stack: dict[str, Tensor], i: int, n_views: int, feats: dict[str, Tensor], rows: Tensor) -> None:
    """Copy ``rows`` of one view's source-wide ``feats`` into ``stack[k][i]`` (allocating the
    (V, N, …) stack on the first view), holding no reference to ``feats`` afterwards."""
    for k, v in feats.items():
        if k not in stack:
            stack[k] = torch.empty((n_views, len(rows), *v.shape[1:]), dtype=v.dtype)
        torch.index_select(v, 0, rows, out=stack[k][i])


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process in MiB: CUDA's allocator peak on a GPU, else the peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
