"""Starting `stasisfs-server serve` as a child process and learning its URL: one way, for the tests,
the bench and the load test."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def start_server(args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 30) -> tuple[subprocess.Popen[bytes], str]:
    """Run `python -m stasisfs_server ARGS` (which must end in `serve --listen ...`) until it prints its URL.

    Returns the process and `http(s)://HOST:PORT`; raises RuntimeError with what it printed if it
    exits or stays silent for `timeout` seconds.
    """
    process = subprocess.Popen([sys.executable, "-m", "stasisfs_server", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffered += chunk
            for line in buffered.decode(errors="replace").splitlines():
                if line.startswith("listening on "):
                    return process, line.split()[-1]
        if process.poll() is not None:
            break
    process.kill()
    process.wait()
    raise RuntimeError(f"server did not start: {buffered.decode(errors='replace')}")
