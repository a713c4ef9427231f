"""Fault injection for the crash tests: ``RSITR_CRASH_AT=<point>`` SIGKILLs the process at that
named point, as a power cut would (points: ``step-N``, ``checkpoint-swap:FOLDER``,
``index-batch-N``, ``index-publish``, ``index-cleanup``, ``ray-embed-batch-N``). With
``RSITR_CRASH_ONCE=<folder>`` too, only the first process to reach the point dies (it leaves a
marker file there), which is how a test kills one Ray worker mid-build. Unset in normal runs:
a no-op."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """Kill this process (SIGKILL) here if ``RSITR_CRASH_AT`` names this point."""
    if os.environ.get("RSITR_CRASH_AT") != name:
        return
    once = os.environ.get("RSITR_CRASH_ONCE")
    if once:
        try:  # O_EXCL: of several processes reaching the point, exactly one creates the marker
            os.close(os.open(os.path.join(once, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
