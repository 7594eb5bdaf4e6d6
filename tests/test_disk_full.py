"""A full disk under the repository: one clear line, nothing lost, the repository still checks out."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Cli


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def one_big_file(src: Path) -> None:
    (src / "big.bin").write_bytes(os.urandom(12 * 1024 * 1024))  # more than the disk holds; packed by the parent


def many_small_files(src: Path) -> None:
    for n in range(240):  # 12 MB again: past the first 4 MiB the worker processes pack it, and hit the full disk
        (src / f"part{n:03}.bin").write_bytes(os.urandom(50_000))


@pytest.mark.parametrize("fill", [one_big_file, many_small_files])
def test_backup_on_a_full_disk(cli: Cli, small_disk: Path, fill: Callable[[Path], None]) -> None:
    cli.env["STASISFS_REPO"] = str(small_disk / "repo")
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "small.txt").write_text("fits\n")
    first = cli.backup(src)
    fill(src)
    done = cli.run("backup", src)
    assert done.returncode == 1
    assert b"no space left" in done.stderr and b"Traceback" not in done.stderr
    assert [s["id"] for s in cli.snapshots()] == [first]  # no junk snapshot
    assert not list((small_disk / "repo" / "locks").iterdir())  # the lock was released
    assert not [p for p in (small_disk / "repo" / "data").iterdir() if p.name.startswith(".tmp-")]  # open packs dropped
    cli.ok("check", "--read-data")
    assert cli.ok("dump", f"{first}:{src}/small.txt").stdout == b"fits\n"
