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


def test_two_runs_on_one_cache_split_the_shards(tmp_path: Path) -> None:
    """A second run filling the same cache meanwhile: the first skips what it wrote."""
    first: list[tuple[int, int]] = []
    second: list[tuple[int, int]] = []
    compute_second = _compute(second)
    compute_first = _compute(first)

    def first_run(s: int, e: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if s == 0:  # while the first run computes shard 0, the second fills every shard
            FeatureCache(tmp_path, shard_size=3).get({"k": 3}, N, compute_second)
        return compute_first(s, e)

    reported: list[tuple[int, int]] = []
    feats, valid = FeatureCache(tmp_path, shard_size=3).get(
        {"k": 3}, N, first_run, progress=lambda done, total: reported.append((done, total))
    )
    assert second == [(0, 3), (3, 6), (6, 7)]
    assert first == [(0, 3)]  # shards 1 and 2 were already there
    assert reported == [(7, 7)] * 3  # the other run's shards count as done: no jump at the end
    assert torch.equal(feats["map"], FULL["map"]) and torch.equal(valid, VALID)
    assert not list(tmp_path.rglob("*.tmp"))


def test_trainer_holds_the_train_image_features_once(
    tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train views are written straight into one (V, N, …) stack, each view is a slice of it,
    and no source-wide image set outlives setup (before, the train features were held three
    times: the source-wide sets, their train rows, and the stack)."""
    import weakref

    from rsitr.training.config import load_config
    from rsitr.training.trainer import Trainer
    from tests.training.conftest import tiny_overrides

    read: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    images: list[dict[str, torch.Tensor]] = []
    real_get = FeatureCache.get

    def spying_get(self: FeatureCache, payload: dict, n: int, compute, progress=None):  # type: ignore[no-untyped-def]
        feats, valid = real_get(self, payload, n, compute, progress)
        if "view" in payload:  # an image set (caption sets have no view)
            alive.append(sum(r() is not None for r in read))  # earlier image sets still held
            read.extend(weakref.ref(v) for v in feats.values())
            images.append({k: v.clone() for k, v in feats.items()})
        return feats, valid

    overrides = tiny_overrides(
        tiny_synth, tmp_path, **{"model.freeze_image": "true", "model.freeze_text": "true",
                                 "cache.enabled": "on", "cache.views": "[identity, hflip, rot90]",
                                 "optim.epochs": 1})  # fmt: skip
    monkeypatch.setattr(FeatureCache, "get", spying_get)
    trainer = Trainer(load_config(None, overrides), show_progress=False)
    trainer.fit()
    assert len(images) >= 4  # three train views, then val's identity (and val's views at the end)
    assert alive == [0] * len(alive)  # one source-wide image set at a time: peak = stack + one set
    assert all(r() is None for r in read)  # and none outlives setup
    feats = trainer.train_feats
    assert feats is not None and feats.n_views == 3
    stack, views = feats.image_stack, feats.image_views
    scope = trainer._scopes[trainer.train_corpus.source]
    assert scope is not None and scope.num_images > trainer.train_corpus.num_images  # all splits
    row_of = {im.filename: i for i, im in enumerate(scope.images)}
    rows = [row_of[im.filename] for im in trainer.train_corpus.images]
    for k, s in stack.items():
        assert s.shape[:2] == (3, trainer.train_corpus.num_images)
        for i in range(3):
            assert views[i][k].data_ptr() == s[i].data_ptr()  # a slice, not a copy
            assert torch.equal(s[i], images[i][k][rows])  # view i's train rows, in corpus order
