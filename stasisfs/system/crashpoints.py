"""Crash injection for the test suite: `STASISFS_TEST_CRASH_AT=<point>[@<n>]` makes the process SIGKILL itself there
(once the point's progress count reaches n, when given).

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
