"""Distributed helpers: process-group setup from torchrun's environment and a gather with grad."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True under a multi-process launch."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that logs and writes)."""
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE`` variables.

    Uses NCCL for CUDA devices and gloo otherwise. Single-process runs return rank 0 of 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to every slice.

    Each rank computes the loss on the global batch; the backward of the gather sums the
    gradient of every rank's (identical) loss, and DDP's averaging then gives exactly the
    single-process gradient of the global batch.

    Ranks may hold different shapes: a different batch size (a skipped unreadable image) or a
    different token length (each rank trims its captions' padding). Every dim is zero-padded to
    the largest over the ranks before the gather; dim 0 is then cut back to each rank's rows,
    the other dims stay at the largest size (zero rows of a mask are padding).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _gather_padded(x)[0]


def _gather_padded(x: Tensor) -> tuple[Tensor, list[int]]:
    """:func:`all_gather_with_grad` under a process group, and the rows each rank gave."""
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    sizes = torch.stack(shapes).tolist()
    biggest = [max(s[d] for s in sizes) for d in range(x.ndim)]
    if list(x.shape) != biggest:
        pad: list[int] = []
        for d in reversed(range(x.ndim)):
            pad += [0, biggest[d] - x.shape[d]]
        x = torch.nn.functional.pad(x, pad)
    parts = all_gather(x.contiguous())
    rows = [s[0] for s in sizes]
    return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)], dim=0), rows


class GatheredBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the global batch of every rank, on any device.

    ``torch.nn.SyncBatchNorm`` runs only on GPUs; this does the same on the CPU (gloo): the input
    is all-gathered with its gradient, normalised with the global mean and variance (so the
    running statistics are the same on every rank), and this rank's rows are returned. Outside
    distributed training it is a plain batch norm. Made by :func:`sync_batchnorm`.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(input)
        gathered, rows = _gather_padded(input)
        start = sum(rows[: dist.get_rank()])
        return super().forward(gathered)[start : start + input.shape[0]]


def sync_batchnorm(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """Every batch norm of ``module`` computes its statistics over the global batch under DDP:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GatheredBatchNorm` elsewhere. Frozen towers
    (``eval`` mode) keep using their running statistics either way."""
    if device.startswith("cuda"):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, GatheredBatchNorm
        ):
            new = GatheredBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
            )  # fmt: skip
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.requires_grad_(any(p.requires_grad for p in child.parameters()))
            held = next(iter([*child.parameters(), *child.buffers()]), None)
            setattr(module, name, new if held is None else new.to(held.device))
        else:
            sync_batchnorm(child, device)
    return module


def wrap_ddp(method: torch.nn.Module, device: str) -> torch.nn.parallel.DistributedDataParallel:
    """``method`` under DistributedDataParallel, set up for every rsitr method.

    - batch norms are synchronised (:func:`sync_batchnorm`), so no rank's statistics differ;
    - ``forward_sync_buffers=False`` (formerly ``broadcast_buffers=False``): buffers are not copied
      from rank 0 at every forward (only once, at construction, when all are equal anyway). The
      momentum encoders and feature queue of CMPAGL and the EMA teacher of RDB are updated the
      same way on every rank from identical parameters and gathered keys, so they stay equal
      without it, and synchronised batch norms keep equal running statistics;
    - unused parameters are an error (``find_unused_parameters=False``): the methods build only
      the layers their config uses.
    """
    method = sync_batchnorm(method, device)
    ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return torch.nn.parallel.DistributedDataParallel(
        method, device_ids=ids, find_unused_parameters=False, **_no_buffer_sync()
    )


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "no buffer copies at every forward", by the name this torch knows."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )


def barrier() -> None:
    """Synchronise ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
