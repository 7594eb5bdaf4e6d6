"""Recovery against a token thief and a curious server, one password for every device, one live writer per device.

Every test runs the real client against a real server on loopback, and attacks it as
someone holding a stolen device token, or the server's own database, would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import requests
from conftest import Cli
from server_fixture import Server, from_address

pytestmark = pytest.mark.timeout(300)

NEW_PASSWORD = "purple elephant dances quietly at dawn"


def another_machine(cli: Cli, name: str) -> Cli:
    """A second machine of the same person: its own home, cache and repository."""
    root = cli.tmp / name
    (root / "home").mkdir(parents=True)
    env = {**cli.env, "HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache"),
           "XDG_CONFIG_HOME": str(root / "home" / ".config"), "STASISFS_REPO": str(root / "repo")}
    return Cli(env=env, repo=root / "repo", tmp=root)


def tree(root: Path, seed: str, files: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in range(files):
        (root / f"{seed}-{n}.bin").write_bytes(hashlib.sha256(f"{seed}{n}".encode()).digest() * (3000 + 500 * n))
    (root / "notes.txt").write_text(f"notes of {seed}")
    return root


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def restored_equals(machine: Cli, snapshot: str, src: Path, expected: Path | None = None) -> None:
    """Restore `snapshot` and compare what was backed up at `src` with `expected` (by default `src` as it is now)."""
    target = machine.tmp / f"out-{snapshot[:8]}"
    machine.ok("restore", snapshot, "--target", target)
    assert listing(target / str(src).lstrip("/")) == listing(expected or src)


def device_token(machine: Cli) -> str:
    doc = next((machine.tmp / "home" / ".config" / "stasisfs" / "repositories").glob("*/remotes.json"))
    return str(json.loads(doc.read_text())["remotes"][0]["token"])


def test_a_token_thiefs_junk_escrow_and_snapshot_leave_recovery_exact(cli: Cli, server: Server) -> None:
    cli.init()
    cli.add_remote(server, "--append-only")
    src = tree(cli.tmp / "src", "home")
    snapshot = cli.backup(src)
    token = device_token(cli)
    headers = {"Authorization": f"Bearer {token}"}
    # The thief replaces the escrowed key: refused, whatever the account.
    refused = requests.put(f"{server.url}/v1/devices/testbox/key", data=b'{"version": 2, "junk": true}', headers=headers, timeout=10)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    # ... and uploads a junk snapshot object, which append-only lets through.
    junk = os.urandom(700)
    junk_id = hashlib.sha256(junk).hexdigest()
    assert requests.put(f"{server.url}/v1/devices/testbox/objects/snapshots/{junk_id}", data=junk, headers=headers, timeout=10).status_code == 201
    checked = cli.run("check", "--remote", "home")
    assert checked.returncode != 0 and junk_id.encode() in checked.stderr + checked.stdout
    # The owner loses the laptop and recovers on a blank machine: everything, exactly, and the junk named.
    cli.wipe_device()
    recovered = cli.run("recover", server.url, "--user", "alice")
    assert recovered.returncode == 3, recovered.stderr.decode()
    assert junk_id.encode() in recovered.stderr and b"does not authenticate" in recovered.stderr
    assert [s["id"] for s in cli.snapshots()] == [snapshot]
    restored_equals(cli, snapshot, src)


def test_a_curious_servers_junk_escrow_version_falls_back_to_the_good_one(cli: Cli, server: Server) -> None:
    cli.init()
    cli.add_remote(server)
    src = tree(cli.tmp / "src", "laptop")
    snapshot = cli.backup(src)
    with sqlite3.connect(server.data / "stasis.db") as db:  # the server itself writes a newer, junk version
        (device_id, newest), = db.execute("SELECT device_id, MAX(version) FROM escrowed_keys GROUP BY device_id")
        db.execute("INSERT INTO escrowed_keys (device_id, version, blob, created) VALUES (?, ?, ?, '2026-01-01 00:00:00')",
                   (device_id, newest + 1, json.dumps({"version": 2, "repository": "00" * 32, "config": "x", "wrapped": "AAAA"}).encode()))
    assert cli.run("check", "--remote", "home").returncode != 0
    cli.wipe_device()
    recovered = cli.run("recover", server.url, "--user", "alice")
    assert recovered.returncode == 3 and f"escrowed key version {newest + 1}".encode() in recovered.stderr
    restored_equals(cli, snapshot, src)
    # Recovery escrowed a good key again, so the next recovery is clean.
    cli.wipe_device()
    assert cli.run("recover", server.url, "--user", "alice").returncode == 0


def test_a_password_change_on_one_device_reaches_every_device(cli: Cli, server: Server) -> None:
    laptop, desktop, phone = cli, another_machine(cli, "desktop"), another_machine(cli, "phone")
    laptop.ok("init", "--device", "laptop")
    laptop.add_remote(server)
    sources = {}
    for machine, name in ((laptop, "laptop"), (desktop, "desktop"), (phone, "phone")):
        if machine is not laptop:
            machine.ok("init", "--device", name)
            machine.ok("remote", "add", "home", server.url, "--user", "alice")
        sources[name] = tree(machine.tmp / "src", name)
        machine.backup(sources[name])
    laptop.ok("key", "passwd", env={"STASISFS_NEW_PASSWORD": NEW_PASSWORD})
    # The desktop is told on its next run, and one command takes the new password.
    told = desktop.ok("sync")
    assert b"key passwd --from-remote home" in told.stderr
    assert desktop.run("snapshots", env={"STASISFS_PASSWORD": NEW_PASSWORD}).returncode == 12
    desktop.ok("key", "passwd", "--from-remote", "home", env={"STASISFS_PASSWORD": NEW_PASSWORD})
    desktop.ok("snapshots", env={"STASISFS_PASSWORD": NEW_PASSWORD})
    assert desktop.run("snapshots").returncode == 12  # the old password's slot is gone
    assert b"key passwd --from-remote" not in desktop.ok("sync", env={"STASISFS_PASSWORD": NEW_PASSWORD}).stderr
    # Two other devices recover on blank machines with the new password, and none with the old one.
    for name in ("desktop", "phone"):
        blank = another_machine(cli, f"blank-{name}")
        assert blank.run("recover", server.url, "--user", "alice", "--device", name).returncode == 12
        blank.ok("recover", server.url, "--user", "alice", "--device", name, env={"STASISFS_PASSWORD": NEW_PASSWORD})
        snapshot = blank.ok("snapshots", "--json", env={"STASISFS_PASSWORD": NEW_PASSWORD}).stdout
        blank.env["STASISFS_PASSWORD"] = NEW_PASSWORD
        restored_equals(blank, json.loads(snapshot)[-1]["id"], sources[name])


def test_the_original_and_a_recovered_copy_both_active_leave_the_server_whole(cli: Cli, server: Server) -> None:
    original = cli
    original.init()
    original.add_remote(server)
    src = tree(original.tmp / "src", "v1")
    first = original.backup(src)
    recovered = another_machine(cli, "newbox")
    took = recovered.ok("recover", server.url, "--user", "alice")
    assert b"took over device testbox" in took.stderr
    # The original turns up and carries on: every remote operation is refused, with when and where.
    tree(src, "v2")
    backup = original.run("backup", src)
    assert backup.returncode == 1 and b"taken over on" in backup.stderr and b"retired" in backup.stderr
    forget = original.run("forget", "--keep-last", "1", "--prune")
    assert forget.returncode == 1 and b"taken over" in forget.stderr
    assert original.run("sync").returncode == 1
    # The recovered copy backs up; the server's copy is whole and every snapshot on it restores.
    new_src = tree(recovered.tmp / "src", "newbox")
    second = recovered.backup(new_src)
    recovered.ok("check", "--remote", "origin", "--read-data")
    restored_equals(recovered, first, src, tree(cli.tmp / "expected-v1", "v1"))
    restored_equals(recovered, second, new_src)


def test_a_stale_copy_never_deletes_what_a_snapshot_on_the_remote_uses(cli: Cli, server: Server) -> None:
    cli.init()
    cli.add_remote(server)
    src = cli.tmp / "src"
    tree(src, "x")
    cli.backup(src)
    shutil.rmtree(src)
    tree(src, "y")
    cli.backup(src)
    saved = cli.tmp / "saved"
    for part in ("repo", "home", "cache"):
        shutil.copytree(cli.tmp / part, saved / part, symlinks=True)
    shutil.rmtree(src)
    tree(src, "x")  # the same data as the first snapshot, in a snapshot only the remote will keep
    kept = cli.backup(src)
    # The device rolls back to an older copy of itself (a restored disk image), then forgets and prunes.
    for part in ("repo", "home", "cache"):
        shutil.rmtree(cli.tmp / part)
        shutil.copytree(saved / part, cli.tmp / part, symlinks=True)
    pruned = cli.ok("forget", "--keep-last", "1", "--prune")
    assert b"this copy does not" in pruned.stderr and b"wait" in pruned.stderr
    blank = another_machine(cli, "blank")
    blank.ok("recover", server.url, "--user", "alice")
    blank.ok("check", "--remote", "origin", "--read-data")
    restored_equals(blank, kept, src, tree(cli.tmp / "expected-x", "x"))


def test_the_owner_revokes_a_stolen_device_while_someone_guesses(cli: Cli, server: Server) -> None:
    cli.init()
    cli.add_remote(server)
    cli.ok("remote", "list")
    thief = from_address("127.0.0.2")
    statuses = {thief.post(f"{server.url}/v1/users/alice/login", json={"verifier": "00" * 32}, timeout=10).status_code for _ in range(12)}
    assert statuses == {401, 429}
    # The owner's password works from this address while the thief's is held back.
    cli.ok("devices", "revoke", "testbox")
    assert cli.run("sync").returncode == 3  # revoked: this device's own token no longer uploads
