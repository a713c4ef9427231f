"""Multi-process training through the Trainer (2 CPU processes, gloo), as ``torchrun`` runs it.

Every method trains two optimiser steps with a trainable text tower where it allows one (a tiny
random BERT through the real ``hf:`` path, so BERT's pooler is there to trip DDP), variable
caption lengths per rank (token-level gathers), and batch norms (synchronised). After the two
steps every rank holds bit-identical parameters and buffers (no buffer is broadcast: the CMPAGL
momentum encoders and queue and the RDB teacher stay equal on their own), and for ``dual`` and
every ``msa`` preset, whose losses are functions of the gathered global batch, the parameters
equal a one-process run on the same global batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.training.test_train_rdb import _rdb_overrides

pytestmark = pytest.mark.slow

_TOWERS = {"model.image_encoder": "tiny-cnn", "model.image_encoder_kwargs": "{width: 4}",
           "model.text_encoder_kwargs": "{max_length: 48}", "model.freeze_image": "false",
           "model.freeze_text": "false", "model.embed_dim": 16}  # fmt: skip
_MSA = {"method": "msa", **_TOWERS, "model.num_heads": 2, "model.input_norm": "batchnorm"}


def _cases(bert: str) -> dict[str, dict[str, object]]:
    """Method overrides per case (on top of :func:`_base`); the text tower is the tiny BERT."""
    return {
        "dual": {"method": "dual", **_TOWERS, "model.text_encoder": bert, "model.head": "mlp",
                 "model.dropout": 0.0, "model.input_dropout": 0.0},
        **{f"msa-{p}": {**_MSA, "model.text_encoder": bert, "model.preset": p}
           for p in ("base", "base+m", "base+m+a+b", "msa")},
        "cmpagl": {"method": "cmpagl", "model.image_encoder": "gswin-tiny", "model.text_encoder": bert,
                   "model.image_encoder_kwargs": "{embed_dim: 8, num_heads: [1, 1, 2, 2], window: 4, "
                                                 "image_size: 64}",
                   "model.text_encoder_kwargs": "{max_length: 16}", "model.embed_dim": 16,
                   "model.triplet_reduction": "mean", "data.duplicate_captions": "positive"},
    }  # fmt: skip


def _base(synth: Path, out: Path) -> dict[str, object]:
    """8 training images × 5 captions, global batch 16: two optimiser steps in one epoch."""
    return {
        "data.source": synth / "dataset_synth.json", "data.images": synth / "images",
        "data.labels": synth / "labels.csv", "data.image_size": 64, "data.max_train_images": 8,
        "data.augment": "none", "optim.epochs": 1, "optim.batch_size": 16, "optim.name": "sgd",
        "optim.lr": 0.02, "optim.backbone_lr": 0.02, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "cache.enabled": "off", "cache.dir": out / "cache", "out_dir": out / "run", "device": "cpu",
        "amp": "false", "pretrained": "false", "log_every": 1,
    }  # fmt: skip


def _overrides(name: str, synth: Path, out: Path, bert: str) -> list[str]:
    if name == "rdb":  # adapters on a frozen tower: trained from cached prefixes
        extra = {"data.max_train_images": 8, "optim.batch_size": 16, "optim.epochs": 1, "device": "cpu",
                 "amp": "false", "data.duplicate_captions": "positive", "optim.name": "sgd"}  # fmt: skip
        return _rdb_overrides(synth, out, **extra)
    values = {**_base(synth, out), **_cases(bert)[name]}
    return [f"{k}={v}" for k, v in values.items()]


def _train(overrides: list[str]) -> dict[str, torch.Tensor]:
    from rsitr.training import Trainer, load_config

    trainer = Trainer(load_config(None, overrides), show_progress=False)
    summary = trainer.fit()
    assert summary["epochs"] == 1 and trainer.history[-1]["val"]["mR"] >= 0  # trained and evaluated
    state = {k: v.detach().clone().contiguous() for k, v in trainer.method.state_dict().items()}
    for name, buf in trainer.method.named_buffers():  # queue and momentum copies are not in the state
        state.setdefault(f"buffer.{name}", buf.detach().clone().contiguous())
    return state


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, list[str], str]]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )  # fmt: skip
    import torch.distributed as dist

    torch.set_num_threads(1)
    for _name, overrides, out in jobs:
        save_file(_train(overrides), f"{out}.rank{rank}.safetensors")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NAMES = ["dual", "msa-base", "msa-base+m", "msa-base+m+a+b", "msa-msa", "cmpagl", "rdb"]


@pytest.fixture(scope="module")
def ddp_runs(tiny_synth: Path, tiny_bert_spec: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case trained once under ``torchrun``-style 2-process DDP (one spawn for all)."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [(n, _overrides(n, tiny_synth, root / n, tiny_bert_spec), str(root / n)) for n in NAMES]
    mp.spawn(_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)
    return {n: [load_file(f"{out}.rank{r}.safetensors") for r in (0, 1)] for n, _, out in jobs}


@pytest.mark.parametrize("name", NAMES)
def test_ranks_hold_identical_weights_after_two_steps(name: str, ddp_runs: dict) -> None:
    rank0, rank1 = ddp_runs[name]
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # bit for bit (NaN where both hold NaN: the DWA history before two epochs)
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, equal_nan=True, msg=key)
    if name == "cmpagl":  # the queue holds step 2's 16 gathered keys (the cap after step 1 emptied it)
        assert (rank0["buffer.queue.ids"] >= 0).sum() == 16 and (
            rank0["buffer.queue.text_ids"] >= 0
        ).sum() == 16


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith(("dual", "msa"))])
def test_ddp_equals_one_process_on_the_global_batch(
    name: str, ddp_runs: dict, tiny_synth: Path, tiny_bert_spec: str, tmp_path: Path
) -> None:
    single = _train(_overrides(name, tiny_synth, tmp_path, tiny_bert_spec))
    ddp = ddp_runs[name][0]
    assert single.keys() == ddp.keys()
    init = _initial(name, tiny_synth, tmp_path, tiny_bert_spec)
    moved = [k for k in init if k in single and not torch.equal(init[k], single[k])]
    assert len(moved) > 10  # the steps changed the weights, text tower included
    assert any(k.startswith("text_encoder.") for k in moved)
    for key in single:
        a, b = single[key].double(), ddp[key].double()
        scale = max(1.0, float(a.abs().max()))  # float sums in another order: relative to the tensor
        assert float((a - b).abs().max()) <= 2e-5 * scale, key


def _initial(name: str, synth: Path, out: Path, bert: str) -> dict[str, torch.Tensor]:
    """The same method before any step (the trainer's seeding)."""
    from rsitr.models import create_method
    from rsitr.training import load_config
    from rsitr.training.trainer import seed_everything

    cfg = load_config(None, _overrides(name, synth, out / "init", bert))
    seed_everything(cfg.seed, cfg.deterministic)
    model = dict(cfg.model)
    model.pop("positives", None)
    return {
        k: v.detach().clone()
        for k, v in create_method(cfg.method, model, pretrained=False).state_dict().items()
    }
