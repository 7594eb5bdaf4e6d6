"""The client against a real server on loopback: remotes, sync, recovery, devices, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest
from conftest import PASSWORD, Cli
from server_fixture import Server

pytestmark = pytest.mark.timeout(240)


def enrolled(cli: Cli, server: Server, user: str = "alice", device: str = "laptop") -> None:
    cli.ok("init", "--device", device)
    cli.add_remote(server, user=user)


def random_tree(root: Path, files: int, size: int) -> None:
    root.mkdir(parents=True)
    for n in range(files):
        (root / f"file{n:03d}").write_bytes(os.urandom(size))


def test_backup_syncs_and_a_blank_machine_recovers(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 3, 3_000_000)
    (src / "notes.txt").write_text("meet at the usual place")
    done = cli.ok("backup", src)
    snapshot_id = done.stdout.decode().split()[-1]
    assert b"synced to home" in done.stderr
    cli.wipe_device()
    cli.ok("recover", server.url, "--user", "alice")
    assert [s["id"] for s in cli.snapshots()] == [snapshot_id]
    thin = sum(p.stat().st_size for p in cli.repo.rglob("*") if p.is_file())
    assert thin < 200_000, f"the thin repository should hold no packs, holds {thin} bytes"
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    restored = cli.tmp / "out" / str(src).lstrip("/")
    assert sorted(p.name for p in restored.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (restored / p.name).read_bytes() == p.read_bytes()
    # it carries on as that device: an unchanged re-backup adds no data to the server
    again = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert again["data_added"] == 0 and again["sync_failed"] == {}
    assert len(cli.snapshots()) == 2


def test_the_server_holds_no_plaintext(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "secret-project-dir"
    src.mkdir()
    marker = b"CONFIDENTIAL-PLANS-" + os.urandom(4).hex().encode()
    (src / "quarterly-merger-memo.txt").write_bytes(marker * 1000)
    (src / "tiny.txt").write_bytes(marker)
    cli.backup(src)
    everything = b"".join(p.read_bytes() for p in server.data.rglob("*") if p.is_file())
    for needle in (marker, b"quarterly-merger-memo", b"secret-project-dir", b"tiny.txt", PASSWORD.encode()):
        assert needle not in everything, needle


def test_wrong_password_and_other_users_cannot_recover(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 1, 1000)
    cli.backup(src)
    wrong = cli.run("recover", server.url, "--user", "alice", env={"STASISFS_REPO": str(cli.tmp / "r1"), "STASISFS_PASSWORD": "not the password at all"})
    assert wrong.returncode == 12 and b"Traceback" not in wrong.stderr
    # bob has a valid login, but alice's device is invisible to him
    bob = cli.another_machine("bob")
    enrolled(bob, server, "bob", "desktop")
    stolen = bob.run("recover", server.url, "--user", "bob", "--device", "laptop", env={"STASISFS_REPO": str(cli.tmp / "r2")})
    assert stolen.returncode == 2 and b"no device 'laptop'" in stolen.stderr
    assert not (cli.tmp / "r2" / "snapshots").exists() or not any((cli.tmp / "r2" / "snapshots").iterdir())


def test_an_enrolment_code_adds_a_device_to_an_enrolled_account_only_with_its_password(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    cli.backup(cli.tree({"a.txt": "the first device's"}))
    code = server.admin("user", "reissue", "alice").stdout.strip().splitlines()[-1]
    # A repository whose own password is not the account's: the code does not let it in.
    stranger = cli.another_machine("stranger")
    stranger.env["STASISFS_PASSWORD"] = "not alice's password at all"
    stranger.ok("init", "--device", "stranger")
    wrong = stranger.run("remote", "add", "home", server.url, "--user", "alice", "--enrol-code", code)
    assert wrong.returncode == 12 and b"already has devices, and this is not the account's password" in wrong.stderr, wrong.stderr
    desktop = cli.another_machine("desktop")
    desktop.ok("init", "--device", "desktop")
    desktop.ok("remote", "add", "home", server.url, "--user", "alice", "--enrol-code", code)
    assert sorted(d["name"] for d in json.loads(desktop.ok("devices", "--json").stdout)) == ["desktop", "laptop"]
    # The code replaced nothing: the first device still recovers with the password on a blank machine.
    cli.wipe_device()
    cli.ok("recover", server.url, "--user", "alice", "--device", "laptop")
    assert len(cli.snapshots()) == 1
    used = desktop.run("remote", "add", "again", server.url, "--user", "alice", "--enrol-code", code)
    assert used.returncode != 0 and b"enrolment code is wrong, used or expired" in used.stderr


def test_a_second_device_and_revoking_a_lost_one(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 1, 1000)
    cli.backup(src)
    desktop = Cli(cli.env | {"STASISFS_REPO": str(cli.tmp / "desktop-repo"), "XDG_CACHE_HOME": str(cli.tmp / "desktop-cache")},
                  cli.tmp / "desktop-repo", cli.tmp)
    desktop.ok("init", "--device", "desktop")
    desktop.ok("remote", "add", "home", server.url, "--user", "alice")  # no code: the password logs in
    listing = json.loads(desktop.ok("devices", "--json").stdout)
    assert sorted(d["name"] for d in listing) == ["desktop", "laptop"]
    assert next(d for d in listing if d["name"] == "laptop")["last_upload"]
    desktop.ok("devices", "revoke", "laptop")
    (src / "new").write_text("after the theft")
    cut_off = cli.run("backup", src)
    assert cut_off.returncode == 3 and b"home" in cut_off.stderr and b"revoked" in cut_off.stderr
    assert len(cli.snapshots()) == 2  # the local snapshot is kept


def test_server_down_keeps_the_local_snapshot_and_exits_3_then_catches_up(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 2, 100_000)
    port = server.port
    server.stop()
    done = cli.run("backup", src)
    assert done.returncode == 3 and b"home" in done.stderr and b"cannot be reached" in done.stderr
    assert done.stdout.decode().split()[-1] == cli.snapshots()[0]["id"]
    server.start(f"127.0.0.1:{port}")
    no_password = Cli({k: v for k, v in cli.env.items() if k != "STASISFS_PASSWORD"}, cli.repo, cli.tmp)
    synced = json.loads(no_password.ok("sync", "--json").stdout)  # the device token is enough to sync
    assert synced["failed"] == {} and synced["synced"][0]["uploaded"] >= 3


def packs_on(server: Server) -> int:
    return sum(1 for p in (server.data / "objects").rglob("*") if p.is_file() and "data" in p.parts and not p.name.startswith(".tmp"))


def sync_json(cli: Cli) -> dict[str, object]:
    done = cli.run("sync", "--json")
    return {"code": done.returncode, **json.loads(done.stdout.decode().splitlines()[-1])}


def test_interrupted_sync_resumes_without_resending(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 12, 4_000_000)
    cli.ok("backup", src, "--no-sync")
    packs = len(list((cli.repo / "data").rglob("*"))) - 256
    assert packs >= 3
    # kill the client part-way through a rate-limited sync
    proc = subprocess.Popen([sys.executable, "-m", "stasisfs", "sync", "--limit-upload", "8000"], env=cli.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not packs_on(server):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    arrived = packs_on(server)
    assert 1 <= arrived < packs
    # kill the server part-way through the next one
    port = server.port
    proc = subprocess.Popen([sys.executable, "-m", "stasisfs", "sync", "--limit-upload", "8000"], env=cli.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while time.monotonic() < deadline and packs_on(server) == arrived:
        time.sleep(0.05)
    server.stop(kill=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and b"home" in err
    server.start(f"127.0.0.1:{port}")
    result = sync_json(cli)
    assert result["code"] == 0
    [report] = cast(list[dict[str, int]], result["synced"])
    assert report["already_there"] >= arrived  # what arrived before is not sent again
    assert report["uploaded"] + report["already_there"] >= packs + 2
    assert packs_on(server) == packs
    assert sync_json(cli)["synced"][0]["uploaded"] == 0  # type: ignore[index]


def test_quota_gives_a_clear_error(cli: Cli, server: Server) -> None:
    cli.ok("init", "--device", "laptop")
    cli.add_remote(server, "--quota", "2000000")
    src = cli.tmp / "src"
    random_tree(src, 2, 3_000_000)
    done = cli.run("backup", src)
    assert done.returncode == 3
    assert b"full for this account" in done.stderr and b"quota" in done.stderr and b"Traceback" not in done.stderr


def test_password_change_reaches_the_server(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 1, 1000)
    cli.backup(src)
    new = "a completely different passphrase here"
    cli.ok("key", "passwd", env={"STASISFS_NEW_PASSWORD": new})
    old = cli.run("recover", server.url, "--user", "alice", env={"STASISFS_REPO": str(cli.tmp / "r-old"), "XDG_CONFIG_HOME": str(cli.tmp / "c1"),
                                                                  "XDG_CACHE_HOME": str(cli.tmp / "k1")})
    assert old.returncode == 12
    fresh = cli.run("recover", server.url, "--user", "alice", env={"STASISFS_REPO": str(cli.tmp / "r-new"), "STASISFS_PASSWORD": new,
                                                                    "XDG_CONFIG_HOME": str(cli.tmp / "c2"), "XDG_CACHE_HOME": str(cli.tmp / "k2")})
    assert fresh.returncode == 0, fresh.stderr


def test_pull_completes_a_thin_repository(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 2, 2_000_000)
    cli.backup(src)
    cli.wipe_device()
    cli.ok("recover", server.url, "--user", "alice")
    cli.ok("check", "--read-data")  # thin: packs are checked on the remote
    cli.ok("sync", "--pull")
    server.stop()
    cli.ok("check", "--read-data")  # everything is local now
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    assert json.loads(cli.ok("remote", "list", "--json").stdout)[0]["thin"] is False


def test_check_remote_finds_missing_and_damaged_packs(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 3, 3_000_000)
    cli.backup(src)
    random_tree(cli.tmp / "more", 2, 2_000_000)
    cli.backup(cli.tmp / "more")
    cli.ok("check", "--remote", "home", "--read-data")
    packs = sorted(p for p in (server.data / "objects").rglob("*") if p.is_file() and "data" in p.parts)
    assert len(packs) >= 3
    token = json.loads((cli.tmp / "home" / ".config" / "stasisfs" / "repositories").glob("*/remotes.json").__next__().read_text())["remotes"][0]["token"]
    import requests

    gone = requests.delete(f"{server.url}/v1/devices/laptop/objects/data/{packs[0].name}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert gone.status_code == 200
    damaged = bytearray(packs[1].read_bytes())
    damaged[100] ^= 1
    packs[1].write_bytes(bytes(damaged))  # bit rot the server does not know about
    packs[2].unlink()  # lost behind the server's back
    structure = cli.run("check", "--remote", "home")
    assert structure.returncode == 1 and f"pack {packs[0].name} is missing from remote home".encode() in structure.stderr
    deep = cli.run("check", "--remote", "home", "--read-data")
    assert deep.returncode == 1
    assert f"pack {packs[1].name}: remote home served a damaged".encode() in deep.stderr
    assert f"pack {packs[2].name}".encode() in deep.stderr
    cli.ok("check", "--read-data")  # the local copy is fine
    cli.ok("sync")  # re-uploads the pack the remote lacks
    assert f"pack {packs[0].name}".encode() not in cli.run("check", "--remote", "home").stderr


def test_recover_with_the_recovery_key(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 1, 5000)
    snapshot_id = cli.backup(src)
    paper = cli.ok("key", "export", "--paper").stdout
    cli.wipe_device()
    cli.ok("recover", server.url, "--user", "alice", "--recovery-key", input=paper)
    assert [s["id"] for s in cli.snapshots()] == [snapshot_id]
    other = Cli(cli.env | {"STASISFS_REPO": str(cli.tmp / "other"), "XDG_CACHE_HOME": str(cli.tmp / "oc"), "XDG_CONFIG_HOME": str(cli.tmp / "og")},
                cli.tmp / "other", cli.tmp)
    other.ok("init", "--device", "spare")
    wrong_key = other.ok("key", "export", "--paper").stdout
    refused = cli.run("recover", server.url, "--user", "alice", "--recovery-key", input=wrong_key,
                      env={"STASISFS_REPO": str(cli.tmp / "r3"), "XDG_CONFIG_HOME": str(cli.tmp / "c3"), "XDG_CACHE_HOME": str(cli.tmp / "k3")})
    assert refused.returncode == 12


def test_a_rolled_back_remote_is_noticed_and_healed(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    src = cli.tmp / "src"
    random_tree(src, 1, 1000)
    first = cli.backup(src)
    (src / "more").write_text("second")
    cli.backup(src)
    token = json.loads(next((cli.tmp / "home" / ".config" / "stasisfs" / "repositories").glob("*/remotes.json")).read_text())["remotes"][0]["token"]
    import requests

    snapshot_object = next(p.name for p in (cli.repo / "snapshots").iterdir()
                           if p.name in requests.get(f"{server.url}/v1/devices/laptop/objects/snapshots/", headers={"Authorization": f"Bearer {token}"},
                                                     timeout=10).text)
    # the server "loses" a snapshot it had confirmed, as a restored-from-old-backup server would
    requests.delete(f"{server.url}/v1/devices/laptop/objects/snapshots/{snapshot_object}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    done = cli.ok("sync")
    assert b"may have been rolled back" in done.stderr
    assert len(cli.snapshots()) == 2 and first
    assert b"rolled back" not in cli.ok("sync").stderr  # healed: it holds everything again


def test_devices_names_a_device_quiet_past_its_threshold(cli: Cli, server: Server) -> None:
    enrolled(cli, server)
    assert "STALE" not in cli.ok("devices").stdout.decode()
    assert server.admin("device", "set", "alice", "laptop", "--alert-after", "1s").returncode == 0
    time.sleep(1.5)
    listing = cli.ok("devices").stdout.decode()
    assert "laptop" in listing and "STALE" in listing
    assert json.loads(cli.ok("devices", "--json").stdout)[0]["state"] == "stale"
    cli.backup(cli.tree({"a.txt": "back again"}))  # an upload: active again
    assert "STALE" not in cli.ok("devices").stdout.decode()
