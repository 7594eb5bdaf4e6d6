"""Real-kernel mount tests: the mount runs in its own process; every test has a timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli

FUSERMOUNT = shutil.which("fusermount3") or "fusermount3"


def stasisfs_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - fuse.stasisfs " in line]


def force_unmount(path: str) -> None:
    for args in ([FUSERMOUNT, "-u", path], [FUSERMOUNT, "-u", "-z", path]):
        if subprocess.run(args, capture_output=True, timeout=30).returncode == 0:
            return


@pytest.fixture(scope="session", autouse=True)
def sweep_stale_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Clear mounts that earlier test runs left, never those of this run's other xdist workers."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    base = tmp_path_factory.getbasetemp()
    this_run = str(base.parent if base.name.startswith("popen-gw") else base)

    def stale(path: str) -> bool:
        return "pytest" in path and not path.startswith(this_run + "/")

    for path in stasisfs_mounts():
        if stale(path):
            force_unmount(path)
    yield
    for path in stasisfs_mounts():
        if path.startswith(str(base) + "/"):  # this worker's own leftovers
            force_unmount(path)


def mount_pids(mountpoint: Path) -> list[int]:
    done = subprocess.run(["pgrep", "-f", f"stasisfs mount {mountpoint}"], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


class Mounted:
    def __init__(self, cli: Cli, mountpoint: Path) -> None:
        self.cli = cli
        self.path = mountpoint

    def start(self) -> None:
        self.path.mkdir(exist_ok=True)
        done = self.cli.run("mount", self.path, timeout=90)
        assert done.returncode == 0, done.stderr.decode()

    def stop(self) -> None:
        if str(self.path) in stasisfs_mounts():
            self.cli.run("umount", self.path, timeout=60)
        deadline = time.monotonic() + 10
        while mount_pids(self.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in mount_pids(self.path):
            os.kill(pid, 9)
        if str(self.path) in stasisfs_mounts():
            force_unmount(str(self.path))

    def latest(self) -> Path:
        return self.path / "snapshots" / "latest"


@pytest.fixture
def mounted(cli: Cli) -> Iterator[Mounted]:
    m = Mounted(cli, cli.tmp / "mnt")
    yield m
    m.stop()
