"""Worker pools: processes (each with its own GIL) where they start, threads otherwise."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

STARTUP_TIMEOUT = 60.0
PARENT_CHECK_EVERY = 1.0


def exit_with_parent() -> None:
    """In a worker process: exit as soon as the parent is gone (say, killed mid-backup).

    A pool worker would otherwise wait forever on its task queue, holding the key in memory.
    """
    parent_process = multiprocessing.parent_process()
    if parent_process is None:
        return  # a worker thread of the parent itself
    parent = parent_process.pid  # as the parent said, not as getppid() says now: it may already be gone

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_EVERY)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_pool(workers: int, name: str, initializer: Callable[..., None], initargs: tuple[Any, ...],
                share_in_threads: Callable[[], None]) -> Executor:
    """Start `workers` spawned processes and prove one answers; fall back to threads running the same code.

    Spawn, not fork: a forked child would inherit open LMDB environments and locks held by
    other threads. Processes can fail to start, e.g. when the interpreter is not executable
    for the user the command runs as; the threads then share the parent's objects instead.
    """
    def threads() -> Executor:
        share_in_threads()
        return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=initializer, initargs=initargs)

    if not os.access(sys.executable, os.X_OK):  # e.g. an interpreter under a home directory this user cannot enter
        return threads()
    pool: ProcessPoolExecutor | None = None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs)
        pool.submit(os.getpid).result(timeout=STARTUP_TIMEOUT)
        return pool
    except (OSError, BrokenProcessPool, TimeoutError):
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False, cancel_futures=True)
    return threads()
