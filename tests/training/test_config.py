"""Typed YAML configs with key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsitr.errors import ConfigError
from rsitr.models import build_config, list_methods
from rsitr.training.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_load() -> None:
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        assert cfg.method in list_methods(), path
        model = {k: v for k, v in cfg.model.items() if k != "positives"}  # positives: the trainer's
        build_config(cfg.method, model)  # model options are valid for the method


def test_strong_base_head_is_the_shipped_recipes() -> None:
    """CMPAGL's ``global_head`` reuses the shipped ``dual`` head: the two must not drift apart."""
    from rsitr.models.methods.dual import STRONG_BASE_HEAD

    model = load_config(REPO / "configs" / "rsicd_offline.yaml").model
    shipped = {
        "kind": model["head"],
        "hidden": model["head_hidden"],
        "dropout": model["dropout"],
        "input_dropout": model["input_dropout"],
        "input_norm": model["input_norm"],
    }
    assert shipped == STRONG_BASE_HEAD


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None, ["optim.lr=3e-4", "optim.epochs=7", "cache.views=identity,hflip", "model.embed_dim=64"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.optim.epochs == 7
    assert cfg.cache.views == ("identity", "hflip")
    assert cfg.model == {"embed_dim": 64}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr: unknown option"),
        ("optim.epochs=abc", "optim.epochs: expected an integer"),
        ("ties=random", "ties: 'random' is not one of"),
        ("optim.schedule=exponential", "optim.schedule"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("method: dual\noptim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")
