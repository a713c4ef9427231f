"""Recipe switches: optimisers, schedules with a floor, named augmentations, positives."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.errors import ConfigError
from rsitr.training.schedule import build_scheduler, lr_lambda
from tests.training.conftest import tiny_overrides


def _lrs(kind: str, epochs: int = 10, spe: int = 2, **kw) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, epochs * spe, 0, kind, steps_per_epoch=spe, **kw)
    out = []
    for _ in range(epochs * spe):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_multistep_and_step_follow_torch() -> None:
    got = _lrs("multistep", milestones=(3, 7), gamma=0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.5)
    want = []
    for _ in range(10):
        want += [ref.get_last_lr()[0]] * 2  # per epoch, two steps each
        opt.step()
        ref.step()
    assert got == pytest.approx(want)
    assert _lrs("step", milestones=(4,), gamma=0.1)[::2] == pytest.approx([1] * 4 + [0.1] * 4 + [0.01] * 2)


def test_cosine_decays_to_the_floor_by_decay_epochs_then_holds() -> None:
    """CMPAGL: 1e-5 → 1e-6 by epoch 30, then held (here: floor 0.1 by epoch 3 of 10)."""
    got = _lrs("cosine", floor=0.1, decay_epochs=3)
    assert got[0] == 1.0
    assert got[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert got[6:] == pytest.approx([0.1] * 14)
    assert _lrs("linear", floor=0.2)[-1] == pytest.approx(0.2 + 0.8 * (1 / 20))
    assert lr_lambda(5, 10, 0, "cosine") == pytest.approx(0.5)  # the default is unchanged


def test_schedule_errors() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="milestones"):
        build_scheduler(opt, 10, 0, "multistep")
    with pytest.raises(ConfigError, match="lr_floor"):
        build_scheduler(opt, 10, 0, "cosine", floor=2.0)
    with pytest.raises(ConfigError, match="schedule"):
        build_scheduler(opt, 10, 0, "exp")


def _trainer(synth: Path, out: Path, **extra):
    from rsitr.training.config import load_config
    from rsitr.training.trainer import Trainer

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(synth, out, **extra))
    return Trainer(cfg, show_progress=False)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("sgd", torch.optim.SGD)])  # fmt: skip
def test_optimiser_choice_and_weight_decay_groups(tiny_synth: Path, tmp_path: Path, name, cls) -> None:
    from rsitr.models import create_method

    t = _trainer(tiny_synth, tmp_path, **{"optim.name": name, "optim.weight_decay": 0.1})
    t.method = create_method("dual", {"image_encoder": "tiny-cnn", "text_encoder": "tiny-text",
                                      "freeze_image": False, "freeze_text": False}, pretrained=False)  # fmt: skip
    opt = t._optimizer()
    assert type(opt) is cls
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    biases = [p for n, p in t.method.named_parameters() if n.endswith(".bias")]
    assert biases and not any(id(p) in decayed for p in biases)
    t.cfg.optim.decay_norm_bias = True
    opt = t._optimizer()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(p) in decayed for p in biases)


@pytest.mark.parametrize("augment", ["none", "rs", "crop_flip", "clip"])
def test_named_augmentations_train(tiny_synth: Path, tmp_path: Path, augment: str) -> None:
    from rsitr.data.transforms import build_train_transform

    img = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    tr = build_train_transform(augment, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a, b = tr(img), tr(img)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) == (augment == "none")  # the random ones differ between calls
    t = _trainer(tiny_synth, tmp_path, **{"data.augment": augment, "optim.epochs": 1})
    assert t.fit()["best_val"]["mR"] >= 0
    with pytest.raises(ConfigError, match="augment"):
        build_train_transform("autoaugment", 64, (0.5,) * 3, (0.25,) * 3)


def test_positives_diagonal_gives_each_pair_its_own_id(tiny_synth: Path, tmp_path: Path) -> None:
    from rsitr.losses.contrastive import batch_positives

    over = {"model.freeze_image": "true", "model.freeze_text": "true", "cache.enabled": "on",
            "model.positives": "diagonal", "optim.epochs": 1}  # fmt: skip
    t = _trainer(tiny_synth, tmp_path, **over)
    summary = t.fit()
    assert summary["best_val"]["mR"] >= 0
    caps = torch.tensor([0, 1, 2, 5])  # captions 0-1 (and 2) belong to image 0
    assert t.caption_to_image[0] == t.caption_to_image[1]
    batch = t._cached_batch(caps, 0, 0, 0, len(caps))
    assert torch.equal(batch_positives(batch), torch.eye(4, dtype=torch.bool))
    t.positives = "image"
    assert batch_positives(t._cached_batch(caps, 0, 0, 0, len(caps)))[0, 1]
    with pytest.raises(ConfigError, match="positives"):
        _trainer(tiny_synth, tmp_path / "x", **{"model.positives": "scene", "optim.epochs": 1}).fit()
