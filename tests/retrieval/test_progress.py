"""Progress of long CLI jobs: one pass over all test-time views, log lines off a terminal."""

from __future__ import annotations

import logging

import pytest

from rsitr.cli.progress import progress_reporter
from rsitr.retrieval.embed import view_progress


def test_view_progress_runs_once_over_all_views() -> None:
    seen: list[tuple[int, int]] = []
    for v in range(3):
        cb = view_progress(lambda d, t: seen.append((d, t)), v, 3)
        assert cb is not None
        for done in (4, 10):
            cb(done, 10)
    assert seen == [(4, 30), (10, 30), (14, 30), (20, 30), (24, 30), (30, 30)]
    assert view_progress(None, 1, 3) is None


def test_progress_off_a_terminal_logs_each_tenth_and_restarts(caplog: pytest.LogCaptureFixture) -> None:
    # pytest's stdout is not a terminal
    with caplog.at_level(logging.INFO, logger="rsitr.cli.progress"), progress_reporter("images") as progress:
        for done in range(0, 101):
            progress(done, 100)
        for done in (50, 100):  # a second pass (a query bank)
            progress(done, 200)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 12, lines  # 10 %, 20 %, …, 100 % of the first pass, then 25 %, 50 %
    assert [m.split(",")[0] for m in lines[:10]] == [f"images: {10 * i}/100" for i in range(1, 11)]
    assert lines[10].startswith("images: 50/200") and lines[11].startswith("images: 100/200")


def test_progress_disabled_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="rsitr.cli.progress"),
        progress_reporter("images", disable=True) as p,
    ):
        p(5, 10)
    assert not caplog.records
