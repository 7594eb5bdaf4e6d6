"""Crash injection for the test suite: `STASISFS_TEST_CRASH_AT=<point>` makes the process SIGKILL itself there.

Off unless that variable is set; the points mark the steps whose ordering crash safety rests on.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "STASISFS_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
