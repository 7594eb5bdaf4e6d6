"""Today's code takes over what the last release made: its server database, its accounts, its repositories.

The last release's source comes from git (`git archive`), runs its own server and client,
and then this release's server and client carry on with the same files.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from conftest import Cli
from server_fixture import ROOT, Server
from test_account_trust import another_machine, listing, tree

pytestmark = pytest.mark.timeout(300)
LAST_RELEASE = "c8b3172"  # the last landed commit before key scheme 2 (issue 17)


def last_release(into: Path) -> Path:
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{LAST_RELEASE}^{{commit}}"], capture_output=True).returncode != 0:
        pytest.skip(f"this checkout lacks the history of {LAST_RELEASE} (a shallow clone): the migration test needs it")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", LAST_RELEASE, "stasisfs", "stasisfs_server"],
                             capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def test_accounts_and_repositories_of_the_last_release_keep_working(cli: Cli, tmp_path: Path) -> None:
    old_code = last_release(tmp_path / "old-release")
    old = {"PYTHONPATH": str(old_code)}
    server = Server(tmp_path / "server-data", code=old_code)
    server.start()
    laptop, desktop = cli, another_machine(cli, "desktop")
    sources = {}
    try:
        code = server.add_user("alice")
        for machine, name in ((laptop, "laptop"), (desktop, "desktop")):
            machine.ok("init", "--device", name, env=old)
            if machine is laptop:
                machine.ok("remote", "add", "home", server.url, "--user", "alice", "--enrol-code", code, env=old)
            else:
                machine.ok("remote", "add", "home", server.url, "--user", "alice", env=old)
            sources[name] = tree(machine.tmp / "src", name)
            machine.ok("backup", sources[name], env=old)
    finally:
        server.stop()
    # This release's server opens the old database (schema 1 -> 2) on the same port's data.
    server = Server(tmp_path / "server-data")
    server.start()
    try:
        users = json.loads(server.admin("user", "list", "--json").stdout)
        assert users[0]["key_scheme"] == 1 and users[0]["used"] > users[0]["objects_bytes"] > 0  # the escrowed keys count too
        # The old client's settings point at the old URL's port: follow the server to its new one.
        for machine in (laptop, desktop):
            doc_path = next((machine.tmp / "home" / ".config" / "stasisfs" / "repositories").glob("*/remotes.json"))
            doc = json.loads(doc_path.read_text())
            doc["remotes"][0]["url"] = server.url
            doc_path.write_text(json.dumps(doc))
        synced = laptop.ok("backup", sources["laptop"])
        assert b"key scheme 1" in synced.stderr and b"key passwd --from-remote home" in synced.stderr
        laptop.ok("key", "passwd", "--from-remote", "home")  # the same password: upgrades the account
        assert json.loads(server.admin("user", "list", "--json").stdout)[0]["key_scheme"] == 2
        assert b"key scheme 1" not in laptop.ok("sync").stderr
        desktop.ok("backup", sources["desktop"])
        # Both devices recover on blank machines, the desktop's escrow re-wrapped by the laptop's upgrade.
        for name in ("laptop", "desktop"):
            blank = another_machine(cli, f"blank-{name}")
            blank.ok("recover", server.url, "--user", "alice", "--device", name)
            target = blank.tmp / "out"
            blank.ok("restore", "latest", "--target", target)
            assert listing(target / str(sources[name]).lstrip("/")) == listing(sources[name])
    finally:
        server.stop()
