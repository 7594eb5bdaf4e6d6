"""Worker pools: processes (each with its own GIL) where they start, threads otherwise."""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from stasisfs.system.workerprocess import TaskAnswer, WorkerDied, WorkerProcess

STARTUP_TIMEOUT = 60.0
Shared = TypeVar("Shared")
Worker = TypeVar("Worker")
P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PARENT_CHECK_EVERY = 1.0


def exit_with_parent(parent: int) -> None:
    """In a worker process: leave SIGINT and SIGTERM to the parent, and exit as soon as the parent is gone.

    A terminal's Ctrl-C reaches the whole process group: the parent stops the pool cleanly, and a
    worker that took the signal itself would only print a traceback and break the pool. A pool
    worker whose parent died would otherwise wait forever on its task queue, holding the key in memory.
    `parent` is as the parent said, not as getppid() says now: it may already be gone.
    """
    for sig in PARENT_SIGNALS:  # ignored since spawn when the main thread spawned it; made sure of here
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_EVERY)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Answer(Protocol[T_co]):
    """A submitted task's result: a thread pool's `Future`, or a worker process's `TaskAnswer`."""

    def result(self, timeout: float | None = None) -> T_co: ...

    def done(self) -> bool: ...


class TaskRunner(Protocol):
    """Where a backup sends its batches: one worker process, or a thread pool standing in for it."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Answer[T]: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class StartingWorker:
    """One worker process (see `workerprocess`), spawned at construction; `ready()` waits for its initializer.

    Falls back to a one-thread pool running the same code when the process cannot start or initialize.
    """

    def __init__(self, name: str, initializer: Callable[..., object], initargs: tuple[Any, ...], share_in_threads: Callable[[], None],
                 spawned: WorkerProcess | None = None) -> None:
        self._args = (1, name, initializer, initargs, share_in_threads)
        self._worker = spawned or _spawn()
        self._started: Answer[object] | None = None
        if self._worker is not None:
            try:
                self._started = self._worker.submit(initializer, *initargs)
            except (OSError, WorkerDied):
                self._discard()

    def ready(self) -> TaskRunner:
        if self._worker is None or self._started is None:
            return _thread_pool(*self._args)
        try:
            self._started.result(timeout=STARTUP_TIMEOUT)
            return self._worker
        except Exception:  # it could not start, or not open what it needs: the threads share the parent's
            self._discard()
            return _thread_pool(*self._args)

    def _discard(self) -> None:
        if self._worker is not None:
            with contextlib.suppress(Exception):
                self._worker.kill()
        self._worker = None


class LeastBusy(Generic[T]):
    """Tasks spread over worker runners, each sent to the one with the fewest unanswered.

    Answers go to `take` (a failed task's exception to `failed`) in the parent's own thread, as
    they are collected: no callback thread contends with the caller for the GIL. At most
    `per_runner` tasks wait on each runner, so the caller runs ahead of the workers by a bounded amount.
    """

    def __init__(self, runners: list[TaskRunner], take: Callable[[T], None], failed: Callable[[BaseException], None],
                 per_runner: int = 2) -> None:
        self._runners = runners
        self._waiting: list[deque[Answer[T]]] = [deque() for _ in runners]
        self._take, self._failed, self._per_runner = take, failed, per_runner

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> None:
        self._collect_finished()
        while min(len(waiting) for waiting in self._waiting) >= self._per_runner:
            self._wait_for_any()
            self._collect_finished()
        number = min(range(len(self._runners)), key=lambda n: len(self._waiting[n]))
        self._waiting[number].append(self._runners[number].submit(fn, *args, **kwargs))

    def _collect_finished(self) -> None:
        for number in range(len(self._runners)):
            self._collect(number, block=False)

    def _wait_for_any(self) -> None:
        """Until some runner's oldest task may have finished (whichever it is: a slow task holds up only its own runner)."""
        oldest = [waiting[0] for waiting in self._waiting if waiting]
        if all(isinstance(answer, TaskAnswer) for answer in oldest):
            select.select([answer.fileno() for answer in oldest if isinstance(answer, TaskAnswer)], [], [])
        elif all(isinstance(answer, Future) for answer in oldest):
            wait([answer for answer in oldest if isinstance(answer, Future)], return_when=FIRST_COMPLETED)
        else:  # some workers fell back to threads: rare enough to wait in order
            with contextlib.suppress(Exception):  # reported when collected
                oldest[0].result()

    def _collect(self, number: int, block: bool) -> None:
        """Hand over this runner's finished answers (waiting for its oldest one when `block`)."""
        waiting = self._waiting[number]
        while waiting:
            try:
                value = waiting[0].result(timeout=None if block else 0)
            except TimeoutError:
                return
            except Exception as exc:  # the task failed, or its worker died
                waiting.popleft()
                self._failed(exc)
            else:
                waiting.popleft()
                self._take(value)
            block = False

    def shutdown(self, cancel: bool = False) -> None:
        """Collect every answer and stop the workers; `cancel` drops the tasks not started yet."""
        try:
            if not cancel:
                for number in range(len(self._runners)):
                    while self._waiting[number]:
                        self._collect(number, block=True)
        finally:
            for runner in self._runners:
                runner.shutdown(wait=True, cancel_futures=cancel)


def start_workers(workers: int, name: str, initializer: Callable[..., object], initargs: tuple[Any, ...],
                  share_in_threads: Callable[[], None]) -> list[TaskRunner]:
    """`workers` worker processes, all spawned before any is waited for (threads where processes cannot start)."""
    starting = [StartingWorker(f"{name}-{n}", initializer, initargs, share_in_threads) for n in range(workers)]
    return [worker.ready() for worker in starting]


def spawn_ahead(count: int, preload: str) -> list[WorkerProcess]:
    """Worker processes spawned before their initializer can run (it may need a key not derived yet).

    Each imports `preload` meanwhile, so interpreter start and imports overlap the parent's own work.
    Fewer than `count` (or none) when processes cannot start here; `StartingWorker(spawned=...)` adopts one.
    """
    spawned: list[WorkerProcess] = []
    for _ in range(count):
        worker = _spawn()
        if worker is None:
            break
        try:
            worker.submit(importlib.import_module, preload)
        except (OSError, WorkerDied):
            worker.kill()
            break
        spawned.append(worker)
    return spawned


def _spawn() -> WorkerProcess | None:
    """A worker process, ignoring the terminal's signals from its start; None where one cannot start."""
    if not os.access(sys.executable, os.X_OK):  # e.g. an interpreter under a home directory this user cannot enter
        return None
    with _signals_left_to_the_parent():
        try:
            return WorkerProcess(spawned_by_main_thread=threading.current_thread() is threading.main_thread())
        except OSError:
            return None


def process_ids(runners: list[TaskRunner]) -> set[int]:
    """The process ids of worker processes among `runners` (threads have none)."""
    return {runner.pid for runner in runners if isinstance(runner, WorkerProcess)}


def _thread_pool(workers: int, name: str, initializer: Callable[..., object], initargs: tuple[Any, ...],
                 share_in_threads: Callable[[], None]) -> Executor:
    share_in_threads()
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=initializer, initargs=initargs)


