"""Train → checkpoint → resume → evaluate, end to end on a tiny synthetic corpus (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsitr.cli import run
from rsitr.models.checkpoint import load_method, read_metadata
from rsitr.training import Trainer, load_config
from tests.training.conftest import tiny_overrides


def test_train_resume_evaluate(tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A full 4-epoch run, and a 2-epoch run resumed to 4 epochs, must give identical weights.
    full = Trainer(
        load_config(None, tiny_overrides(tiny_synth, tmp_path / "full", **{"optim.epochs": 4})),
        show_progress=False,
    )
    summary = full.fit()
    assert summary["best_epoch"] >= 1
    first = load_config(None, tiny_overrides(tiny_synth, tmp_path / "res", **{"optim.epochs": 4}))
    Trainer(first, show_progress=False, stop_after=2).fit()  # an interrupted run
    state = json.loads((tmp_path / "res" / "run" / "last" / "state.json").read_text())
    assert state["epoch"] == 2
    second = load_config(None, tiny_overrides(tiny_synth, tmp_path / "res", **{"optim.epochs": 4}))
    Trainer(second, resume=True, show_progress=False).fit()
    a = load_file(str(tmp_path / "full" / "run" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "res" / "run" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k

    # Logs, resolved config and a checkpoint that loads without its config file.
    run_dir = tmp_path / "full" / "run"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert any("val/mR" in r for r in log) and any("train/infonce_loss" in r for r in log)
    assert (run_dir / "config.yaml").exists()
    meta = read_metadata(run_dir / "best")
    assert meta["method"] == "dual"
    method = load_method(run_dir / "best" / "model.safetensors")
    assert method.encode_text(**method.tokenize(["a plane"])).shape == (1, 32)

    # Evaluate through the CLI on the test split: JSON schema, and learning above chance.
    argv = [
        "evaluate", str(run_dir / "best"), "--data", str(tiny_synth / "dataset_synth.json"),
        "--images", str(tiny_synth / "images"), "--split", "test", "--json", "--report", str(tmp_path / "report"),
    ]  # fmt: skip
    assert run(argv) == 0
    d = json.loads(capsys.readouterr().out)
    for key in (
        "i2t",
        "t2i",
        "mR",
        "ties",
        "rerank",
        "n_images",
        "n_captions",
        "seconds",
        "checkpoint",
        "data",
    ):
        assert key in d
    assert d["n_images"] == 20 and d["n_captions"] == 100
    chance = 100 * (1 + 5 + 10) / 3 / 20  # mean of R@1/5/10 for random ranking of 20 images
    assert d["mR"] > chance + 5
    assert (tmp_path / "report" / "scenes.csv").exists() and (tmp_path / "report" / "gallery.png").exists()


def test_feature_cache_resumes_and_is_reused(tiny_synth: Path, tmp_path: Path) -> None:
    from rsitr.data import load_corpus
    from rsitr.models import create_method
    from rsitr.retrieval.embed import image_features
    from rsitr.training.feature_cache import FeatureCache, data_fingerprint

    corpus = load_corpus(tiny_synth / "dataset_synth.json", split="val", images=tiny_synth / "images")
    method = create_method(
        "dual", {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text"}, pretrained=False
    )
    cache = FeatureCache(tmp_path, shard_size=8)
    payload = {"enc": method.image_encoder.identity(), "data": data_fingerprint(corpus)}
    calls: list[tuple[int, int]] = []

    def compute(s: int, e: int):
        calls.append((s, e))
        if len(calls) == 2 and not (tmp_path / "stop").exists():
            (tmp_path / "stop").touch()
            raise KeyboardInterrupt  # simulated interruption after one shard
        return image_features(method, corpus, image_size=64, start=s, stop=e)

    with pytest.raises(KeyboardInterrupt):
        cache.get(payload, corpus.num_images, compute)
    feats, valid = cache.get(payload, corpus.num_images, compute)
    assert calls[0] == (0, 8) and calls[2] == (8, 16)  # resumed at the second shard
    assert valid.all() and feats["pooled"].shape[0] == corpus.num_images
    n = len(calls)
    again, _ = cache.get(payload, corpus.num_images, compute)
    assert len(calls) == n and torch.equal(again["pooled"], feats["pooled"])  # served from disk
    direct, _ = image_features(method, corpus, image_size=64)
    assert torch.allclose(direct["pooled"], feats["pooled"], atol=1e-5)
