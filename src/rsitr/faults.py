"""Fault injection for the crash tests: ``RSITR_CRASH_AT=<point>`` SIGKILLs the process at that
named point, as a power cut would (points: ``step-N``, ``checkpoint-swap:FOLDER``,
``index-batch-N``, ``index-publish``, ``index-cleanup``). Unset in normal runs: a no-op."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """Kill this process (SIGKILL) here if ``RSITR_CRASH_AT`` names this point."""
    if os.environ.get("RSITR_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
