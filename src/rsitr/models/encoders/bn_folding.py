"""Inference copies of frozen convolution stacks with each BatchNorm folded into its convolution.

A BatchNorm in eval mode is an affine map per channel, so the convolution before it absorbs it:
``W' = W·s`` and ``b' = (b − μ)·s + β`` with ``s = γ / √(σ² + ε)``. On a CPU the separate
BatchNorm pass over every activation map costs about a third of a frozen EfficientNet-Lite0
forward (one AVX2 core: 65 → 43 ms an image at 224 px, outputs equal to ≈ 1e-6), which is what
feature caching, ``rsitr embed`` and ``rsitr index`` spend their time on.

The copies are for inference only: :class:`FoldedInference` hands out the original modules
whenever any of their parameters is trainable or any submodule is in training mode, so gradients
and BatchNorm statistics never go to a copy, and it rebuilds a copy when a parameter or buffer
of the original changes (``load_state_dict``, ``.to()``, an optimiser step).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["FoldedInference", "fold_batchnorm"]

#: containers whose conv → BatchNorm pairs are registered in data-flow order: timm's EfficientNet
#: (``conv_stem``/``bn1``, ``conv_head``/``bn2``) and its blocks (``conv_pw``/``bn1``, ``conv_dw``/
#: ``bn2``, ``conv_pwl``/``bn3``; the stem's ``conv_dw``/``bn1``, ``conv_pw``/``bn2``), checked by
#: class name so that the rule never guesses elsewhere
_ORDERED_BLOCKS = ("EfficientNet", "DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "ConvBnAct")


def _batchnorm(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The BatchNorm of ``module`` and where it sits: itself, or the ``inner`` BatchNorm of an
    adapter insertion wrapped around it (the wrapper only reads its inner module's output)."""
    if isinstance(module, nn.BatchNorm2d):
        return module, ""
    inner = getattr(module, "inner", None)
    if isinstance(inner, nn.BatchNorm2d):
        return inner, "inner"
    return None


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """Fold ``bn`` into ``conv`` in place; return what replaces ``bn`` (its drop and activation
    for timm's ``BatchNormAct2d``, else identity)."""
    with torch.no_grad():
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None, "a folded BatchNorm needs running statistics"
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale + (bn.bias if bn.bias is not None else 0)
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.copy_(conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
    tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*tail) if tail else nn.Identity()


def _fold_children(parent: nn.Module, names: list[str]) -> None:
    for a, b in zip(names, names[1:], strict=False):
        conv, found = parent._modules[a], _batchnorm(parent._modules[b])  # type: ignore[index]
        if not isinstance(conv, nn.Conv2d) or found is None:
            continue
        bn, where = found
        if bn.training or bn.running_mean is None:
            continue
        tail = _fold_pair(conv, bn)  # type: ignore[arg-type]
        if where:
            setattr(parent._modules[b], where, tail)
        else:
            parent._modules[b] = tail


def _walk(module: nn.Module) -> None:
    if type(module).__name__ in _ORDERED_BLOCKS:
        _fold_children(module, list(module._modules))
    for child in module.children():
        _walk(child)


def fold_batchnorm(*modules: nn.Module) -> nn.Sequential:
    """A folded inference copy of ``modules`` run one after the other (``nn.Sequential``).

    A convolution passed right before a BatchNorm (``fold_batchnorm(conv_stem, bn1)``), and the
    conv → BatchNorm pairs inside timm's EfficientNet blocks, are folded; everything else is
    copied as it is. The originals are not changed.
    """
    chain = nn.Sequential(*(copy.deepcopy(m) for m in modules))
    _fold_children(chain, list(chain._modules))
    _walk(chain)
    return chain.requires_grad_(False).eval()


class FoldedInference:
    """Folded copies of frozen module chains, built on first use and kept while the originals
    are unchanged (not an ``nn.Module``: the copies are not part of the owner's state dict)."""

    def __init__(self) -> None:
        self._copies: dict[tuple[int, ...], tuple[Any, nn.Sequential]] = {}

    def __call__(self, *modules: nn.Module) -> nn.Module:
        """The folded copy of ``modules`` (see :func:`fold_batchnorm`; one module's copy itself),
        or the originals as they are when any of them trains (a trainable parameter or a module
        in training mode)."""
        if any(m.training for mod in modules for m in mod.modules()) or any(
            p.requires_grad for mod in modules for p in mod.parameters()
        ):
            return modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        tensors = [t for mod in modules for t in (*mod.parameters(), *mod.buffers())]
        state = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        ids = tuple(id(m) for m in modules)
        hit = self._copies.get(ids)
        if hit is None or hit[0] != state:
            hit = (state, fold_batchnorm(*modules))
            self._copies[ids] = hit
        return hit[1][0] if len(modules) == 1 else hit[1]

    def __deepcopy__(self, memo: dict[int, Any]) -> FoldedInference:
        return FoldedInference()  # a copied owner builds its own copies

    def __getstate__(self) -> dict[str, Any]:
        return {"_copies": {}}
