"""One worker process on two pipes: tasks go in, answers come back in the order the tasks were sent.

A backup's chunking worker takes one stream of batches and answers them in order, so it needs none
of a process pool's scheduling. `ProcessPoolExecutor` cost the parent 148 µs of CPU per task against
14 µs over a bare pipe: each task passes through two threads of its own and a wake-up pipe, and every
hand-off waits for the GIL the walk holds. Its spawn context also starts a resource-tracker process
(7 MB). Here the thread that submits writes the task, and the thread that wants an answer reads it.

No deadlock on full pipes: while a task does not fit in the task pipe, the parent reads the answers
the worker may be blocked writing (`WorkerProcess._write`). A task's exception comes back as its answer.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

from stasisfs.errors import StasisError

MARK = "stasisfs-worker"  # in the worker's command line: what `ps` shows, and what tests look for
CANCEL_SIGNAL = signal.SIGUSR1  # the worker runs no task it has not started yet
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where `stasisfs` is imported from, installed or not
_CHILD = f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from stasisfs.system.workerprocess import serve; serve()"

P = ParamSpec("P")
T = TypeVar("T")


class WorkerDied(StasisError):
    """A worker process exited before answering (killed, or out of memory)."""


class WorkerProcess:
    """A spawned interpreter running the tasks it is sent, one at a time, in order."""

    def __init__(self, spawned_by_main_thread: bool) -> None:
        task_read, self._task_fd = os.pipe()
        answer_fd, answer_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, MARK, str(task_read), str(answer_write), str(os.getpid()), str(int(spawned_by_main_thread))],
                pass_fds=(task_read, answer_write), stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(self._task_fd)
            os.close(answer_fd)
            raise
        finally:
            os.close(task_read)
            os.close(answer_write)
        os.set_blocking(self._task_fd, False)
        self._answers = Connection(answer_fd, writable=False)
        self.pid = self._process.pid
        self._lock = threading.Lock()  # one thread at a time talks to the worker
        self._sent = 0
        self._received: dict[int, tuple[bool, Any]] = {}  # answers read before anyone asked for them
        self._outstanding: set[int] = set()
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> TaskAnswer[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError("submit after shutdown")
            number = self._sent
            payload = pickle.dumps((number, fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
            # The framing `Connection.recv` reads: a 4-byte length, or -1 and an 8-byte one.
            header = struct.pack("!i", len(payload)) if len(payload) < 0x7FFFFFFF else struct.pack("!iQ", -1, len(payload))
            self._write(header + payload)
            self._sent += 1
            self._outstanding.add(number)
        return TaskAnswer(self, number)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._task_fd, view):]
            except BlockingIOError:
                # The worker is not reading: it may be blocked writing an answer to us. Read it, or wait for room.
                poller = select.poll()
                poller.register(self._task_fd, select.POLLOUT)
                poller.register(self._answers.fileno(), select.POLLIN)
                if any(fd == self._answers.fileno() for fd, _ in poller.poll()):
                    self._receive()
            except BrokenPipeError:
                raise self._died() from None

    def _receive(self) -> None:
        try:
            number, ok, value = self._answers.recv()
        except (EOFError, OSError):
            raise self._died() from None
        self._outstanding.discard(number)
        self._received[number] = (ok, value)

    def _died(self) -> WorkerDied:
        try:
            code: int | None = self._process.wait(timeout=1)  # its pipes closed as it died: it is being reaped
        except subprocess.TimeoutExpired:
            code = None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}" if code else "exited"
        return WorkerDied(f"worker process {self.pid} {how} before finishing its work (out of memory?); "
                          "nothing finished is lost: run the command again to resume")

    @property
    def answer_fd(self) -> int:
        return self._answers.fileno()

    def read_arrived(self) -> bool:
        """Read the answers already in the pipe, waiting for no more; True when every task sent is answered (the worker idles)."""
        with self._lock:
            while self._outstanding and self._answers.poll(0):
                self._receive()
            return not self._outstanding

    def answered(self, number: int) -> bool:
        """Task `number`'s answer was read (`answer` returns it without waiting)."""
        return number in self._received

    def answer(self, number: int, timeout: float | None = None) -> Any:
        with self._lock:
            while number not in self._received:
                if timeout is not None and not self._answers.poll(timeout):
                    raise TimeoutError(f"worker process {self.pid} did not answer within {timeout:.0f} s")
                self._receive()
            ok, value = self._received.pop(number)
        if not ok:
            raise value
        return value

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the task pipe: the worker exits once it has run what it was sent (or, cancelling, its current task)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures and self._outstanding and self._process.poll() is None:
                os.kill(self.pid, CANCEL_SIGNAL)
            os.close(self._task_fd)
            if wait:
                # Its last answers may not fit in the pipe: read them, or it never exits.
                while True:
                    try:
                        self._answers.recv_bytes()
                    except (EOFError, OSError):
                        break
                self._process.wait()
            self._answers.close()

    def kill(self) -> None:
        """For a worker that never became ready: it holds nothing of the run yet."""
        if self._process.poll() is None:
            self._process.kill()
        self.shutdown(wait=False)


class TaskAnswer(Generic[T]):
    """A submitted task's answer; `result()` reads the worker's answers up to this one."""

    __slots__ = ("_number", "_outcome", "_worker")

    def __init__(self, worker: WorkerProcess, number: int) -> None:
        self._worker, self._number = worker, number
        self._outcome: tuple[T] | None = None

    def fileno(self) -> int:
        """The worker's answer pipe: readable once this or an earlier answer of the same worker may have come."""
        return self._worker.answer_fd

    def done(self) -> bool:
        """Answered, as far as the answers read so far tell (`WorkerProcess.read_arrived` reads more)."""
        return self._outcome is not None or self._worker.answered(self._number)

    def result(self, timeout: float | None = None) -> T:
        if self._outcome is None:
            self._outcome = (self._worker.answer(self._number, timeout),)
        return self._outcome[0]


def serve() -> None:
    """The worker's main loop: run each task received, answer with its value or its exception."""
    from stasisfs.system.kernel import die_with_parent
    from stasisfs.system.pools import exit_with_parent

    task_fd, answer_fd, parent, spawned_by_main_thread = (int(arg) for arg in sys.argv[2:6])
    if spawned_by_main_thread:  # the parent-death signal follows the thread that spawned us
        die_with_parent()
    exit_with_parent(parent)
    cancelled = threading.Event()
    signal.signal(CANCEL_SIGNAL, lambda signum, frame: cancelled.set())
    tasks, answers = Connection(task_fd, writable=False), Connection(answer_fd, readable=False)
    while not cancelled.is_set():
        try:
            number, fn, args, kwargs = tasks.recv()
        except EOFError:
            return
        try:
            answer: tuple[int, bool, Any] = (number, True, fn(*args, **kwargs))
        except BaseException as exc:  # the parent decides what it means
            exc.add_note("".join(traceback.format_exception(exc)).rstrip())
            answer = (number, False, exc)
        try:
            answers.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            answers.send((number, False, RuntimeError(f"a worker's answer could not be sent back: {exc!r}")))
