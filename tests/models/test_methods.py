"""Every registered method: build, forward, backward, encode (CPU, tiny random towers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rsitr.errors import ConfigError
from rsitr.models import build_config, create_method, list_methods
from rsitr.models.registry import get_method_class

TINY = {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text", "image_encoder_kwargs": {"width": 4},
        "text_encoder_kwargs": {"dim": 16}, "freeze_image": False, "freeze_text": False}  # fmt: skip
#: methods that need a particular kind of tower (cmpagl splits a BERT-like text model)
OVERRIDES = {
    "cmpagl": {"text_encoder": "minilm-l6", "text_encoder_kwargs": {"max_length": 16}},
    # rdb adapts towers it knows how to split (and keeps them frozen: no freeze switches)
    "rdb": {"image_encoder": "efficientnet-lite0", "text_encoder": "minilm-l6", "image_encoder_kwargs": {},
            "text_encoder_kwargs": {"max_length": 16}, "image_layers": 1, "text_layers": 1, "bottleneck": 16,
            "heads": 2, "shared_heads": 2, "num_classes": 3},
}  # fmt: skip


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name: str) -> None:
    torch.manual_seed(0)
    known = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    cfg = {k: v for k, v in {**TINY, **OVERRIDES.get(name, {})}.items() if k in known}
    method = create_method(name, cfg, pretrained=False)
    texts = [
        "three white planes beside a terminal",
        "a river with a bridge",
        "green farmland",
        "a dense forest",
    ]
    tok = method.tokenize(texts)
    batch = {"image": torch.randn(4, 3, 64, 64), **tok, "image_id": torch.tensor([0, 1, 2, 2])}
    # Every trainable parameter learns: a non-zero gradient on each. Zero-initialised adapter
    # up-projections (RDB, nested two deep) pass gradient inward only once they have moved, so
    # the check is on the third step.
    trainable = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.01)
    for step in range(3):
        opt.zero_grad()
        terms = method(batch)
        losses = {k: v for k, v in terms.items() if k.endswith("_loss")}
        assert losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        if step < 2:
            opt.step()
    dead = [
        n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert trainable and not dead, dead
    method.eval()
    img = method.encode_image(batch["image"])
    txt = method.encode_text(tok["input_ids"], tok["attention_mask"])
    assert img.shape[0] == 4 and txt.shape == img.shape
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    # Cached frozen features give the same embeddings as raw inputs.
    assert torch.allclose(method.encode_image(feats=method.image_features(batch["image"])), img, atol=1e-6)


def test_unknown_method_and_option() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        create_method("nope")
    with pytest.raises(ConfigError, match="model.embed_dimm"):
        build_config("dual", {"embed_dimm": 3})
    with pytest.raises(ConfigError, match="model.loss"):
        build_config("dual", {"loss": "mse"})


def test_frozen_tower_has_no_trainable_params() -> None:
    method = create_method("dual", {**TINY, "freeze_image": True, "freeze_text": True}, pretrained=False)
    groups = method.param_groups()
    assert groups["backbone"] == [] and groups["head"]
    assert method.cacheable
    method.train()
    assert not method.image_encoder.training  # a frozen tower stays in eval mode
