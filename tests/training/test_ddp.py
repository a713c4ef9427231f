"""DDP (2 CPU processes, gloo) gives the same loss and gradients as one process on the global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

GLOBAL_BATCH = 12
MODEL = {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "image_encoder_kwargs": {"width": 4},
         "text_encoder_kwargs": {"dim": 16}, "embed_dim": 8, "loss": "both", "dropout": 0.0}  # fmt: skip


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image_feats": {"pooled": torch.randn(GLOBAL_BATCH, 32, generator=g)},
        "text_feats": {"pooled": torch.randn(GLOBAL_BATCH, 16, generator=g)},
        "image_id": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8]),  # repeated images: multi-positive
    }


def _model():
    from rsitr.models import create_method

    torch.manual_seed(0)
    return create_method("dual", MODEL, pretrained=False)


def _grads(method) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from rsitr.training.distributed import all_gather_with_grad

    method = _model()
    method.gather = all_gather_with_grad
    ddp = torch.nn.parallel.DistributedDataParallel(method)
    full = _batch()
    per = GLOBAL_BATCH // world
    sl = slice(rank * per, (rank + 1) * per)
    local = {
        "image_feats": {"pooled": full["image_feats"]["pooled"][sl]},
        "text_feats": {"pooled": full["text_feats"]["pooled"][sl]},
        "image_id": full["image_id"][sl],
    }
    terms = ddp(local)
    loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
    loss.backward()
    if rank == 0:
        save_file(
            {"loss": loss.detach().reshape(1), **{f"grad.{k}": v for k, v in _grads(method).items()}}, out
        )
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path: Path) -> None:
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = load_file(out)

    method = _model()
    terms = method(_batch())
    loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
    loss.backward()
    single = _grads(method)
    assert torch.allclose(ddp["loss"], loss.detach().reshape(1), atol=1e-6)
    assert single, "no gradients"
    for k, g in single.items():
        assert torch.allclose(ddp[f"grad.{k}"], g, atol=1e-6), k
