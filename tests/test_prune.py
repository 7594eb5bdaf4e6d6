"""forget and prune on a real repository: space freed, nothing live lost, crash safe, propagated to remotes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Cli
from server_fixture import Server

pytestmark = pytest.mark.timeout(300)


def repo_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def history(cli: Cli) -> tuple[Path, dict[str, bytes]]:
    """Four snapshots; each replaces a big file, so old data is used only by old snapshots."""
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "stable.txt").write_bytes(os.urandom(200_000))
    for month in range(1, 5):
        (src / "big.bin").write_bytes(os.urandom(4_000_000))
        for n in range(30):  # small files share packs: deleting some leaves packs partly used
            (src / f"small{n}").write_bytes(os.urandom(20_000) if n % 2 or month == 1 else (src / f"small{n}").read_bytes())
        cli.backup(src, "--time", f"2026-0{month}-01T10:00:00")
    return src, {p.name: p.read_bytes() for p in src.iterdir()}


def restored(cli: Cli, src: Path, ref: str = "latest") -> dict[str, bytes]:
    out = cli.tmp / f"out-{ref}-{os.urandom(3).hex()}"
    cli.ok("restore", ref, "--target", out)
    return {p.name: p.read_bytes() for p in (out / str(src).lstrip("/")).iterdir()}


def test_forget_and_prune_free_only_old_data(cli: Cli) -> None:
    src, latest = history(cli)
    before = repo_bytes(cli.repo)
    dry = json.loads(cli.ok("forget", "--keep-last", "1", "--dry-run", "--json").stdout)
    assert [len(g["keep"]) for g in dry] == [1] and [len(g["remove"]) for g in dry] == [3]
    assert repo_bytes(cli.repo) == before and len(cli.snapshots()) == 4
    cli.ok("forget", "--keep-last", "1", "--prune", "--max-unused", "0")
    after = repo_bytes(cli.repo)
    assert len(cli.snapshots()) == 1
    assert after < before * 0.45, (before, after)  # three of four big files and the replaced small ones are gone
    cli.ok("check", "--read-data")
    assert restored(cli, src) == latest
    again = json.loads(cli.ok("prune", "--json").stdout)
    assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0


def test_prune_repacks_partly_used_packs(cli: Cli) -> None:
    src, latest = history(cli)
    first = cli.snapshots()[0]["id"]
    cli.ok("forget", str(first))
    plan = json.loads(cli.ok("prune", "--dry-run", "--max-unused", "0", "--json").stdout)
    assert plan["packs_repacked"] > 0 and plan["unused_bytes"] > 0
    done = json.loads(cli.ok("prune", "--max-unused", "0", "--json").stdout)
    assert done["packs_written"] > 0
    assert json.loads(cli.ok("prune", "--dry-run", "--max-unused", "0", "--json").stdout)["unused_bytes"] == 0
    cli.ok("check", "--read-data")
    for snapshot in cli.snapshots():
        restored(cli, src, str(snapshot["id"]))  # every kept snapshot still restores
    assert restored(cli, src) == latest


def test_forget_needs_a_policy_and_explains_reasons(cli: Cli) -> None:
    history(cli)
    nothing = cli.run("forget")
    assert nothing.returncode == 2 and b"nothing would be removed" in nothing.stderr
    out = cli.ok("forget", "--keep-monthly", "2", "--keep-last", "1", "--dry-run").stdout.decode()
    assert "last 1, monthly 1" in out and "monthly 2" in out and out.count("remove") == 2


@pytest.mark.parametrize("point", ["prune-repacking", "prune-repacked", "prune-indexed", "prune-index-deleted", "prune-deleting-packs",
                                   "prune-packs-deleted"])
def test_prune_killed_at_any_point_loses_nothing(cli: Cli, point: str) -> None:
    src, latest = history(cli)
    cli.ok("forget", "--keep-last", "2")
    kept = [s["id"] for s in cli.snapshots()]
    expected = {sid: restored(cli, src, str(sid)) for sid in kept}
    killed = cli.run("prune", "--max-unused", "0", env={"STASISFS_TEST_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    cli.ok("check", "--read-data")
    for sid in kept:
        assert restored(cli, src, str(sid)) == expected[sid]
    # a backup after the crash never references data the crash removed
    (src / "after.txt").write_text("after the crash")
    cli.backup(src)
    cli.ok("prune", "--max-unused", "0")
    cli.ok("check", "--read-data")
    assert restored(cli, src) == {**latest, "after.txt": b"after the crash"}


def test_prune_propagates_to_remotes(cli: Cli, server: Server) -> None:
    src, latest = history(cli)
    cli.add_remote(server)
    cli.ok("sync")
    on_server = sum(p.stat().st_size for p in (server.data / "objects").rglob("*") if p.is_file())
    done = cli.ok("forget", "--keep-last", "1", "--prune")
    assert b"deleted" in done.stderr
    remote_packs = {p.name for p in (server.data / "objects").rglob("*") if p.is_file() and "data" in p.parts}
    local_packs = {p.name for p in (cli.repo / "data").rglob("*") if p.is_file()}
    assert remote_packs == local_packs
    assert sum(p.stat().st_size for p in (server.data / "objects").rglob("*") if p.is_file()) < on_server * 0.5
    cli.ok("check", "--remote", "home", "--read-data")
    assert restored(cli, src) == latest


def test_append_only_remote_keeps_everything(cli: Cli, server: Server) -> None:
    src, latest = history(cli)
    cli.add_remote(server, "--append-only")
    cli.ok("sync")
    before = {p.name for p in (server.data / "objects").rglob("*") if p.is_file()}
    done = cli.ok("forget", "--keep-last", "1", "--prune")
    assert b"append-only" in done.stderr
    after = {p.name for p in (server.data / "objects").rglob("*") if p.is_file()}
    assert before <= after  # nothing deleted there; the new packs were added
    assert restored(cli, src) == latest


def test_a_maintenance_token_lets_prune_clean_an_append_only_remote(cli: Cli, server: Server) -> None:
    src, latest = history(cli)
    cli.add_remote(server, "--append-only")
    cli.ok("sync")
    cli.ok("forget", "--keep-last", "1", "--prune")  # cleans locally; the remote keeps everything
    token = server.admin("user", "maintenance-token", "alice", "--expires", "10m").stdout.strip().splitlines()[-1]
    token_file = cli.tmp / "maintenance.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    done = cli.ok("prune", "--maintenance-token-file", token_file)
    assert b"append-only" not in done.stderr and b"deleted" in done.stderr
    remote_packs = {p.name for p in (server.data / "objects").rglob("*") if p.is_file() and "data" in p.parts}
    assert remote_packs == {p.name for p in (cli.repo / "data").rglob("*") if p.is_file()}
    # the token is no device token: it cannot upload, and the account stays append-only for devices
    import requests

    headers = {"Authorization": f"Bearer {token}"}
    body = b"an upload"
    import hashlib

    upload = requests.put(f"{server.url}/v1/devices/testbox/objects/data/{hashlib.sha256(body).hexdigest()}", data=body, headers=headers, timeout=10)
    assert upload.status_code == 403
    cli.ok("check", "--remote", "home", "--read-data")
    assert restored(cli, src) == latest
