"""Finished runs on disk: read ``summary.json``/``config.yaml`` and group runs that differ only
in their seed, for mean ± std tables (``rsitr runs --seeds``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

RECALLS = tuple((d, r) for d in ("i2t", "t2i") for r in ("R@1", "R@5", "R@10"))
_NOT_RECIPE = ("seed", "out_dir", "git_commit")


@dataclass
class Run:
    """One finished run: its folder, best val figures, val extras and recipe (config less seed)."""

    path: Path
    summary: dict[str, Any]
    recipe: str
    seed: int | None
    figures: dict[str, float] = field(default_factory=dict)


def _figures(summary: dict[str, Any]) -> dict[str, float]:
    v = summary.get("best_val") or {}
    out = {f"{d} {r}": float(v[d][r]) for d, r in RECALLS if d in v}
    if "mR" in v:
        out["mR"] = float(v["mR"])
    for name, m in (summary.get("best_val_extras") or {}).items():
        if isinstance(m, dict) and "mR" in m and name != "plain":
            out[f"mR {name}"] = float(m["mR"])
    for k in ("train_seconds", "feature_seconds"):
        if k in summary:
            out[k] = float(summary[k])
    return out


def _resolved_model(method: str | None, model: dict[str, Any]) -> dict[str, Any]:
    """The model config with the method's defaults filled in (so that an option written out at
    its default value is the same recipe as one left out)."""
    import dataclasses

    from rsitr.models import build_config

    values = dict(model)
    trainer_keys = {k: values.pop(k) for k in ("positives",) if k in values}
    try:
        full = dataclasses.asdict(build_config(method, values)) if method else values
    except Exception:  # an old or foreign config: compare it as written
        return model
    return {**full, **{k: v for k, v in trainer_keys.items() if v != "image"}}


def _resolved(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's config with today's defaults filled in (runs from before an option existed)."""
    from rsitr.training.config import TrainConfig, from_dict

    try:
        return from_dict(TrainConfig, {k: v for k, v in cfg.items() if k != "git_commit"}).to_dict()
    except Exception:  # a config this version cannot read: compare it as written
        return cfg


def load_run(path: str | Path) -> Run | None:
    """The run in ``path``, or ``None`` when it has no ``summary.json`` (not finished)."""
    path = Path(path)
    f = path / "summary.json"
    if not f.exists():
        return None
    summary = json.loads(f.read_text())
    cfg: dict[str, Any] = {}
    if (path / "config.yaml").exists():
        cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    seed = cfg.get("seed")
    cfg = _resolved(cfg)
    cfg = {k: v for k, v in cfg.items() if k not in _NOT_RECIPE}
    cfg["model"] = _resolved_model(cfg.get("method"), cfg.get("model") or {})
    recipe = json.dumps(cfg, sort_keys=True, default=str)
    return Run(path, summary, recipe, seed, _figures(summary))


@dataclass
class SeedGroup:
    """Runs with the same recipe: their seeds and the mean and sample std of each figure."""

    runs: list[Run]
    mean: dict[str, float]
    std: dict[str, float]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def group_by_seed(runs: list[Run]) -> list[SeedGroup]:
    """Group runs whose configs differ only in ``seed``/``out_dir`` (first-seen order)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.recipe, []).append(r)
    out = []
    for members in groups.values():
        keys = [k for k in members[0].figures if all(k in m.figures for m in members)]
        arr = {k: np.array([m.figures[k] for m in members]) for k in keys}
        out.append(
            SeedGroup(
                members,
                {k: float(a.mean()) for k, a in arr.items()},
                {k: float(a.std(ddof=1)) if len(a) > 1 else 0.0 for k, a in arr.items()},
            )
        )
    return out
