"""Crash safety as a real kill: ``rsitr train`` in a subprocess is SIGKILLed mid-epoch and between
the two renames of a checkpoint save (``RSITR_CRASH_AT``), then resumed; it must end with the
same weights as a run that was never interrupted. A non-finite loss stops training in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsitr.cli import run
from tests.training.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _config(folder: Path) -> str:
    """A one-line config; the overrides hold the rest."""
    path = folder / "dual.yaml"
    path.write_text("method: dual\n")
    return str(path)


def _train(folder: Path, overrides: list[str], crash_at: str | None = None, resume: bool = False) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RSITR_CRASH_AT", None)
    if crash_at:
        env["RSITR_CRASH_AT"] = crash_at
    config = _config(folder)
    argv = [sys.executable, "-m", "rsitr", "train", config, *overrides, *(["--resume"] if resume else [])]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600).returncode


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "run" / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _train(out, tiny_overrides(tiny_synth, out, **{"optim.epochs": 3})) == 0
    return _weights(out)


@pytest.mark.parametrize("crash_at", ["step-3", "checkpoint-swap:last"])
def test_killed_training_resumes_to_the_same_weights(
    crash_at: str, reference: dict[str, torch.Tensor], tiny_synth: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(tiny_synth, tmp_path, **{"optim.epochs": 3})
    assert _train(tmp_path, overrides, crash_at=crash_at) == -signal.SIGKILL
    run_dir = tmp_path / "run"
    if crash_at.startswith("checkpoint-swap"):  # killed in the window: only last.old and last.tmp
        assert not (run_dir / "last").exists() and (run_dir / "last.tmp" / "state.json").exists()
    assert _train(tmp_path, overrides, resume=True) == 0
    resumed = _weights(tmp_path)
    assert resumed.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k


def test_non_finite_loss_stops_in_one_line(
    tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(tiny_synth, tmp_path, **{"optim.epochs": 2, "optim.lr": 1e30,
                                                        "optim.backbone_lr": 1e30})  # fmt: skip
    assert run(["train", _config(tmp_path), *overrides]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss at step" in errors[0] and "_loss" in errors[0]
