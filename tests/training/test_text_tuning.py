"""``model.text_tune_layers`` through the trainer: fine-tuning from the cached text prefix."""

from __future__ import annotations

from pathlib import Path

import torch

from rsitr.models.checkpoint import load_method
from rsitr.models.encoders import create_text_encoder
from rsitr.training import Trainer, load_config
from tests.training.conftest import tiny_overrides


def test_trainer_fine_tunes_from_the_cache(tiny_synth: Path, tiny_bert_spec: str, tmp_path: Path) -> None:
    """A cached run with a tuned top layer moves that layer, keeps the prefix, and its checkpoint
    scores the val split from raw images and text as the cached validation did."""
    over = tiny_overrides(tiny_synth, tmp_path, **{
        "model.text_encoder": tiny_bert_spec, "model.text_encoder_kwargs": "{pool: mean}",
        "model.freeze_image": "true", "model.freeze_text": "true", "model.text_tune_layers": 1,
        "model.tune_autocast": "false", "cache.enabled": "on", "cache.views": "[identity]",
        "optim.backbone_lr": 1e-2, "optim.epochs": 1, "model.dropout": 0.0, "pretrained": "true"})  # fmt: skip
    trainer = Trainer(load_config(None, over), show_progress=False)
    summary = trainer.fit()
    after = load_method(Path(summary["checkpoint"]))
    layers = create_text_encoder(tiny_bert_spec).layers  # the pretrained tower, unsplit
    for i, layer in enumerate(after.text_encoder.layers):  # the prefix: untouched
        assert all(
            torch.equal(a, b)
            for a, b in zip(layer.state_dict().values(), layers[i].state_dict().values(), strict=True)
        )
    moved = [not torch.equal(a, b) for a, b in zip(after.text_top[0].state_dict().values(),
                                                    layers[3].state_dict().values(), strict=True)]  # fmt: skip
    assert any(moved)
    cached = trainer.validate()
    trainer.method = after
    trainer.val_feats = None  # score from raw images and text
    torch.testing.assert_close(trainer.validate().mR, cached.mR, atol=0.5, rtol=0)
