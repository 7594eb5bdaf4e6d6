"""The backup's worker process on two pipes: order, errors, full pipes both ways, death, cancelling, fallback."""

from __future__ import annotations

import operator
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stasisfs.system.pools import LeastBusy, StartingWorker, process_ids, spawn_ahead, start_workers
from stasisfs.system.workerprocess import WorkerDied, WorkerProcess


@pytest.fixture
def unrunnable_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sys.executable` names a file this user cannot run."""
    unrunnable = tmp_path / "python"
    unrunnable.write_bytes(b"")
    unrunnable.chmod(0o600)
    monkeypatch.setattr(sys, "executable", str(unrunnable))


@pytest.fixture
def worker() -> Iterator[WorkerProcess]:
    process = WorkerProcess(spawned_by_main_thread=True)
    yield process
    process.kill()


@pytest.mark.timeout(60)
def test_answers_come_back_to_their_own_task_whatever_order_they_are_asked_in(worker: WorkerProcess) -> None:
    answers = [worker.submit(operator.add, n, 1000) for n in range(200)]
    assert answers[150].result() == 1150  # read past 150 others, kept for their tasks
    assert [answer.result() for answer in answers] == [n + 1000 for n in range(200)]
    assert worker.submit(os.getpid).result() == worker.pid != os.getpid()


@pytest.mark.timeout(60)
def test_a_task_that_raises_raises_the_same_error_here_and_the_worker_goes_on(worker: WorkerProcess) -> None:
    failing = worker.submit(int, "not a number")
    after = worker.submit(operator.mul, 6, 7)
    with pytest.raises(ValueError, match="not a number") as raised:
        failing.result()
    assert any("Traceback" in note for note in raised.value.__notes__)  # where it failed, in the worker
    assert after.result() == 42


@pytest.mark.timeout(60)
def test_reading_what_arrived_never_waits_and_tells_when_the_worker_has_nothing_left(worker: WorkerProcess) -> None:
    quick, slow = worker.submit(operator.add, 1, 2), worker.submit(time.sleep, 0.5)
    started = time.monotonic()
    while not quick.done():
        assert worker.read_arrived() is False  # the slow one is still running
    assert time.monotonic() - started < 0.4 and not slow.done()
    while not worker.read_arrived():
        time.sleep(0.01)
    assert slow.done() and quick.result() == 3 and slow.result() is None


@pytest.mark.timeout(60)
def test_big_tasks_and_big_answers_never_block_each_other(worker: WorkerProcess) -> None:
    """Each task and each answer is several times a pipe's buffer, and none is read until all are sent:
    the parent must read answers while the task pipe is full, or both sides wait forever."""
    blob = os.urandom(300_000)
    answers = [worker.submit(operator.add, blob, n.to_bytes(4, "big")) for n in range(40)]
    for n, answer in enumerate(answers):
        assert answer.result() == blob + n.to_bytes(4, "big")


@pytest.mark.timeout(60)
def test_a_killed_worker_is_reported_not_waited_for(worker: WorkerProcess) -> None:
    slow = worker.submit(time.sleep, 30)
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=rf"worker process {worker.pid} was killed by signal 9"):
        slow.result()
    with pytest.raises(WorkerDied):
        for _ in range(1000):  # the task pipe fills up, then reports the closed end
            worker.submit(operator.add, b"x" * 100_000, b"")


@pytest.mark.timeout(60)
def test_cancelling_runs_no_queued_task_and_finishes_the_current_one(worker: WorkerProcess, tmp_path: Path) -> None:
    started = tmp_path / "started"
    worker.submit(os.mkdir, started).result()
    worker.submit(time.sleep, 0.5)
    queued = [worker.submit(os.mkdir, tmp_path / f"queued{n}") for n in range(5)]
    time.sleep(0.1)  # the sleep is running
    begun = time.monotonic()
    worker.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - begun < 5
    assert [p.name for p in tmp_path.iterdir()] == ["started"], "queued tasks ran after the cancel"
    assert worker._process.returncode == 0
    del queued


@pytest.mark.timeout(60)
def test_shutdown_without_cancelling_runs_everything_sent(worker: WorkerProcess, tmp_path: Path) -> None:
    for n in range(5):
        worker.submit(os.mkdir, tmp_path / f"d{n}")
    worker.shutdown(wait=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"d{n}" for n in range(5)]


@pytest.mark.timeout(60)
def test_a_worker_whose_initializer_fails_in_its_process_is_replaced_by_a_thread(tmp_path: Path) -> None:
    """As when a worker cannot open the index itself: the threads share the parent's instead."""
    fd = os.open(tmp_path, os.O_RDONLY)  # open here, and not in a spawned process: fstat fails only there
    shared: list[str] = []
    try:
        runner = StartingWorker("test", os.fstat, (fd,), lambda: shared.append("threads share the parent's")).ready()
        assert shared == ["threads share the parent's"]
        assert runner.submit(os.getpid).result() == os.getpid()
        runner.shutdown()
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("unrunnable_interpreter")
def test_an_interpreter_that_cannot_be_run_means_threads() -> None:
    runner = StartingWorker("test", operator.add, (1, 2), lambda: None).ready()
    assert runner.submit(os.getpid).result() == os.getpid()
    runner.shutdown()


@pytest.mark.timeout(60)
def test_a_worker_that_starts_runs_in_its_own_process() -> None:
    starting = StartingWorker("test", operator.add, (1, 2), lambda: pytest.fail("fell back to threads"))
    runner = starting.ready()
    try:
        assert runner.submit(os.getpid).result() != os.getpid()
    finally:
        runner.shutdown()


@pytest.mark.timeout(60)
def test_workers_spawned_ahead_import_meanwhile_and_are_adopted_with_their_initializer() -> None:
    spawned = spawn_ahead(2, "stasisfs.backup.workers")
    try:
        assert len(spawned) == 2
        runner = StartingWorker("test", operator.add, (1, 2), lambda: pytest.fail("fell back to threads"), spawned=spawned[0]).ready()
        assert runner is spawned[0]
        preloaded = "'stasisfs.backup.workers' in __import__('sys').modules"
        assert runner.submit(eval, preloaded).result() is True  # imported before any task of ours ran
        assert runner.submit(os.getpid).result() == spawned[0].pid != os.getpid()
    finally:
        for worker in spawned:
            worker.shutdown()  # the one never adopted exits as cleanly
    assert all(not Path(f"/proc/{worker.pid}").exists() for worker in spawned)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("unrunnable_interpreter")
def test_no_worker_is_spawned_ahead_where_the_interpreter_cannot_be_run() -> None:
    assert spawn_ahead(2, "json") == []


@pytest.mark.timeout(60)
def test_least_busy_spreads_tasks_hands_over_every_answer_and_reports_failures() -> None:
    runners = start_workers(3, "spread", time.sleep, (0,), lambda: None)
    taken: list[object] = []
    failures: list[BaseException] = []
    spread = LeastBusy(runners, taken.append, failures.append, per_runner=2)
    spread.submit(time.sleep, 3.0)  # keeps one worker busy: the next tasks go to the others meanwhile
    started = time.monotonic()
    for _ in range(12):
        spread.submit(os.getpid)
    assert time.monotonic() - started < 2.5, "no quick task waited behind the slow one"
    spread.submit(int, "not a number")
    spread.shutdown()
    pids = [answer for answer in taken if answer is not None]
    assert len(pids) == 12 and None in taken, "every answer is handed over"
    assert len(set(pids)) >= 2 and set(pids) <= process_ids(runners)
    assert len(failures) == 1 and isinstance(failures[0], ValueError)
