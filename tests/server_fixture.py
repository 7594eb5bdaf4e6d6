"""A real stasisfs-server on loopback, in a subprocess, on port 0."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from stasisfs_server.launch import start_server

ROOT = Path(__file__).resolve().parent.parent
# What a client enrols with, for tests that speak HTTP directly: the test suite's weak KDF and an opaque envelope.
TEST_KDF: dict[str, Any] = {"name": "argon2id", "iterations": 1, "memory_kib": 64, "lanes": 1}
TEST_ENVELOPE = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="


@dataclass
class Server:
    data: Path
    extra_args: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    code: Path = ROOT  # another release's source tree, for migration tests

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("STASISFS_")}, "PYTHONPATH": str(self.code)}

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stasisfs_server", "--data", str(self.data), *self.extra_args, *args],
                              capture_output=True, text=True, env=self.env(), timeout=60, cwd=self.code)

    def add_user(self, name: str, *options: str) -> str:
        done = self.admin("user", "add", name, *options)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def start(self, listen: str = "127.0.0.1:0") -> None:
        self.process, self.url = start_server(["--data", str(self.data), *self.extra_args, "serve", "--listen", listen, *self.serve_args],
                                              env=self.env(), cwd=self.code)

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


# Speaking the API directly, as a client with a known verifier would.
def enrol(server: Server, user: str, device: str = "laptop", code: str | None = None, *options: str) -> str:
    code = code or server.add_user(user, *options)
    answer = requests.post(f"{server.url}/v1/enrol", json={"user": user, "code": code, "verifier": hashlib.sha256(user.encode()).hexdigest(),
                                                            "kdf": TEST_KDF, "device": device, "envelope": TEST_ENVELOPE}, timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["token"])


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def obj(server: Server, device: str, data: bytes, kind: str = "data") -> str:
    return f"{server.url}/v1/devices/{device}/objects/{kind}/{hashlib.sha256(data).hexdigest()}"


def login(server: Server, user: str) -> requests.Response:
    return requests.post(f"{server.url}/v1/users/{user}/login", json={"verifier": hashlib.sha256(user.encode()).hexdigest()}, timeout=30)



@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server-data")
    srv.start()
    yield srv
    srv.stop()


def statuses_at_once(count: int, request: Callable[[int], requests.Response], prepare: Callable[[int], None] = lambda n: None) -> list[int]:
    """The HTTP statuses of `count` requests released at the same moment (each thread prepares, then waits for the rest)."""
    import threading

    statuses: list[int] = []
    start = threading.Barrier(count)

    def one(n: int) -> None:
        prepare(n)
        start.wait()
        statuses.append(request(n).status_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def enrol_concurrently(url: str, user: str, code: str, attempts: int) -> list[int]:
    """The HTTP statuses of `attempts` enrolments with one code, all sent at the same moment."""
    return statuses_at_once(attempts, lambda n: requests.post(
        f"{url}/v1/enrol", json={"user": user, "code": code, "verifier": "22" * 32, "kdf": TEST_KDF, "device": f"dev{n}",
                                 "envelope": TEST_ENVELOPE}, timeout=60))


def from_address(address: str) -> requests.Session:
    """HTTP from another loopback address (127.0.0.0/8 is all ours), as a second machine would come."""
    from requests.adapters import HTTPAdapter

    class Bound(HTTPAdapter):
        def init_poolmanager(self, *args: object, **kwargs: object) -> None:
            kwargs["source_address"] = (address, 0)
            super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]

    session = requests.Session()
    session.mount("http://", Bound())
    return session


class QuietHandler(BaseHTTPRequestHandler):
    """A test's own HTTP endpoint: the request log would only clutter pytest's output."""

    def log_message(self, format: str, *args: object) -> None:
        return None


def serve_on_loopback(handler: type[BaseHTTPRequestHandler], port: int = 0) -> ThreadingHTTPServer:
    """Serve `handler` on 127.0.0.1 from a daemon thread until `.shutdown()`."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """A real S3 HTTP endpoint: moto_server from moto[server], on loopback. Yields the AWS_* environment."""
    import shutil as _shutil

    binary = _shutil.which("moto_server", path=os.path.dirname(sys.executable)) or _shutil.which("moto_server")
    assert binary, "moto[server] is a dev dependency (scripts/setup installs it)"
    port = free_port()
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def make_bucket(aws: dict[str, str], name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name=aws["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster from Debian's binaries, run as the postgres user. Yields a URL base."""
    import glob
    import shutil as _shutil

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    assert bins, "Debian's postgresql is installed by scripts/setup"
    bindir = bins[-1]
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="stasisfs-pg-"))  # pytest's own temp dirs are closed to the postgres user
    data = root / "data"
    sockets = root / "sock"
    sockets.mkdir()
    _shutil.chown(root, "postgres")
    _shutil.chown(sockets, "postgres")
    port = free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    as_postgres(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    as_postgres(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        _shutil.rmtree(root, ignore_errors=True)


def new_database(base_url: str) -> str:
    """A fresh database in the cluster, so tests never share state."""
    import uuid

    import psycopg

    name = "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(base_url + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base_url}/{name}"
