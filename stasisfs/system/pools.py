"""Worker pools: processes (each with its own GIL) where they start, threads otherwise."""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

from stasisfs.system.kernel import die_with_parent
from stasisfs.system.workerprocess import WorkerDied, WorkerProcess

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

STARTUP_TIMEOUT = 60.0
Shared = TypeVar("Shared")
Worker = TypeVar("Worker")
P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PARENT_CHECK_EVERY = 1.0


def exit_with_parent(parent: int | None = None) -> None:
    """In a worker process: leave SIGINT and SIGTERM to the parent, and exit as soon as the parent is gone.

    A terminal's Ctrl-C reaches the whole process group: the parent stops the pool cleanly, and a
    worker that took the signal itself would only print a traceback and break the pool. A pool
    worker whose parent died would otherwise wait forever on its task queue, holding the key in memory.
    """
    if parent is None:  # as the parent said, not as getppid() says now: it may already be gone
        import multiprocessing

        parent_process = multiprocessing.parent_process()
        if parent_process is None:
            return  # a worker thread of the parent itself
        parent = parent_process.pid
    for sig in PARENT_SIGNALS:  # ignored since spawn when the main thread spawned it; made sure of here
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_EVERY)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class StartingPool:
    """Worker processes spawned at construction; `ready()` waits until they answer, or falls back to threads.

    Spawn, not fork: a forked child would inherit open LMDB environments and locks held by
    other threads. Processes can fail to start, e.g. when the interpreter is not executable
    for the user the command runs as; the threads then share the parent's objects instead.
    """

    def __init__(self, workers: int, name: str, initializer: Callable[..., None], initargs: tuple[Any, ...],
                 share_in_threads: Callable[[], None]) -> None:
        # Imported here: a backup's workers are `WorkerProcess`es, and this costs a backup 15 ms and 2 MB a process.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        self._args = (workers, name, initializer, initargs, share_in_threads)
        self._pool: ProcessPoolExecutor | None = None
        self._started: list[Future[None]] = []
        if not os.access(sys.executable, os.X_OK):  # e.g. an interpreter under a home directory this user cannot enter
            return
        with _signals_left_to_the_parent():
            try:
                # The kernel's parent-death signal follows the thread that spawned a worker: only the main thread lives as long as the process.
                main_thread = threading.current_thread() is threading.main_thread()
                self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                                 initargs=(main_thread, initializer, initargs))
                # One task per worker, submitted at once: none finds an idle worker, so every worker is spawned now, here.
                self._started = [self._pool.submit(time.sleep, 0.01) for _ in range(workers)]
            except (OSError, BrokenProcessPool):
                self._discard()

    def ready(self) -> Executor:
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            return self._threads()
        try:
            for future in self._started:
                future.result(timeout=STARTUP_TIMEOUT)
            return self._pool
        except (OSError, BrokenProcessPool, TimeoutError):
            self._discard()
            return self._threads()

    def _threads(self) -> Executor:
        return _thread_pool(*self._args)

    def _discard(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None


class Answer(Protocol[T_co]):
    """A submitted task's result: a thread pool's `Future`, or a worker process's `TaskAnswer`."""

    def result(self, timeout: float | None = None) -> T_co: ...


class TaskRunner(Protocol):
    """Where a backup sends its batches: one worker process, or a thread pool standing in for it."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Answer[T]: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class StartingWorker:
    """One worker process (see `workerprocess`), spawned at construction; `ready()` waits for its initializer.

    Falls back to a one-thread pool running the same code when the process cannot start or initialize.
    """

    def __init__(self, name: str, initializer: Callable[..., object], initargs: tuple[Any, ...], share_in_threads: Callable[[], None]) -> None:
        self._args = (1, name, initializer, initargs, share_in_threads)
        self._worker: WorkerProcess | None = None
        self._started: Answer[object] | None = None
        if not os.access(sys.executable, os.X_OK):  # e.g. an interpreter under a home directory this user cannot enter
            return
        with _signals_left_to_the_parent():
            try:
                self._worker = WorkerProcess(spawned_by_main_thread=threading.current_thread() is threading.main_thread())
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


def process_ids(runners: list[TaskRunner]) -> set[int]:
    """The process ids of worker processes among `runners` (threads have none)."""
    return {runner.pid for runner in runners if isinstance(runner, WorkerProcess)}


def _start_worker(spawned_by_main_thread: bool, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    # The watch thread of `exit_with_parent` takes up to a second to notice a dead parent; meanwhile a
    # worker would go on writing into the repository, where a successor run may be salvaging its packs.
    if spawned_by_main_thread:
        die_with_parent()
    initializer(*initargs)


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


def worker_pool(workers: int, name: str, initializer: Callable[..., None], initargs: tuple[Any, ...],
                share_in_threads: Callable[[], None]) -> Executor:
    """Start `workers` spawned processes and wait until they answer; threads running the same code if they cannot."""
    return StartingPool(workers, name, initializer, initargs, share_in_threads).ready()


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


def spawn_light_workers() -> None:
    """Let spawned workers skip re-running the program's main script.

    Started as the `stasisfs` console script, `__main__` has a file and no spec, so multiprocessing
    makes every spawned worker run that script as `__mp_main__`, importing the whole CLI (about
    10 MB more per worker). Naming it `stasisfs.__main__`, which it is equivalent to, lets the
    workers import only what their tasks need, as under `python -m stasisfs`.
    """
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        main.__spec__ = importlib.machinery.ModuleSpec("stasisfs.__main__", None)
