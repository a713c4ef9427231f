"""Round trips and training switches with no test before: checkpoints of every method bit for bit,
``load_method`` on wrong files, the feature cache when an image changes, ``grad_accum`` and
``clip_grad``; and the ``embed`` and ``runs`` commands."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rsitr.cli import run
from rsitr.errors import DataError
from rsitr.models import create_method
from rsitr.models.checkpoint import load_method, save_method
from rsitr.training import Trainer, load_config
from tests.models.test_methods import OVERRIDES, TINY
from tests.training.conftest import tiny_overrides


@pytest.mark.parametrize("name", ["dual", "msa", "rdb"])
def test_checkpoint_round_trip_bit_for_bit(name: str, tmp_path: Path) -> None:
    import dataclasses

    from rsitr.models import get_method_class

    known = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    cfg = {k: v for k, v in {**TINY, **OVERRIDES.get(name, {})}.items() if k in known}
    torch.manual_seed(0)
    m = create_method(name, cfg, pretrained=False).eval()
    with torch.no_grad():  # move every weight away from its initialisation, buffers included
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_method(m, tmp_path / "model.safetensors")
    back = load_method(path)
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # bit for bit (NaN where both hold NaN: RDB's empty DWA history)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    tok = m.tokenize(["a plane beside a terminal", "a river"])
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(m.encode_image(x), back.encode_image(x))
    assert torch.equal(m.encode_text(**tok), back.encode_text(**tok))


def test_load_method_rejects_wrong_files_in_one_line(tmp_path: Path) -> None:
    cases = {
        "missing": tmp_path / "nothing" / "model.safetensors",
        "text": tmp_path / "text.safetensors",
        "no_metadata": tmp_path / "plain.safetensors",
    }
    cases["text"].write_text("not a checkpoint")
    save_file({"w": torch.zeros(2)}, str(cases["no_metadata"]))
    messages = {}
    for key, path in cases.items():
        with pytest.raises(DataError) as err:
            load_method(path)
        messages[key] = str(err.value)
        assert "\n" not in messages[key] and str(path.name) in messages[key]
    assert "no such checkpoint" in messages["missing"]
    assert "not an rsitr checkpoint" in messages["no_metadata"]
    assert "not a safetensors checkpoint" in messages["text"]


def _cached(synth: Path, out: Path, **extra: object) -> list[str]:
    """Frozen tiny towers trained from the feature cache (one view, dropout 0)."""
    values = {"model.freeze_image": "true", "model.freeze_text": "true", "cache.enabled": "on",
              "cache.views": "[identity]", "data.max_train_images": 16, "optim.epochs": 1,
              "model.dropout": 0.0, **extra}  # fmt: skip
    return tiny_overrides(synth, out, **values)


def test_feature_cache_is_recomputed_for_a_changed_image(tiny_synth: Path, tmp_path: Path) -> None:
    synth = tmp_path / "synth"
    shutil.copytree(tiny_synth, synth)
    cache = tmp_path / "cache"

    def feature_sets() -> set[Path]:
        return {p.parent for p in cache.rglob("shard_*.safetensors")}

    for run_name in ("a", "b"):
        cfg = load_config(None, _cached(synth, tmp_path / run_name, **{"cache.dir": cache}))
        Trainer(cfg, show_progress=False).fit()
        if run_name == "a":
            first = feature_sets()
    assert feature_sets() == first and len(first) == 2  # images and captions; reused when unchanged
    victim, other = sorted((synth / "images").glob("*.jpg"))[:2]
    st = other.stat()  # a re-mount or copy of the same files: new mtimes, same bytes
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Trainer(
        load_config(None, _cached(synth, tmp_path / "t", **{"cache.dir": cache})), show_progress=False
    ).fit()
    assert feature_sets() == first  # the features are keyed by content, not mtime
    victim.write_bytes(other.read_bytes())  # same name, new pixels (size and mtime change)
    Trainer(
        load_config(None, _cached(synth, tmp_path / "c", **{"cache.dir": cache})), show_progress=False
    ).fit()
    assert len(feature_sets() - first) == 1  # the image features again; the caption features reused


def test_grad_accum_averages_the_micro_batch_gradients(tiny_synth: Path, tmp_path: Path) -> None:
    """One step with ``grad_accum=2`` is plain SGD on the mean of the two micro-batches' gradients."""
    from rsitr.training.trainer import seed_everything

    extra = {"optim.batch_size": 16, "optim.grad_accum": 2, "optim.name": "sgd", "optim.momentum": 0.0,
             "optim.lr": 0.05, "optim.backbone_lr": 0.05, "optim.warmup_steps": 0,
             "optim.schedule": "constant", "optim.weight_decay": 0.0}  # fmt: skip
    cfg = load_config(None, _cached(tiny_synth, tmp_path, **extra))
    t = Trainer(cfg, show_progress=False, max_steps=1)
    t.fit()
    seed_everything(cfg.seed, cfg.deterministic)
    model_cfg = {k: v for k, v in cfg.model.items() if k != "positives"}
    m = create_method("dual", model_cfg, pretrained=False)
    m.train()
    usable = torch.from_numpy(t._sampled_captions(t.train_feats.image_valid.numpy()))
    micros = t._epoch_batches(0, usable)[0]
    assert len(micros) == 2 and all(len(mb) == 8 for mb in micros)
    for a, micro in enumerate(micros):
        terms = m(t._cached_batch(micro, 0, 0, a * 8, 16))
        (sum(v for k, v in terms.items() if k.endswith("_loss")) / 2).backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    want, got = m.state_dict(), t.method.state_dict()
    moved = [
        k
        for k in want
        if not torch.equal(want[k], create_method("dual", model_cfg, pretrained=False).state_dict()[k])
    ]
    assert moved
    for k in want:
        assert torch.allclose(want[k].float(), got[k].float(), atol=1e-6), k


