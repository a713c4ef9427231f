"""Typed training configuration: YAML → nested dataclasses, with ``a.b=value`` overrides.

The dataclasses are validated by pydantic (``TypeAdapter``): unknown keys raise, values are
checked and converted against the annotations, and every error is one line naming the field
path (``optim.epochs: expected an integer, got 'abc'``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from rsitr.errors import ConfigError

#: pydantic settings of every config dataclass: unknown keys are errors; numbers may name paths
_PYDANTIC = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def _comma_list(value: Any) -> Any:
    """``"identity,hflip"`` (an override) → ``["identity", "hflip"]``."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _on_off(value: Any) -> Any:
    """YAML 1.1 reads ``on``/``off`` as booleans."""
    return ("on" if value else "off") if isinstance(value, bool) else value


#: a list/tuple field that also accepts a comma-separated string
CommaList = BeforeValidator(_comma_list)


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
    betas: Annotated[tuple[float, float], CommaList] = (0.9, 0.999)
    momentum: float = 0.9
    warmup_steps: float = 0.05
    schedule: Literal["cosine", "linear", "constant", "step", "multistep"] = "cosine"
    milestones: Annotated[tuple[int, ...], CommaList] = ()
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

    enabled: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = "auto"
    dir: str = ".cache/rsitr-features"
    views: Annotated[tuple[str, ...], CommaList] = ("identity", "hflip")
    text_views: Annotated[tuple[str, ...], CommaList] = ("identity",)
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


for _cls in (DataConfig, OptimConfig, CacheConfig, TrainConfig):
    _cls.__pydantic_config__ = _PYDANTIC  # type: ignore[attr-defined]

_MESSAGES = {
    "int_parsing": "expected an integer", "int_type": "expected an integer",
    "int_from_float": "expected an integer", "float_parsing": "expected a number",
    "float_type": "expected a number", "bool_parsing": "expected true/false",
    "bool_type": "expected true/false", "string_type": "expected a string",
    "dict_type": "expected a mapping", "tuple_type": "expected a list", "list_type": "expected a list",
    "dataclass_type": "expected a mapping", "too_short": "wrong number of values",
    "too_long": "wrong number of values",
}  # fmt: skip


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _fields_at(cls: type, path: tuple[Any, ...]) -> list[str]:
    """The field names of the dataclass reached from ``cls`` through ``path``."""
    for part in path:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        nested = globals().get(str(hints.get(part, "")))
        if nested is None or not dataclasses.is_dataclass(nested):
            return []
        cls = nested
    return sorted(f.name for f in dataclasses.fields(cls))


def _message(err: ValidationError, cls: type, where: str) -> str:
    """The first validation error as one line naming the field path."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
    key = ".".join(str(p) for p in loc if not isinstance(p, int))
    key = f"{where}.{key}" if where and key else (where or key or cls.__name__)
    kind, value = e["type"], e.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{key}: unknown option; known: {', '.join(_fields_at(cls, loc[:-1]))}"
    if kind == "literal_error":
        allowed = e.get("ctx", {}).get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{key}: {value!r} is not one of {allowed}"
    return f"{key}: {_MESSAGES.get(kind, e['msg'].lower())}, got {value!r}"


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, validated by pydantic.

    Raises:
        ConfigError: an unknown key or a wrongly typed value, naming its field path.
    """
    try:
        return _adapter(cls).validate_python({} if data is None else data)
    except ValidationError as e:
        raise ConfigError(_message(e, cls, where)) from None


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
