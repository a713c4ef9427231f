"""Typed training configuration: YAML → nested dataclasses, with ``a.b=value`` overrides.

Unknown keys raise and name the field; values are type-checked against the annotations.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from rsitr.errors import ConfigError


@dataclass
class DataConfig:
    """Where the data is and how it is split.

    Attributes:
        source: caption file or folder (any format ``rsitr data check`` reads).
        format: force a reader (``precomp``, ``karpathy``, ``pir``, ``csv``); auto-detected if None.
        images: image root folder.
        labels: optional ``labels.csv`` (``filename,scene``).
        train_split / val_split / test_split: split names. Model selection uses ``val_split``.
        val_source / test_source: other files for val/test (e.g. precomp ``test`` files); default
            ``source``.
        image_size: model input size; None uses the image encoder's.
        on_error: what a corrupt image does: ``skip`` (and report) or ``fail``.
        max_train_images: optional cap (subsample) for quick runs; None uses all.
        duplicate_captions: how a training caption that is word for word a caption of another
            image in the batch counts in the losses: ``negative`` (the field's convention: only
            the captions of the same image are positives) or ``positive`` (it describes this
            image too, so it is not pushed away).
        caption_sampling: which training pairs an epoch visits: ``caption`` (every caption, the
            field's convention), ``distinct`` (each distinct caption text of an image once: an
            RSICD image with five identical captions counts once, not five times) or ``image``
            (one random caption per image per epoch).
        augment: training augmentation of raw images (not of cached features, whose views are
            ``cache.views``): ``none`` (MSA), ``rs`` (random resized crop, flips, 90° turns),
            ``crop_flip`` (CMPAGL) or ``clip`` (bicubic + RandAugment, HarMA/RDB); see
            :func:`rsitr.data.transforms.build_train_transform`.
        carve_from: a Karpathy JSON to carve ``source`` from when ``source`` does not exist yet
            (``rsitr data split carve_from --profile carve_profile --seed carve_seed --out
            source``): the split is derived by a rerunnable recipe, not shipped as a file.
        carve_profile / carve_seed: the target profile and seed of that split.
    """

    source: str = ""
    format: str | None = None
    images: str | None = None
    labels: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_source: str | None = None
    test_source: str | None = None
    image_size: int | None = None
    on_error: Literal["skip", "fail"] = "skip"
    max_train_images: int | None = None
    duplicate_captions: Literal["negative", "positive"] = "negative"
    caption_sampling: Literal["caption", "distinct", "image"] = "caption"
    augment: Literal["none", "rs", "crop_flip", "clip"] = "rs"
    carve_from: str | None = None
    carve_profile: str = "rsicd-test"
    carve_seed: int = 0


@dataclass
class OptimConfig:
    """Optimisation: AdamW, Adam or SGD with separate backbone/head learning rates, warm-up then
    a schedule (see :mod:`rsitr.training.schedule`).

    Attributes:
        epochs: number of epochs.
        batch_size: pairs per optimiser step (global, across ranks and accumulation).
        lr: head learning rate.
        backbone_lr: encoder learning rate (used only for unfrozen towers).
        name: ``adamw`` (decoupled weight decay), ``adam`` (L2 weight decay in the gradient, as
            MSA's Adam with weight decay) or ``sgd`` (with ``momentum``).
        weight_decay: weight decay (not applied to biases, norms, temperature unless
            ``decay_norm_bias``).
        decay_norm_bias: also decay biases, norm weights and the temperature.
        betas: Adam/AdamW betas.
        momentum: SGD momentum.
        warmup_steps: linear warm-up steps (or a fraction of all steps when < 1).
        schedule: ``cosine``, ``linear``, ``constant``, ``step`` or ``multistep`` after warm-up.
        milestones: epochs of ``multistep`` (or ``[k]``: every k epochs for ``step``).
        gamma: the ``step``/``multistep`` factor.
        lr_floor: the lowest learning-rate multiplier; a decay holds it once reached.
        decay_epochs: epoch by which ``cosine``/``linear`` reach ``lr_floor`` (default: the last).
        grad_accum: micro-batches per optimiser step.
        clip_grad: max gradient norm (0 disables).
    """

    epochs: int = 25
    batch_size: int = 256
    lr: float = 1e-3
    backbone_lr: float = 1e-5
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.01
    decay_norm_bias: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    warmup_steps: float = 0.05
    schedule: Literal["cosine", "linear", "constant", "step", "multistep"] = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    lr_floor: float = 0.0
    decay_epochs: int | None = None
    grad_accum: int = 1
    clip_grad: float = 0.0


@dataclass
class CacheConfig:
    """Frozen-backbone feature cache.

    Attributes:
        enabled: ``auto`` (when both towers are frozen), ``on`` or ``off``.
        dir: cache folder (keyed by model, preprocessing and data hash).
        views: cached image views for augmentation: ``identity``, ``hflip``, ``vflip``, ``rot90``
            (any of :data:`rsitr.retrieval.embed.VIEWS`).
        text_views: cached caption views for text-side augmentation: ``identity``,
            ``worddrop`` (see :mod:`rsitr.data.text_views`); each training pair draws one.
        batch_size: images per batch while extracting.
    """

    enabled: Literal["auto", "on", "off"] = "auto"
    dir: str = ".cache/rsitr-features"
    views: tuple[str, ...] = ("identity", "hflip")
    text_views: tuple[str, ...] = ("identity",)
    batch_size: int = 64


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes:
        method: registered method name (``dual``, …).
        model: the method's config values (see its ``Config`` dataclass).
        data / optim / cache: see above.
        seed: global seed (data order, init, dropout).
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda[:i]``.
        amp: mixed precision on GPU (bf16); ignored on CPU.
        out_dir: run folder (checkpoints, logs, report).
        num_workers: DataLoader workers for image loading.
        eval_every: validate every N epochs.
        select_metric: validation metric used to keep the best checkpoint.
        ties: tie policy of the validation metrics.
        log_every: steps between log lines.
        tensorboard: also write TensorBoard scalars (needs ``tensorboard``).
        deterministic: ``torch.use_deterministic_algorithms`` (warn-only).
        pretrained: load encoder weights (False: random init, for tests).
    """

    method: str = "dual"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    out_dir: str = "runs/default"
    num_workers: int = 0
    eval_every: int = 1
    select_metric: str = "mR"
    ties: Literal["pessimistic", "optimistic"] = "pessimistic"
    log_every: int = 50
    tensorboard: bool = False
    deterministic: bool = True
    pretrained: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON/YAML serialisable)."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``where``."""
    if isinstance(tp, str):  # pragma: no cover - annotations are resolved below
        raise TypeError(tp)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, get_args(tp)))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown option; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    out = _to_plain(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: unreadable YAML, unknown keys or wrongly typed values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return from_dict(TrainConfig, data)
