"""Beyond one machine: PostgreSQL, an S3 endpoint, replicated stores, two stateless instances."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import Cli
from server_fixture import Server, enrol_concurrently, make_bucket, new_database

pytestmark = pytest.mark.timeout(300)


def tree(root: Path) -> dict[str, bytes]:
    root.mkdir()
    files = {f"f{n}": os.urandom(700_000 * (n + 1)) for n in range(4)}
    files["small.txt"] = b"hello from the first instance"
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def test_concurrent_enrolment_on_postgres_succeeds_once(tmp_path: Path, postgres: str) -> None:
    srv = Server(tmp_path / "a", extra_args=["--db", new_database(postgres)])
    srv.start()
    try:
        code = srv.add_user("alice")
        assert sorted(enrol_concurrently(srv.url, "alice", code, 12)) == [200] + [401] * 11
    finally:
        srv.stop()


def test_sync_through_one_instance_and_recover_through_another(cli: Cli, tmp_path: Path, postgres: str, s3_endpoint: dict[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_endpoint.items():
        monkeypatch.setenv(name, value)  # the server processes inherit them, as from a service manager
    bucket = f"stasis-{os.urandom(4).hex()}"
    make_bucket(s3_endpoint, bucket)
    shared = ["--db", new_database(postgres), "--store", f"s3://{bucket}/objects"]
    a, b = Server(tmp_path / "instance-a", extra_args=shared), Server(tmp_path / "instance-b", extra_args=shared)
    a.start()
    b.start()
    try:
        cli.ok("init", "--device", "laptop")
        cli.add_remote(a)
        src = cli.tmp / "src"
        files = tree(src)
        cli.backup(src)
        cli.wipe_device()
        cli.ok("recover", b.url, "--user", "alice")  # the other instance
        cli.ok("restore", "latest", "--target", cli.tmp / "out")
        restored = cli.tmp / "out" / str(src).lstrip("/")
        assert {p.name: p.read_bytes() for p in restored.iterdir()} == files
        for instance in (a, b):  # stateless: no pack data on local disk
            stored = [p for p in instance.data.rglob("*") if p.is_file()]
            assert all(p.stat().st_size < 100_000 for p in stored), stored
    finally:
        a.stop()
        b.stop()


def test_replicated_stores_keep_serving_and_scrub_restores_the_replica(cli: Cli, tmp_path: Path) -> None:
    first, second = tmp_path / "replica-1", tmp_path / "replica-2"
    srv = Server(tmp_path / "srv", extra_args=["--store", f"file://{first}", "--store", f"file://{second}"])
    srv.start()
    try:
        cli.ok("init", "--device", "laptop")
        cli.add_remote(srv)
        src = cli.tmp / "src"
        files = tree(src)
        cli.backup(src)
        packs_1 = sorted(p for p in first.rglob("*") if p.is_file() and "data" in p.parts)
        packs_2 = sorted(p for p in second.rglob("*") if p.is_file() and "data" in p.parts)
        assert [p.name for p in packs_1] == [p.name for p in packs_2] and packs_1  # every object on both
        packs_1[0].unlink()  # lost from the first replica
        damaged = bytearray(packs_2[-1].read_bytes())
        damaged[10] ^= 1
        packs_2[-1].write_bytes(bytes(damaged))  # rotten in the second
        cli.ok("check", "--remote", "home", "--read-data")  # reads fall back to the good replica
        cli.wipe_device()
        cli.ok("recover", srv.url, "--user", "alice")
        cli.ok("restore", "latest", "--target", cli.tmp / "out")
        assert {p.name: p.read_bytes() for p in (cli.tmp / "out" / str(src).lstrip("/")).iterdir()} == files
        scrub = srv.admin("scrub")
        assert scrub.returncode == 0 and "2 replicas re-copied" in scrub.stdout, scrub.stdout
        assert packs_1[0].exists()
        assert hashlib.sha256(packs_2[-1].read_bytes()).hexdigest() == packs_2[-1].name
    finally:
        srv.stop()