def test_clip_grad_bounds_every_update(tiny_synth: Path, tmp_path: Path) -> None:
    extra = {"optim.name": "sgd", "optim.momentum": 0.0, "optim.lr": 0.1, "optim.warmup_steps": 0,
             "optim.schedule": "constant", "optim.batch_size": 16, "optim.weight_decay": 0.0}  # fmt: skip
    free = Trainer(
        load_config(None, _cached(tiny_synth, tmp_path / "free", **extra)), show_progress=False, max_steps=3
    )
    free.fit()
    clipped = Trainer(
        load_config(None, _cached(tiny_synth, tmp_path / "clip", **extra, **{"optim.clip_grad": 1e-4})),
        show_progress=False, max_steps=3,
    )  # fmt: skip
    clipped.fit()
    torch.manual_seed(0)
    from rsitr.training.trainer import seed_everything

    seed_everything(clipped.cfg.seed, clipped.cfg.deterministic)
    model_cfg = {k: v for k, v in clipped.cfg.model.items() if k != "positives"}
    init = create_method("dual", model_cfg, pretrained=False).state_dict()
    trainable = [n for n, p in clipped.method.named_parameters() if p.requires_grad]

    def change(t: Trainer) -> float:
        now = t.method.state_dict()
        return float(torch.sqrt(sum(((now[n] - init[n]) ** 2).sum() for n in trainable)))

    assert change(clipped) <= 3 * 0.1 * 1e-4 * (1 + 1e-4)  # ≤ steps × lr × max norm
    assert change(free) > 100 * change(clipped)


def test_embed_and_runs_commands(
    tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(None, _cached(tiny_synth, tmp_path))
    summary = Trainer(cfg, show_progress=False).fit()
    out = tmp_path / "emb.npz"
    argv = ["embed", summary["checkpoint"], "--data", str(tiny_synth / "dataset_synth.json"), "--images",
            str(tiny_synth / "images"), "--split", "val", "--out", str(out)]  # fmt: skip
    assert run(argv) == 0
    emb = np.load(out)
    assert emb["image_embeddings"].shape == (20, 32) and emb["text_embeddings"].shape == (100, 32)
    assert np.allclose(np.linalg.norm(emb["image_embeddings"], axis=1), 1, atol=1e-5)
    assert list(emb["caption_to_image"][:5]) == [0] * 5
    method = load_method(summary["checkpoint"])
    tok = method.tokenize([str(emb["captions"][0])])
    assert np.allclose(method.encode_text(**tok).numpy()[0], emb["text_embeddings"][0], atol=1e-5)
    capsys.readouterr()
    assert run(["runs", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert f"{summary['best_val']['mR']:.2f}" in table and "|" in table
    assert run(["runs", str(tmp_path / "nothing")]) == 0  # listed as unfinished, not skipped
    assert "not finished" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "dual"
