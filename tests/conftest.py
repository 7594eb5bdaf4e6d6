"""Test isolation: private HOME and cache, a weakened KDF (test-only), CLI runs in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_fixture import Server, postgres, s3_endpoint, server  # noqa: F401 - fixtures for every test package

PASSWORD = "correct horse battery staple"


@dataclass
class Cli:
    env: dict[str, str]
    repo: Path
    tmp: Path

    def run(self, *args: str | bytes | Path, input: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        full_env = {**self.env, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "stasisfs", *[os.fsencode(a) if not isinstance(a, bytes) else a for a in args]],
            input=input if input is not None else b"", capture_output=True, env=full_env, timeout=timeout,
            cwd=(env or {}).get("PYTHONPATH"),  # another release's code: `-m` looks in the working directory first
        )

    def ok(self, *args: str | bytes | Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
        done = self.run(*args, **kw)  # type: ignore[arg-type]
        assert done.returncode == 0, f"exit {done.returncode}: {done.stderr.decode(errors='replace')}"
        return done

    def init(self) -> None:
        self.ok("init", "--device", "testbox")

    def backup(self, *args: str | bytes | Path) -> str:
        return self.ok("backup", *args).stdout.decode().strip().splitlines()[-1]

    def add_remote(self, on: Server, *user_options: str, user: str = "alice") -> None:
        """`remote add home` as the first device of a new user on server `on`, with its enrolment code."""
        code = on.add_user(user, *user_options)
        self.ok("remote", "add", "home", on.url, "--user", user, "--enrol-code", code)

    def wipe_device(self) -> None:
        """The device is lost: its repository, cache and configuration are gone."""
        for part in (self.repo, self.tmp / "cache", self.tmp / "home" / ".config"):
            shutil.rmtree(part, ignore_errors=True)

    def tree(self, files: dict[str, str | bytes], name: str = "src") -> Path:
        """A directory of files under this test's temp dir, to back up."""
        root = self.tmp / name
        root.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content.encode() if isinstance(content, str) else content)
        return root

    def another_machine(self, name: str) -> Cli:
        """The same user on another machine: its own repository, home, configuration and cache."""
        home = self.tmp / name
        return Cli(self.env | {"STASISFS_REPO": str(self.tmp / f"{name}-repo"), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                               "XDG_CACHE_HOME": str(self.tmp / f"{name}-cache")}, self.tmp / f"{name}-repo", self.tmp)

    def snapshots(self) -> list[dict[str, object]]:
        return json.loads(self.ok("snapshots", "--json").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STASISFS_")}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        STASISFS_INSECURE_TEST_KDF="1",
        STASISFS_PASSWORD=PASSWORD,
        STASISFS_REPO=str(tmp_path / "repo"),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    yield Cli(env=env, repo=tmp_path / "repo", tmp=tmp_path)


@pytest.fixture(autouse=True)
def _weak_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STASISFS_INSECURE_TEST_KDF", "1")


def processes_started_for(marker: str, *commands: bytes) -> list[int]:
    """Running processes whose command line holds one of `commands` and whose environment holds `marker`
    (a test's temp dir, through XDG_CACHE_HOME or STASISFS_REPO)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
                if not any(mark in command for mark in commands):
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found
