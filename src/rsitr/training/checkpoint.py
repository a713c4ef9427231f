"""Training checkpoints: safetensors weights (config in the metadata), JSON state, atomic writes.

A checkpoint folder holds ``model.safetensors`` (every weight of the method; its metadata
carries the method name, its config and the encoders' identities, so it loads without any
other file), ``optim.safetensors`` (optimiser tensors), ``state.json`` (epoch, step, best
metric, RNG states, optimiser hyper-parameters) and ``train_config.yaml``. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rsitr.errors import DataError
from rsitr.faults import crash_point
from rsitr.models.checkpoint import MODEL_FILE, load_method, read_metadata, save_method
from rsitr.models.methods.base import RetrievalMethod

__all__ = [
    "load_method",
    "load_training_state",
    "read_metadata",
    "recover_checkpoint",
    "save_checkpoint",
    "save_method",
]

OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"


def git_commit() -> str | None:
    """The current git commit of the working tree, if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file()


def recover_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint at ``folder``, restored from an interrupted save if needed.

    A save writes ``<folder>.tmp`` (``state.json`` last), moves ``folder`` to ``<folder>.old``,
    then ``<folder>.tmp`` to ``folder``. A kill between the two moves leaves no ``folder``: the
    newer complete ``.tmp`` (else the ``.old``) is then moved back into place.

    Returns:
        ``folder`` when it now holds a complete checkpoint, else ``None``.
    """
    folder = Path(folder)
    if _complete(folder):
        return folder
    for candidate in (folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")):
        if _complete(candidate):
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(candidate, folder)
            return folder
    return None


def save_checkpoint(
    folder: str | Path,
    method: RetrievalMethod,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    config_yaml: str | None = None,
) -> Path:
    """Write a full training checkpoint folder atomically (write to a temp folder, then swap).

    At every instant a complete checkpoint exists under ``folder``, ``<folder>.tmp`` or
    ``<folder>.old``, and :func:`recover_checkpoint` finds it after a kill.
    """
    folder = Path(folder)
    recover_checkpoint(folder)  # a kill between the swaps of the last save: put it back first
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_method(method, tmp / MODEL_FILE)
    if optimizer is not None:
        tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / OPTIM_FILE))
        state = {**state, "optimizer": opt_meta}
    if config_yaml is not None:
        (tmp / "train_config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: marks the folder complete
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    if old.exists():  # the window where only <folder>.old and <folder>.tmp hold checkpoints
        crash_point(f"checkpoint-swap:{folder.name}")
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_training_state(
    folder: str | Path, method: RetrievalMethod, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore weights (and optimiser state) from a checkpoint folder; returns ``state.json``."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise DataError("no training state to resume from", path=state_file)
    state = json.loads(state_file.read_text())
    weights = load_file(str(folder / MODEL_FILE), device="cpu")
    method.load_state_dict(weights, strict=True)
    if optimizer is not None and "optimizer" in state:
        _restore_optimizer(optimizer, load_file(str(folder / OPTIM_FILE), device="cpu"), state["optimizer"])
    return state


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
