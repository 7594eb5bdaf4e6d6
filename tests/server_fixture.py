"""A real stasisfs-server on loopback, in a subprocess, on port 0."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    data: Path
    extra_args: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)
    url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("STASISFS_")}, "PYTHONPATH": str(ROOT)}

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stasisfs_server", "--data", str(self.data), *self.extra_args, *args],
                              capture_output=True, text=True, env=self.env(), timeout=60)

    def add_user(self, name: str, *options: str) -> str:
        done = self.admin("user", "add", name, *options)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def start(self, listen: str = "127.0.0.1:0") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stasisfs_server", "--data", str(self.data), *self.extra_args, "serve", "--listen", listen, *self.serve_args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env())
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        buffered = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffered += chunk
                for line in buffered.decode(errors="replace").splitlines():
                    if line.startswith("listening on "):
                        self.url = line.split()[-1]
                        return
            if self.process.poll() is not None:
                break
        raise RuntimeError(f"server did not start: {buffered.decode(errors='replace')}")

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server-data")
    srv.start()
    yield srv
    srv.stop()
