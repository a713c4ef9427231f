"""``rsitr train CONFIG --smoke`` for every shipped config (CPU, offline, random weights), and the
one-line error of a config whose named weights cannot be loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rsitr.cli import run

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "src" / "rsitr" / "configs").glob("*.yaml"))
#: full-size towers (ResNet-101, BERT-base, Swin-T, CLIP ViT-B/32): 20–50 s each on 2 cores
FULL_SIZE = ("bert", "clip", "resnet", "gswin", "georsclip")


def _model_key(path: Path) -> str:
    cfg = yaml.safe_load(path.read_text())
    return json.dumps([cfg["method"], cfg["model"]], sort_keys=True)


#: configs whose method and model section repeat an earlier config's (one recipe on two
#: datasets) share its smoke run: the model it builds and steps is the same
SMOKED = list({_model_key(p): p for p in reversed(CONFIGS)}.values())[::-1]


def _param(path: Path) -> object:
    slow = any(k in path.stem for k in FULL_SIZE)
    return pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("config", [_param(p) for p in CONFIGS])
def test_every_shipped_config_validates(config: Path) -> None:
    from rsitr.training.config import load_config

    cfg = load_config(config)
    assert cfg.method == yaml.safe_load(config.read_text())["method"]


def test_smoke_runs_cover_every_model_section() -> None:
    assert {_model_key(p) for p in SMOKED} == {_model_key(p) for p in CONFIGS}
    assert len(SMOKED) < len(CONFIGS)


@pytest.mark.parametrize("config", [_param(p) for p in SMOKED])
def test_smoke_runs_every_shipped_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["train", str(config), "--smoke", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = yaml.safe_load(config.read_text())
    assert report["method"] == cfg["method"] and report["steps"] == 2
    assert 0 < report["params_trained"] <= report["params_total"]
    assert 0 < report["params_inference"] <= report["params_total"]
    assert report["step_seconds"] > 0 and report["peak_memory_mb"] > 0
    assert 0 <= report["val_mR"] <= 100
    training_only = cfg["method"] == "cmpagl" or (
        cfg["method"] == "msa" and cfg["model"].get("preset", "msa") in ("msa", "base+m+a+b")
    )
    if training_only:  # MSCMAT, ITM/MLM heads and momentum encoders do not embed at inference
        assert report["params_inference"] < report["params_total"]
    hub_text = str(cfg["model"].get("text_encoder", "")).startswith("hf:bert-base-uncased")
    assert bool(report["substitutes"]) == hub_text
    if hub_text:  # BERT-base itself, random, with MiniLM's identical uncased vocabulary
        assert "bert-base-uncased: its architecture" in report["substitutes"][0]
        assert report["params_trained"] > 108_000_000  # BERT-base alone is 108.9 M without its pooler


def test_config_naming_unloadable_weights_fails_in_one_line(
    tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline, ``rsitr train`` of a config that names hub weights stops before training, with one
    line that names the weights and how to get them; it never trains on random weights."""
    config = CONFIGS[0].parent / "msa_rsicd_resnet101_bert.yaml"
    overrides = [
        f"data.source={tiny_synth / 'dataset_synth.json'}", f"data.images={tiny_synth / 'images'}",
        f"data.labels={tiny_synth / 'labels.csv'}",
        "data.carve_from=null", f"out_dir={tmp_path / 'run'}", "model.text_encoder=minilm-l6",
    ]  # fmt: skip
    assert run(["train", str(config), *overrides]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    err = errors[0]
    assert "timm/resnet101.tv_in1k" in err and "not available offline" in err and "pretrained: false" in err
    assert not (tmp_path / "run" / "last").exists()
