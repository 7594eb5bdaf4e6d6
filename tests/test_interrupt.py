"""Ctrl-C as a terminal sends it (SIGINT to the whole process group) and SIGTERM, during restore and backup.

Each interruption must end within seconds with one line and exit 130 (0 if the snapshot was
already saved), print no traceback, and leave nothing that a rerun would not finish exactly.
The moment is chosen by progress on disk, never by a fixed sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Cli

pytestmark = pytest.mark.timeout(300)


def make_tree(root: Path) -> Path:
    for d in range(20):
        sub = root / f"dir{d:02d}"
        sub.mkdir(parents=True)
        for f in range(150):
            (sub / f"f{f:03d}").write_bytes(hashlib.sha256(f"{d}/{f}".encode()).digest() * 600 + os.urandom(64))
    (root / "big").write_bytes(os.urandom(24 << 20))
    return root


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest() for p in sorted(root.rglob("*")) if p.is_file()}


def interrupt_when(cli: Cli, args: list[str], ready: Callable[[int], bool], sig: int) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run the CLI in its own process group; when `ready(pid)`, signal the whole group. Returns the result and the seconds it took to end."""
    proc = subprocess.Popen([sys.executable, "-m", "stasisfs", *args], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the command finished before the moment came; the tree is too small for this machine"
    os.killpg(proc.pid, sig)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - sent


def restored_files(target: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(target))


@pytest.mark.parametrize("at_files,sig", [(1, signal.SIGINT), (1200, signal.SIGINT), (600, signal.SIGTERM)])
def test_an_interrupted_restore_stops_cleanly_and_a_rerun_finishes_it_exactly(cli: Cli, at_files: int, sig: int) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    cli.backup(src)
    target = cli.tmp / "out"
    done, took = interrupt_when(cli, ["restore", "latest", "--target", str(target)], lambda _pid: restored_files(target) >= at_files, sig)
    assert done.returncode == 130, done.stderr.decode()
    assert b"interrupted: " in done.stderr and b"run the same command to finish" in done.stderr
    assert b"Traceback" not in done.stderr and took < 15
    restored = target / str(src).lstrip("/")
    # Nothing that looks complete is wrong: every file under its real name has its full content.
    expected = contents(src)
    for name, digest in contents(restored).items():
        if not name.split("/")[-1].startswith(".stasisfs-partial-"):
            assert expected[name] == digest, f"{name} looks complete but is not"
    cli.ok("restore", "latest", "--target", target, "--overwrite", "if-newer")
    assert contents(restored) == expected  # and no partial file is left over


@pytest.mark.parametrize("at_packs,sig", [(1, signal.SIGINT), (3, signal.SIGTERM)])
def test_an_interrupted_backup_stops_cleanly_and_the_next_run_is_exact(cli: Cli, at_packs: int, sig: int) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    packs = cli.repo / "data"

    def written() -> int:
        return sum(len(files) for _, _, files in os.walk(packs))

    done, took = interrupt_when(cli, ["backup", str(src)], lambda _pid: written() >= at_packs, sig)
    assert b"Traceback" not in done.stderr and took < 15
    if done.returncode == 0:  # the snapshot was saved just before the signal
        assert b"was saved" in done.stderr
    else:
        assert done.returncode == 130 and b"interrupted: nothing saved" in done.stderr, done.stderr.decode()
    cli.backup(src)
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    assert contents(cli.tmp / "out" / str(src).lstrip("/")) == contents(src)
    cli.ok("check", "--read-data")


def reads_a_pack(pid: int) -> bool:
    """Whether the process has a pack file open: a moment inside `check --read-data` that no sleep has to guess."""
    try:
        return any("/data/" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_any_other_long_command_interrupted_says_so_in_one_line(cli: Cli) -> None:
    cli.init()
    cli.backup(make_tree(cli.tmp / "src"))
    done, took = interrupt_when(cli, ["check", "--read-data"], reads_a_pack, signal.SIGINT)
    assert done.returncode == 130 and done.stderr.decode().strip().splitlines()[-1] == "stasisfs: interrupted", done.stderr.decode()
    assert b"Traceback" not in done.stderr and took < 15


def test_ctrl_c_at_the_password_prompt_is_an_interruption(cli: Cli) -> None:
    """On a terminal, Ctrl-C at the prompt exits 130 like any interruption (Ctrl-D is 'no password entered')."""
    import pty

    cli.init()
    env = {k: v for k, v in cli.env.items() if k != "STASISFS_PASSWORD"}
    for key, expected_code, expected_line in ((signal.SIGINT, 130, "stasisfs: interrupted"), (None, 1, "stasisfs: error: no password entered")):
        pid, fd = pty.fork()
        if pid == 0:  # the child: stasisfs on the pty, as from a terminal
            os.execve(sys.executable, [sys.executable, "-m", "stasisfs", "snapshots"], env)
        seen = b""
        deadline = time.monotonic() + 60
        while b"password: " not in seen and time.monotonic() < deadline:
            seen += os.read(fd, 1024)
        if key is None:
            os.write(fd, b"\x04")  # Ctrl-D
        else:
            os.killpg(os.getpgid(pid), key)  # what the terminal sends: the whole foreground group
        output = seen
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 1024):
                output += chunk
        _, status = os.waitpid(pid, 0)
        text = output.decode(errors="replace").replace("\r", "")
        assert os.waitstatus_to_exitcode(status) == expected_code, text
        assert text.strip().splitlines()[-1].endswith(expected_line) and "Traceback" not in text, text
