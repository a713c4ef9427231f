"""The two encoder registries, spec parsing and the ``create_*`` factories.

A spec is what a user types: ``name[@weights]`` (``resnet50``, ``resnet50@/ckpt/w.safetensors``)
or ``scheme:arch[@weights]`` for families that wrap a whole library (``clip:ViT-B-32@openai``,
``hf:bert-base-uncased``). A scheme is a registry name that ends with ``:``; the prefix before
the first ``:`` is looked up explicitly, never by substring search.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

from rsitr.errors import ConfigError
from rsitr.models.encoders.base import Encoder, ImageEncoder, TextEncoder
from rsitr.registry import Registry

__all__ = [
    "EncoderSpec",
    "create_image_encoder",
    "create_text_encoder",
    "list_image_encoders",
    "list_text_encoders",
    "parse_spec",
    "register_image_encoder",
    "register_text_encoder",
]

_logger = logging.getLogger(__name__)

Factory = Callable[..., Encoder]

_IMAGE: Registry[Factory] = Registry("image encoder")
_TEXT: Registry[Factory] = Registry("text encoder")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec.

    Attributes:
        spec: the string as typed.
        name: the registry name (``"resnet50"``, or ``"clip:"`` for a scheme).
        arch: what follows a scheme prefix (``"ViT-B-32"``); ``None`` for plain names.
        weights: what follows ``@``: a pretrained tag or a local checkpoint path; ``None`` if absent.
    """

    spec: str
    name: str
    arch: str | None = None
    weights: str | None = None

    @property
    def display_name(self) -> str:
        """The name without weights: ``"resnet50"`` or ``"clip:ViT-B-32"``."""
        return self.name if self.arch is None else f"{self.name}{self.arch}"


def register_image_encoder(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering an image-encoder factory ``f(spec: EncoderSpec, **options)``.

    The factory gets the parsed spec and the options of :func:`create_image_encoder`; every factory
    with weights accepts ``pretrained: bool``. An encoder class without weights can be registered
    directly: it is called as ``cls(**options)`` (``pretrained`` is dropped).

    Args:
        name: the registry name; end it with ``:`` to register a scheme (``"clip:"``).

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _IMAGE.register(name)


def register_text_encoder(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a text-encoder factory ``f(spec: EncoderSpec, **options)``.

    Same conventions as :func:`register_image_encoder`.

    Args:
        name: the registry name; end it with ``:`` to register a scheme (``"hf:"``).

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _TEXT.register(name)


def list_image_encoders() -> list[str]:
    """Registered image-encoder names (schemes end with ``:``)."""
    return _IMAGE.names()


def list_text_encoders() -> list[str]:
    """Registered text-encoder names (schemes end with ``:``)."""
    return _TEXT.names()


def parse_spec(spec: str, registry: Registry[Factory]) -> EncoderSpec:
    """Split ``spec`` into registry name, architecture and weights.

    Args:
        spec: ``name[@weights]`` or ``scheme:arch[@weights]``.
        registry: the registry whose schemes are recognised.

    Returns:
        The parsed spec (the name is not checked against the registry here).

    Raises:
        ConfigError: empty spec, empty architecture after a scheme, or empty weights after ``@``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"encoder spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, colon, rest = spec.partition(":")
    if colon and f"{head}:" in registry:
        name, (arch, at, weights) = f"{head}:", rest.partition("@")
        if not arch:
            raise ConfigError(f"encoder spec {spec!r}: missing architecture after {name!r}")
    else:
        (name, at, weights), arch = spec.partition("@"), None
    if at and not weights:
        raise ConfigError(f"encoder spec {spec!r}: empty weights after '@'")
    return EncoderSpec(spec=spec, name=name, arch=arch, weights=weights or None)


def create_image_encoder(spec: str, frozen: bool = False, **kwargs: object) -> ImageEncoder:
    """Build an image encoder from its spec.

    Args:
        spec: e.g. ``"efficientnet-lite0"``, ``"resnet50@/w/resnet50.safetensors"``,
            ``"clip:ViT-B-32@/ckpt/RS5M_ViT-B-32_RET-2.pt"``.
        frozen: freeze the encoder (no grads, stays in eval mode).
        **kwargs: family options, e.g. ``pool="multi"`` or ``pretrained=False`` (random init).

    Returns:
        The encoder, in eval mode (call ``.train()`` to fine-tune an unfrozen one).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or unknown option.
        MissingDependencyError: a weights file or offline package is missing.
    """
    enc = _build(parse_spec(spec, _IMAGE), _IMAGE, kwargs)
    assert isinstance(enc, ImageEncoder), type(enc)
    return enc.set_frozen(frozen).eval()


def create_text_encoder(spec: str, frozen: bool = False, **kwargs: object) -> TextEncoder:
    """Build a text encoder from its spec.

    Args:
        spec: e.g. ``"minilm-l6"``, ``"hf:/models/bert-base-uncased"``, ``"clip:ViT-B-32@openai"``.
        frozen: freeze the encoder (no grads, stays in eval mode).
        **kwargs: family options, e.g. ``max_length=40``, ``pool="mean"``, ``pretrained=False``.

    Returns:
        The encoder, in eval mode (call ``.train()`` to fine-tune an unfrozen one).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or unknown option.
        MissingDependencyError: a weights file, offline package or uncached hub model is missing.
    """
    enc = _build(parse_spec(spec, _TEXT), _TEXT, kwargs)
    assert isinstance(enc, TextEncoder), type(enc)
    return enc.set_frozen(frozen).eval()


def _build(spec: EncoderSpec, registry: Registry[Factory], kwargs: dict[str, object]) -> Encoder:
    # A factory ``f(spec, **options)`` receives the parsed spec; an encoder class registered directly
    # (``f(**options)``) has no weights to choose, so it takes no ``@weights`` and ignores ``pretrained``.
    factory = registry.get(spec.name)
    params = inspect.signature(factory).parameters
    takes_spec = "spec" in params
    options = [p for p in params if p != "spec"]
    if not takes_spec:
        if spec.weights is not None:
            raise ConfigError(
                f"{registry.kind} {spec.name!r} has no weights to load; remove '@{spec.weights}'"
            )
        kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    for key in kwargs:
        if key not in options:
            raise ConfigError(
                f"{registry.kind} {spec.display_name!r}: unknown option {key!r}; known: {', '.join(options)}"
            )
    _logger.debug("building %s %r with %s", registry.kind, spec.spec, kwargs)
    return factory(spec, **kwargs) if takes_spec else factory(**kwargs)
