"""Crash injection for the test suite: `STASISFS_TEST_CRASH_AT=<point>[@<n>]` makes the process SIGKILL itself there
(once the point's progress count reaches n, when given); `STASISFS_TEST_TUNING` shortens the intervals a crash must fall between.

Off unless that variable is set; the points mark the steps whose ordering crash safety rests on.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "STASISFS_TEST_CRASH_AT"


def crash_point(name: str, progress: int = 0) -> None:
    wanted, _, at_least = os.environ.get(CRASH_ENV, "").partition("@")
    if wanted == name and progress >= int(at_least or 0):
        os.kill(os.getpid(), signal.SIGKILL)

TUNING_ENV = "STASISFS_TEST_TUNING"  # e.g. "dir-checkpoint=0,worker-flush=0.1": tighter settings, so a test's short run crosses them


def tuned(name: str, default: float) -> float:
    """A pipeline setting (an interval, a size, a count), as the test suite may set it through `STASISFS_TEST_TUNING`."""
    for item in os.environ.get(TUNING_ENV, "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return float(value)
    return default
