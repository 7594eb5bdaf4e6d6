"""Quota counts every stored byte exactly under concurrency (SQLite and PostgreSQL); the server's files are private."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import requests
from server_fixture import TEST_ENVELOPE, TEST_KDF, Server, new_database, statuses_at_once

pytestmark = pytest.mark.timeout(180)
OBJECT = 1000


def enrol(server: Server, quota: int) -> tuple[str, str]:
    code = server.add_user("alice", "--quota", str(quota))
    answer = requests.post(f"{server.url}/v1/enrol", json={"user": "alice", "code": code, "verifier": hashlib.sha256(b"alice").hexdigest(),
                                                          "kdf": TEST_KDF, "device": "laptop", "envelope": TEST_ENVELOPE}, timeout=30)
    token = str(answer.json()["token"])
    session = requests.post(f"{server.url}/v1/users/alice/login", json={"verifier": hashlib.sha256(b"alice").hexdigest()}, timeout=30)
    return token, str(session.json()["token"])


def upload_at_once(server: Server, token: str, count: int) -> list[int]:
    bodies = [os.urandom(OBJECT) for _ in range(count)]
    return statuses_at_once(count, lambda n: requests.put(
        f"{server.url}/v1/devices/laptop/objects/data/{hashlib.sha256(bodies[n]).hexdigest()}", data=bodies[n],
        headers={"Authorization": f"Bearer {token}"}, timeout=60))


def quota_holds_under_concurrency(server: Server) -> None:
    envelope = 26  # the base64 TEST_ENVELOPE decodes to 26 bytes, and it counts
    token, session = enrol(server, quota=envelope + 5 * OBJECT + 1500)
    auth = {"Authorization": f"Bearer {session}"}
    assert requests.put(f"{server.url}/v1/devices/laptop/key", data=b"k" * 1000, headers=auth, timeout=10).status_code == 200
    statuses = upload_at_once(server, token, 16)
    assert sorted(statuses) == [201] * 5 + [507] * 11  # 26 + 1000 (escrow) + 5 * 1000 fit; a sixth would not
    account = requests.get(f"{server.url}/v1/account", headers=auth, timeout=10).json()
    assert account["used"] == envelope + 1000 + 5 * OBJECT <= account["quota"]
    # A further escrow version no longer fits either: the escrow is stored bytes like any other.
    assert requests.put(f"{server.url}/v1/devices/laptop/key", data=b"k" * 1000, headers=auth, timeout=10).json()["code"] == "quota"


def test_quota_is_exact_under_concurrent_uploads_on_sqlite(server: Server) -> None:
    quota_holds_under_concurrency(server)


def test_quota_is_exact_under_concurrent_uploads_on_postgres(tmp_path: Path, postgres: str) -> None:
    server = Server(tmp_path / "data", extra_args=["--db", new_database(postgres)])
    server.start()
    try:
        quota_holds_under_concurrency(server)
    finally:
        server.stop()


def test_the_servers_files_are_private_whatever_existed_before(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "stasis.db").touch(mode=0o644)  # as an older release left it (an empty file is an empty SQLite database)
    old = os.umask(0o022)
    try:
        server = Server(data)
        server.start()
        enrol(server, quota=10**6)
        server.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"
