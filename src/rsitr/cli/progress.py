"""Progress of long CLI jobs: a rich bar with ETA on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rsitr.cli.report import console

_logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@contextmanager
def progress_reporter(label: str, disable: bool = False, log_every: float = 0.1) -> Iterator[Progress]:
    """Yield a ``progress(done, total)`` callback.

    On a terminal it drives a transient bar (done/total, elapsed, ETA). Otherwise (a log file,
    ``nohup``) it logs ``label: done/total, ETA s`` each time another ``log_every`` of the total
    is done, so a long job in the background still shows where it is; a count that goes back
    (a second pass, e.g. a query bank after the gallery) starts the clock again. ``disable``
    (``--json``) silences both.
    """
    if disable:
        yield lambda done, total: None
        return
    if not console.is_terminal:
        t0, last = [time.perf_counter()], [0]  # the last tenth (of log_every) logged

        def log(done: int, total: int) -> None:
            frac = done / total if total else 1.0
            step = int(frac / log_every + 1e-9)
            if step < last[0]:  # a new pass
                t0[0], last[0] = time.perf_counter(), 0
            if step > last[0]:
                last[0] = step
                eta = (time.perf_counter() - t0[0]) * (1 - frac) / frac
                _logger.info("%s: %d/%d, ETA %.0f s", label, done, total, eta)

        yield log
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    columns = (
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    with RichProgress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
