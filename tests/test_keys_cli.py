"""Key slots end to end: machine keys, password change, recovery after a forgotten password."""

from __future__ import annotations

import json
import os
import stat

from conftest import Cli

NEW = "violet kettle harbour juniper"


def test_machine_key_opens_without_password(cli: Cli) -> None:
    cli.init()
    key_file = cli.tmp / "home" / ".config" / "stasisfs" / "cron.key"
    cli.ok("key", "add", "--machine", key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    env = {k: v for k, v in cli.env.items() if k != "STASISFS_PASSWORD"}
    cli.env = env
    slots = json.loads(cli.ok("--key-file", key_file, "key", "list", "--json").stdout)
    assert {s["kind"] for s in slots} == {"password", "machine"}
    assert [s["kind"] for s in slots if s["current"]] == ["machine"]


def test_passwd_rewraps_and_old_password_stops_working(cli: Cli) -> None:
    cli.init()
    cli.ok("key", "passwd", env={"STASISFS_NEW_PASSWORD": NEW})
    assert cli.run("snapshots").returncode == 12
    cli.ok("snapshots", env={"STASISFS_PASSWORD": NEW})


def test_passwd_refuses_weak_password(cli: Cli) -> None:
    cli.init()
    done = cli.run("key", "passwd", env={"STASISFS_NEW_PASSWORD": "abc"})
    assert done.returncode == 1 and b"password" in done.stderr
    cli.ok("snapshots")


def test_forgotten_password_recovered_with_paper_key(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "f").write_text("precious")
    cli.backup(src)
    paper = cli.ok("key", "export", "--paper").stdout.decode()
    lines = "\n".join(line for line in paper.splitlines() if line[:1].isdigit())
    # the password is forgotten: nothing opens the repository ...
    forgotten = {"STASISFS_PASSWORD": "I do not remember it at all"}
    assert cli.run("snapshots", env=forgotten).returncode == 12
    # ... until the recovery key adds a new password slot
    cli.ok("key", "import", input=lines.encode(), env={**forgotten, "STASISFS_NEW_PASSWORD": NEW})
    assert cli.ok("dump", f"latest:{src}/f", env={"STASISFS_PASSWORD": NEW}).stdout == b"precious"


def test_recovery_key_of_another_repository_refused(cli: Cli) -> None:
    cli.init()
    done = cli.run("key", "import", input=b"AAAA" * 14, env={"STASISFS_NEW_PASSWORD": NEW})
    assert done.returncode in (2, 12) and b"Traceback" not in done.stderr


def test_key_remove_rules(cli: Cli) -> None:
    cli.init()
    [only] = json.loads(cli.ok("key", "list", "--json").stdout)
    assert cli.run("key", "remove", only["id"]).returncode == 2  # in use, and the last one
    machine = cli.tmp / "m.key"
    slot = cli.ok("key", "add", "--machine", machine).stdout.decode().split()[-1]
    cli.ok("key", "remove", slot)
    assert cli.run("--key-file", machine, "snapshots", env={"STASISFS_PASSWORD": ""}).returncode == 12
    assert not os.path.exists(cli.repo / "keys" / slot)
