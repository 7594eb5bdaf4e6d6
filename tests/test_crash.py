"""SIGKILL during backup at several moments: the repository stays valid and the next run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from conftest import Cli, processes_started_for


def workers_of(marker: str) -> list[int]:
    """Worker and helper processes started for this test's repository (found by their environment)."""
    return processes_started_for(marker, b"stasisfs-worker", b"stasisfs-presign")


def assert_no_orphan_workers(marker: str) -> None:
    deadline = time.monotonic() + 10
    while workers_of(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers_of(marker) == [], "worker processes outlived the killed backup (they hold the key)"


def packed_bytes(cli: Cli) -> int:
    return sum(p.stat().st_size for p in cli.repo.glob("data/*/*"))


# The moment of the kill, chosen by what the run has done so far (never by a fixed sleep).
MOMENTS: dict[str, Callable[[Cli], bool]] = {
    "workers started": lambda cli: bool(workers_of(cli.env["XDG_CACHE_HOME"])),
    "a pack open": lambda cli: bool(list(cli.repo.glob("data/.tmp-pack-*"))),
    "first pack written": lambda cli: packed_bytes(cli) > 0,
    "half written": lambda cli: packed_bytes(cli) >= 36_000_000,
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_during_backup_then_check_and_resume(cli: Cli, moment: str) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    for i in range(12):  # incompressible, several packs' worth
        (src / f"file{i}.bin").write_bytes(os.urandom(6_000_000))
    for i in range(300):
        (src / f"small{i}.txt").write_text(f"small file {i}\n" * 20)
    proc = subprocess.Popen([sys.executable, "-m", "stasisfs", "backup", str(src)], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reached = MOMENTS[moment]
    deadline = time.monotonic() + 120
    while proc.poll() is None and not reached(cli) and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the backup finished before {moment!r}; the test data is too small"
    assert_no_orphan_workers(cli.env["XDG_CACHE_HOME"])
    cli.ok("check", "--read-data")
    written_before = packed_bytes(cli)
    summary = cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1]
    import json

    doc = json.loads(summary)
    if written_before > 0 and doc["files_new"] > 0:
        assert doc["data_added"] < 72_000_000 + 300 * 300  # chunks the killed run wrote were reused
    cli.ok("check", "--read-data")
    snaps = cli.snapshots()
    assert all(s["summary"]["total_files"] == 312 for s in snaps)  # type: ignore[index]  # no junk snapshots
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out, "--verify")
    restored = out / str(src).lstrip("/")
    for path in src.iterdir():
        assert (restored / path.name).read_bytes() == path.read_bytes()


@pytest.mark.timeout(300)
def test_a_backup_killed_late_resumes_from_its_checkpoints(cli: Cli) -> None:
    """Killed at 80% or later: the next run reads again only what the killed one had not finished."""
    import json

    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    total = 0
    for i in range(40):
        data = os.urandom(5_000_000)
        (src / f"file{i:02}.bin").write_bytes(data)
        total += len(data)
    proc = subprocess.Popen([sys.executable, "-m", "stasisfs", "backup", str(src)], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(p.stat().st_size for p in cli.repo.glob("data/*/*")) >= total * 0.8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the backup finished before the 80% mark was seen; the test data is too small"
    doc = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert doc["files_unmodified"] >= 20, doc  # checkpointed files are not read again
    assert doc["data_added"] < total * 0.3, doc
    cli.ok("check", "--read-data")
