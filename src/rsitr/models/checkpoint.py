"""Method weights on disk: one safetensors file whose metadata rebuilds the method.

``model.safetensors`` holds every weight of the method; its string metadata carries the method
name, its config and the encoders' identities, so a checkpoint loads without any other file.
Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rsitr import __version__
from rsitr.errors import DataError
from rsitr.models.methods.base import RetrievalMethod

MODEL_FILE = "model.safetensors"


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: clone each tensor.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def method_metadata(method: RetrievalMethod) -> dict[str, str]:
    """String metadata that rebuilds ``method``: name, config, encoder identities, version."""
    return {
        "rsitr_version": __version__,
        "method": method.name,
        "config": json.dumps(dataclasses.asdict(method.cfg)),
        "image_encoder": json.dumps(method.image_encoder.identity()),
        "text_encoder": json.dumps(method.text_encoder.identity()),
    }


def save_method(method: RetrievalMethod, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the method's weights and metadata to ``path`` (a ``.safetensors`` file), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_contiguous_state(method), str(tmp), metadata={**method_metadata(method), **(extra or {})})
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a model file (or of ``model.safetensors`` inside a folder)."""
    path = _model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad headers
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"not a safetensors checkpoint ({reason})", path=path) from None


def _model_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise DataError("no such checkpoint (expected a model.safetensors file or its folder)", path=path)
    return path


def load_method(path: str | Path, device: str | torch.device = "cpu") -> RetrievalMethod:
    """Rebuild a method from a checkpoint alone (no training config needed).

    Args:
        path: ``model.safetensors`` or the checkpoint folder holding it.
        device: where to put the model.

    Returns:
        The method in eval mode.

    Raises:
        DataError: missing file or metadata, or weights that do not fit the rebuilt model.
    """
    from rsitr.models import build_config, create_method
    from rsitr.models.encoders._weights import weights_from_checkpoint

    file = _model_path(path)
    meta = read_metadata(file)
    if "method" not in meta or "config" not in meta:
        raise DataError("not an rsitr checkpoint (no method/config metadata)", path=file)
    cfg = build_config(meta["method"], json.loads(meta["config"]))
    with weights_from_checkpoint(file):
        method = create_method(meta["method"], cfg, pretrained=False)
    state = load_file(str(file), device="cpu")
    # Checkpoints written before the text towers dropped BERT's unused NSP pooler still hold it.
    state = {k: v for k, v in state.items() if ".pooler." not in k}
    missing, unexpected = method.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"weights do not match the {meta['method']} model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
            path=file,
        )
    return method.to(device).eval()
