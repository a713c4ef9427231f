"""``rsitr train CONFIG --smoke``: what to run before renting a GPU.

The config's own method and architecture, with random weights (nothing is downloaded), train two
optimiser steps and evaluate once on a tiny synthetic corpus, through the real Trainer (feature
cache, DDP wrapper; no checkpoint is written). A text tower named by a hub id that is not on this machine
is replaced by a named substitute: the same architecture where its config is known
(``bert-base-uncased``: BERT-base, with MiniLM's identical uncased WordPiece vocabulary), else a
tiny BERT. The report gives the parameter counts (used at inference, and trained), the time per
optimiser step and the peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from rsitr.training.config import TrainConfig

__all__ = ["run_smoke", "SMOKE_STEPS"]

_logger = logging.getLogger(__name__)

#: optimiser steps a smoke run takes
SMOKE_STEPS = 2
#: pairs per step in a smoke run
SMOKE_BATCH = 8

#: hub text towers whose architecture is known without the hub: name → transformers BertConfig kwargs
_KNOWN_BERT: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {},  # BertConfig's defaults are BERT-base (uncased vocabulary, 30,522)
}
_TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 128}


def _hub_text_substitute(spec: str, folder: Path) -> tuple[str, str] | None:
    """``(new spec, what it is)`` for an ``hf:<hub id>`` spec that is not on this machine."""
    from rsitr.models.encoders.hf_text import is_local_source

    if not spec.startswith("hf:"):
        return None
    name = spec[3:]
    if is_local_source(name):
        return None  # a local folder: used as it is
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)  # in the local Hugging Face cache: nothing to substitute
        return None
    except OSError:
        pass
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rsitr.models.encoders._weights import package_dir
    from rsitr.models.encoders.minilm import WHEEL_PACKAGE

    known = name.split("/")[-1] in _KNOWN_BERT
    kwargs = _KNOWN_BERT.get(name.split("/")[-1], _TINY_BERT)
    folder.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(str(package_dir(WHEEL_PACKAGE, "minilm-l6") / "model")).save_pretrained(
        folder
    )
    BertModel(BertConfig(**kwargs)).save_pretrained(folder)
    what = (
        f"{name}: its architecture, random, with MiniLM's uncased vocabulary"
        if known
        else f"{name}: not on this machine; a tiny BERT ({_TINY_BERT['num_hidden_layers']} layers, "
        f"{_TINY_BERT['hidden_size']} wide) stands in"
    )
    return f"hf:{folder}", what


def _smoke_config(cfg: TrainConfig, work: Path) -> tuple[TrainConfig, list[str]]:
    """The config, pointed at a tiny synthetic corpus, with random weights and substitutes."""
    from rsitr.data.synth import generate_scenes

    synth = work / "synth"
    generate_scenes(synth, n=24, size=64, seed=0, val_frac=1 / 6, test_frac=1 / 6, workers=1)
    model, notes = dict(cfg.model), []
    for key in ("image_encoder", "text_encoder"):
        sub = _hub_text_substitute(str(model.get(key, "")), work / f"substitute_{key}")
        if sub is not None:
            model[key], what = sub
            notes.append(f"model.{key} = {what}")
    data = dataclasses.replace(
        cfg.data, source=str(synth / "dataset_synth.json"), images=str(synth / "images"),
        labels=str(synth / "labels.csv"), format=None, train_split="train", val_split="val",
        val_source=None, carve_from=None, max_train_images=None,
    )  # fmt: skip
    optim = dataclasses.replace(
        cfg.optim, epochs=1, grad_accum=1, batch_size=SMOKE_BATCH,
        warmup_steps=0 if isinstance(cfg.optim.warmup_steps, int) else 0.0,
    )  # fmt: skip
    cache = dataclasses.replace(cfg.cache, dir=str(work / "cache"))
    smoke = dataclasses.replace(
        cfg, model=model, data=data, optim=optim, cache=cache, out_dir=str(work / "run"),
        pretrained=False, num_workers=0, eval_every=1, tensorboard=False, log_every=1,
    )  # fmt: skip
    return smoke, notes


def inference_parameters(method: torch.nn.Module, images: torch.Tensor, texts: list[str]) -> int:
    """Parameters that an embedding of ``images`` and ``texts`` depends on (training-only parts,
    such as MSCMAT, ITM/MLM heads, momentum encoders and teachers, do not count)."""
    flags = {p: p.requires_grad for p in method.parameters()}
    was = method.training
    try:
        for p in flags:
            p.requires_grad_(True)
            p.grad = None
        method.eval()
        tok = method.tokenize(texts)
        with torch.enable_grad():
            img = method.embed_image(method.image_features(images))
            txt = method.embed_text(method.text_features(tok["input_ids"], tok["attention_mask"]))
            (img.float().sum() + txt.float().sum()).backward()
        return sum(p.numel() for p in flags if p.grad is not None)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        method.train(was)


def run_smoke(cfg: TrainConfig, config_name: str = "", work_dir: str | Path | None = None) -> dict[str, Any]:
    """Two optimiser steps and one evaluation of ``cfg``'s method on a tiny synthetic corpus.

    Args:
        cfg: the resolved training config (as ``rsitr train`` would run it).
        config_name: the config file, for the report.
        work_dir: where the corpus, cache and run go (a temporary folder by default).

    Returns:
        The report: ``config``, ``method``, ``substitutes``, ``params_inference``,
        ``params_trained``, ``params_total``, ``step_seconds``, ``peak_memory_mb``, ``val_mR``,
        ``device``.
    """
    from rsitr.training.trainer import Trainer, peak_memory_mb

    with tempfile.TemporaryDirectory(prefix="rsitr-smoke-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        smoke, notes = _smoke_config(cfg, work)
        for n in notes:
            _logger.info("smoke: %s", n)
        trainer = Trainer(smoke, show_progress=False, max_steps=SMOKE_STEPS, write_checkpoints=False)
        if trainer.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        summary = trainer.fit()
        method = trainer.method
        size = smoke.data.image_size or method.image_encoder.image_size
        images = torch.randn(2, 3, size, size, device=trainer.device)
        n_inference = inference_parameters(method, images, ["a plane at the airport", "green trees"])
        steps = trainer.step_seconds
        report = {
            "config": config_name,
            "method": smoke.method,
            "image_encoder": smoke.model.get("image_encoder"),
            "text_encoder": smoke.model.get("text_encoder"),
            "substitutes": notes,
            "params_inference": n_inference,
            "params_trained": summary["trainable_params"],
            "params_total": summary["total_params"],
            "steps": len(steps),
            "step_seconds": round(sum(steps) / max(1, len(steps)), 3),
            "peak_memory_mb": round(peak_memory_mb(trainer.device), 1),
            "val_mR": round(float(summary["best_val"].get("mR", float("nan"))), 2),
            "device": trainer.device,
        }
        if work_dir is not None:
            (work / "smoke.json").write_text(json.dumps(report, indent=1))
        return report
