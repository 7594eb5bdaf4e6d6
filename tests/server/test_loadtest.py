"""The load test, small: 20 devices syncing at once through two instances on one PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_fixture import new_database

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.timeout(300)
def test_twenty_devices_two_instances_no_errors_no_loss(postgres: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest"), "--devices", "20", "--instances", "2", "--objects", "3",
                           "--size", "200000", "--db", new_database(postgres), "--timeout", "240"],
                          capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "errors 0, lost objects 0" in done.stdout
    assert "throughput" in done.stdout and "p99" in done.stdout
