"""Method registry: ``create_method(name, cfg)`` and ``list_methods()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from rsitr.errors import ConfigError
from rsitr.registry import Registry

_METHODS: Registry[type] = Registry("method")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`RetrievalMethod` subclass under ``name``."""
    return _METHODS.register(name)


def list_methods() -> list[str]:
    """Registered method names."""
    return _METHODS.names()


def get_method_class(name: str) -> type:
    """The method class registered under ``name`` (unknown names raise, listing known ones)."""
    return _METHODS.get(name)


def build_config(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The method's frozen ``Config`` from a mapping; unknown keys raise and name the field."""
    cls = get_method_class(name).Config
    values = dict(values or {})
    if hasattr(cls, "resolve"):  # presets: the Config merges them under the given values
        values = cls.resolve(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]}: unknown option for method {name!r}; known: {', '.join(sorted(known))} "
            "(and positives, read by the trainer)"
        )
    return cls(**values)


def create_method(name: str, cfg: Any = None, *, pretrained: bool = True) -> Any:
    """Build method ``name`` with its encoders.

    Args:
        name: a registered method name.
        cfg: its ``Config`` instance or a mapping of config values (defaults when ``None``).
        pretrained: load the encoders' pretrained weights (False: random init, for tests).

    Returns:
        The method module.
    """
    from rsitr.models.encoders import create_image_encoder, create_text_encoder

    cls = get_method_class(name)
    if cfg is None or isinstance(cfg, Mapping):
        cfg = build_config(name, cfg)
    # Methods without freeze switches (adapter methods) always keep their towers frozen.
    img = create_image_encoder(
        cfg.image_encoder,
        frozen=getattr(cfg, "freeze_image", True),
        pretrained=pretrained,
        **cfg.image_encoder_kwargs,
    )
    txt = create_text_encoder(
        cfg.text_encoder,
        frozen=getattr(cfg, "freeze_text", True),
        pretrained=pretrained,
        **cfg.text_encoder_kwargs,
    )
    return cls(cfg, img, txt)
