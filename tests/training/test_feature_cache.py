"""FeatureCache: shards written once, read back into one tensor per feature with dtypes kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsitr.training.feature_cache import FeatureCache

N = 7
FULL = {
    "map": torch.randn(N, 3, 2, 2, generator=torch.Generator().manual_seed(0)).half(),
    "ids": torch.arange(N * 4).reshape(N, 4),
}
VALID = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)


def _compute(calls: list[tuple[int, int]]):
    def compute(s: int, e: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        calls.append((s, e))
        return {k: v[s:e].clone() for k, v in FULL.items()}, VALID[s:e].clone()

    return compute


def test_uneven_shards_read_back_as_the_whole_set(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    cache = FeatureCache(tmp_path, shard_size=3)  # shards of 3, 3 and 1 rows
    feats, valid = cache.get({"k": 1}, N, _compute(calls))
    assert calls == [(0, 3), (3, 6), (6, 7)]
    for k, v in FULL.items():
        assert feats[k].dtype == v.dtype and feats[k].shape == v.shape
        assert torch.equal(feats[k], v)
    assert valid.dtype == torch.bool and torch.equal(valid, VALID)

    def never(s: int, e: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise AssertionError("a complete set is read, not recomputed")

    again, valid2 = FeatureCache(tmp_path, shard_size=3).get({"k": 1}, N, never)
    assert all(torch.equal(again[k], FULL[k]) for k in FULL) and torch.equal(valid2, VALID)


def test_an_interrupted_extraction_resumes_at_the_first_missing_shard(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    compute = _compute(calls)

    def dies_on_the_last(s: int, e: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if s == 6:
            raise KeyboardInterrupt
        return compute(s, e)

    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path, shard_size=3).get({"k": 2}, N, dies_on_the_last)
    calls.clear()
    feats, valid = FeatureCache(tmp_path, shard_size=3).get({"k": 2}, N, compute)
    assert calls == [(6, 7)]
    assert torch.equal(feats["map"], FULL["map"]) and torch.equal(valid, VALID)
