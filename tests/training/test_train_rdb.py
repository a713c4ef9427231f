"""RDB through the trainer: cached half-precision prefixes, scene labels, EMA teacher, resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rsitr.cli import run
from rsitr.models.checkpoint import load_method
from rsitr.training import Trainer, load_config
from tests.training.conftest import tiny_overrides


def _rdb_overrides(synth: Path, out: Path, **extra: object) -> list[str]:
    rdb = {
        "method": "rdb",
        "model.image_encoder": "efficientnet-lite0",
        "model.text_encoder": "minilm-l6",
        "model.image_encoder_kwargs": "{}",
        "model.text_encoder_kwargs": "{max_length: 16}",
        "model.image_layers": 1,
        "model.text_layers": 1,
        "model.bottleneck": 32,
        "model.heads": 2,
        "model.head": "linear",
        "model.embed_dim": 32,
        "cache.enabled": "on",
        "cache.views": "[identity, hflip]",
        **extra,
    }
    args = [
        a
        for a in tiny_overrides(synth, out)
        if not a.startswith(("model.freeze", "model.embed_dim", "model.head"))
    ]
    return args + [f"{k}={v}" for k, v in rdb.items()]


def test_rdb_trains_from_cache_and_resumes(tiny_synth: Path, tmp_path: Path) -> None:
    cfg = load_config(None, _rdb_overrides(tiny_synth, tmp_path / "a", **{"optim.epochs": 2}))
    summary = Trainer(cfg, show_progress=False).fit()
    run_dir = tmp_path / "a" / "run"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if "train/itc" in r][-1]
    assert {"train/cls", "train/ema", "train/w_itc", "train/dtcl_loss"} <= set(last)
    assert summary["best_epoch"] >= 1
    # the cache holds the frozen prefixes in half precision
    shards = list((tmp_path / "a" / "cache").rglob("shard_00000.safetensors"))
    dtypes = {v.dtype for s in shards for k, v in load_file(str(s)).items() if k.startswith("feat.y")}
    assert dtypes == {torch.float16}
    # the checkpoint rebuilds the method with the number of scene classes found in training
    m = load_method(run_dir / "best" / "model.safetensors")
    assert m.cfg.num_classes == 12 and m.classifier is not None
    assert m.encode_text(**m.tokenize(["a plane"])).shape == (1, 32)
    # the EMA teacher moved away from the student's initial weights, and lags the trained student
    from rsitr.models import create_method
    from rsitr.training.trainer import seed_everything

    seed_everything(cfg.seed, cfg.deterministic)
    model_cfg = {**cfg.model, "num_classes": 12}
    init = dict(create_method("rdb", model_cfg, pretrained=False).named_parameters())
    student = dict(m.named_parameters())
    assert m.teacher is not None and m.step.item() > 0 and m.teacher.names
    teacher = {n: getattr(m.teacher, f"p{i}") for i, n in enumerate(m.teacher.names)}
    assert any(not torch.equal(teacher[n], init[n].detach()) for n in teacher)
    assert any(not torch.equal(teacher[n], student[n].detach()) for n in teacher)

    # rsitr evaluate --report writes the Fig. 1 motivation plot (before / after, by scene)
    report = tmp_path / "report"
    argv = ["evaluate", str(run_dir / "best"), "--data", str(tiny_synth / "dataset_synth.json"), "--images",
            str(tiny_synth / "images"), "--split", "test", "--json", "--report", str(report)]  # fmt: skip
    assert run(argv) == 0
    knn = json.loads((report / "embeddings_knn.json").read_text())
    assert set(knn) == {
        "frozen towers/image",
        "frozen towers/text",
        "trained (rdb)/image",
        "trained (rdb)/text",
    }
    assert all(0 <= v <= 100 for v in knn.values())
    assert (report / "embeddings_pca.png").stat().st_size > 1000

    # an interrupted run resumed to the end gives the same weights (teacher and step included)
    b = tmp_path / "b"
    Trainer(load_config(None, _rdb_overrides(tiny_synth, b, **{"optim.epochs": 2})), show_progress=False,
            stop_after=1).fit()  # fmt: skip
    Trainer(load_config(None, _rdb_overrides(tiny_synth, b, **{"optim.epochs": 2})), resume=True,
            show_progress=False).fit()  # fmt: skip
    wa = load_file(str(run_dir / "last" / "model.safetensors"))
    wb = load_file(str(b / "run" / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # CPU resume is deterministic: bit for bit, and finite
        if k == "weighting.history":  # DWA's two-epoch history: NaN marks "not yet" (unused by A7)
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, equal_nan=True)
            continue
        assert torch.isfinite(wa[k].float()).all(), k
        assert torch.equal(wa[k], wb[k]), k
