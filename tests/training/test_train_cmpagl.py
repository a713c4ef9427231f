"""CMPAGL through the trainer: one tiny epoch, its checkpoint, and evaluation with SMR by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsitr.cli import run
from rsitr.models.checkpoint import load_method
from rsitr.training import Trainer, load_config


def _overrides(synth: Path, out: Path) -> list[str]:
    values = {
        "method": "cmpagl",
        "data.source": synth / "dataset_synth.json",
        "data.images": synth / "images",
        "data.labels": synth / "labels.csv",
        "data.image_size": 64,
        "data.max_train_images": 16,
        "model.image_encoder": "gswin-tiny",
        "model.image_encoder_kwargs": "{embed_dim: 8, num_heads: [1, 1, 2, 2], window: 4, image_size: 64}",
        "model.text_encoder": "minilm-l6",
        "model.text_encoder_kwargs": "{max_length: 16}",
        "model.embed_dim": 32,
        "model.triplet_reduction": "mean",
        "optim.epochs": 1,
        "optim.batch_size": 16,
        "optim.lr": 1e-3,
        "optim.backbone_lr": 1e-4,
        "cache.enabled": "auto",
        "cache.dir": out / "cache",
        "out_dir": out / "run",
        "log_every": 1,
        "pretrained": "false",
    }
    return [f"{k}={v}" for k, v in values.items()]


def test_train_checkpoint_evaluate(
    tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = Trainer(load_config(None, _overrides(tiny_synth, tmp_path)), show_progress=False)
    summary = trainer.fit()
    assert summary["best_epoch"] == 1 and summary["trainable_params"] > 0
    assert summary["peak_memory_mb"] > 50  # the process's peak RSS (torch alone is more)
    assert trainer.method.queue.size == 80  # 65,536 capped to the 16 images × 5 captions per epoch
    run_dir = tmp_path / "run"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r]
    assert steps and all(f"train/{t}_loss" in steps[0] for t in ("itc", "triplet", "itm", "mlm"))
    method = load_method(run_dir / "best")
    assert method.name == "cmpagl"
    argv = [
        "evaluate", str(run_dir / "best"), "--data", str(tiny_synth / "dataset_synth.json"),
        "--images", str(tiny_synth / "images"), "--split", "val", "--json",
    ]  # fmt: skip
    assert run([*argv, "--report", str(tmp_path / "report")]) == 0
    assert json.loads(capsys.readouterr().out)["rerank"] == "smr"  # --rerank auto: the method's default
    assert (tmp_path / "report" / "cmpagl_fig7_attention.png").is_file()  # Fig. 7
    assert run([*argv, "--rerank", "none"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["rerank"] == "none"
    assert run([*argv, "--itm-rescore", "3"]) == 0  # ALBEF-style ITM re-scoring of the top 3
    itm = json.loads(capsys.readouterr().out)
    assert itm["rerank"] == "itm@3" and itm["n_captions"] == plain["n_captions"]
    # Candidates outside the top 3 keep their ITC order, so R@10 cannot change; R@1 may.
    assert itm["i2t"]["R@10"] == plain["i2t"]["R@10"] and itm["t2i"]["R@10"] == plain["t2i"]["R@10"]
    assert run([*argv, "--itm-rescore", "3", "--rerank", "smr"]) == 2