@contextlib.contextmanager
def _signals_left_to_the_parent() -> Iterator[None]:
    """Spawn workers that ignore SIGINT and SIGTERM from their first instruction on.

    A terminal's Ctrl-C reaches the whole process group, workers still importing included; one
    that took it would die mid-import with a traceback. An ignored disposition survives fork and
    exec (a blocked mask does not: the spawn resets it), so the parent ignores both signals while
    it spawns. It also blocks them meanwhile, and Linux keeps a blocked signal pending even when
    ignored, so the parent still gets a Ctrl-C sent in that window once its handlers are back.
    Only the main thread may change handlers; elsewhere the workers' own initializer ignores them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in PARENT_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class WorkerContext(Generic[Shared, Worker]):
    """What a pool's initializer sets up, as module state its task functions can reach.

    One `Shared` per process: an LMDB environment may be opened only once per process, so a
    worker process opens its own and a parent running its workers as threads hands in its own
    (`share`). One `Worker` per thread.
    """

    def __init__(self) -> None:
        self._shared: Shared | None = None
        self._local = threading.local()

    def share(self, shared: Shared) -> None:
        self._shared = shared

    def shared(self, open_shared: Callable[[], Shared], reusable: Callable[[Shared], bool] = lambda _: True) -> Shared:
        if self._shared is None or not reusable(self._shared):
            self._shared = open_shared()
        return self._shared

    def start(self, worker: Worker) -> None:
        self._local.worker = worker

    @property
    def worker(self) -> Worker:
        worker: Worker | None = getattr(self._local, "worker", None)
        assert worker is not None, "the pool's initializer was not run in this thread"
        return worker
