"""Shared fixtures: the ``../shared`` folder beside the repo, offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the test with a reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: this test needs the ../shared folder beside the repo")
    return p


@pytest.fixture
def shared() -> Path:
    """The ``../shared`` folder (skip when absent)."""
    return shared_path()


def make_tiny_bert(folder: Path, layers: int = 4) -> str:
    """A random BERT (32 wide, ``layers`` deep, no dropout) with MiniLM's tokenizer, saved as an
    ``hf:`` folder: the real transformers code path at test size. Returns its ``hf:`` spec."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rsitr.models.encoders._weights import package_dir
    from rsitr.models.encoders.minilm import WHEEL_PACKAGE

    AutoTokenizer.from_pretrained(str(package_dir(WHEEL_PACKAGE, "minilm-l6") / "model")).save_pretrained(
        folder
    )
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="session")
def tiny_bert_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``hf:<folder>`` of :func:`make_tiny_bert` (4 layers), built once per session."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
