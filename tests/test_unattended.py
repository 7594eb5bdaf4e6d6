"""Unattended runs: cron lines that work under cron's bare environment, no secrets, status, hooks, profiles."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, Cli

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def crontab() -> Iterator[None]:
    """Tests touch the real crontab: save it first and put it back, one test at a time across xdist workers."""
    assert shutil.which("crontab"), "cron is installed by scripts/setup"
    with open(os.path.join(tempfile.gettempdir(), "stasisfs-tests-crontab.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
        yield
        if saved.returncode == 0:
            subprocess.run(["crontab", "-"], input=saved.stdout, text=True, check=True)
        else:
            subprocess.run(["crontab", "-r"], capture_output=True)


def current_crontab() -> str:
    done = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def cron_command(name: str) -> str:
    line = next(line for line in current_crontab().splitlines() if line.endswith(f"# stasisfs-schedule:{name}"))
    command = line.split(None, 5)[5]
    return command.replace("\\%", "%")  # what cron hands to sh


def run_like_cron(cli: Cli, command: str, watch: bool = False) -> tuple[int, list[str]]:
    """`env -i HOME=... PATH=/usr/bin:/bin sh -c CMD` from /, noting every process's argv while it runs."""
    proc = subprocess.Popen(["env", "-i", f"HOME={cli.tmp / 'home'}", "PATH=/usr/bin:/bin", "sh", "-c", command], cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    argvs: list[str] = []
    while proc.poll() is None:
        if watch:
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        argvs.append(Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        time.sleep(0.02)
    proc.communicate()
    return proc.returncode, argvs


def source(cli: Cli) -> Path:
    src = cli.tmp / "src"
    src.mkdir(exist_ok=True)
    (src / "a.txt").write_text("scheduled")
    (src / "100% done.txt").write_text("a % in a name")
    return src


def test_cron_line_runs_in_crons_environment_without_secrets(cli: Cli, crontab: None) -> None:
    subprocess.run(["crontab", "-"], input="# someone else's line\n0 5 * * * /bin/true\n", text=True, check=True)
    before = current_crontab()
    cli.init()
    src = source(cli)
    cli.ok("schedule", "add", "nightly", "--cron", "15 3 * * *", "--", str(src), "--exclude", "*.tmp", "--tag", "100%")
    table = current_crontab()
    assert table.startswith(before) and PASSWORD not in table and "STASISFS_" not in table
    line = table.splitlines()[-1]
    assert line.startswith("15 3 * * * env XDG_CACHE_HOME=/") and "--key-file" in line and "--repo" in line
    code, argvs = run_like_cron(cli, cron_command("nightly"), watch=True)
    assert code == 0
    assert any("backup" in a and "--schedule nightly" in a for a in argvs), "the watch saw the run"
    assert not any(PASSWORD in a for a in argvs)
    assert len(cli.snapshots()) == 1 and cli.snapshots()[0]["tags"] == ["100%"]  # % survived cron's escaping
    assert "\\%" in line
    for path in (cli.tmp / "home").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
            if path.name.endswith(".key"):
                assert path.stat().st_mode & 0o077 == 0
    log = (cli.tmp / "home" / ".local" / "state" / "stasisfs" / "nightly.log").read_text()
    assert re.search(r"^[0-9a-f]{64}$", log, re.M)
    listing = json.loads(cli.ok("schedule", "list", "--json").stdout)
    assert listing[0]["name"] == "nightly" and listing[0]["installed"] and listing[0]["next_run"]
    cli.ok("schedule", "remove", "nightly")
    assert current_crontab() == before
    assert not any(p.name == "nightly.key" for p in (cli.tmp / "home").rglob("*"))
    assert b"schedule nightly" not in cli.ok("key", "list").stdout  # its key slot is gone too


def test_every_missed_catches_up_once(cli: Cli, crontab: None) -> None:
    cli.init()
    src = source(cli)
    cli.ok("schedule", "add", "yearly", "--cron", "0 0 1 1 *", "--every-missed", "--", str(src))
    assert current_crontab().splitlines()[-1].startswith("*/15 * * * * ")
    assert run_like_cron(cli, cron_command("yearly"))[0] == 0
    assert run_like_cron(cli, cron_command("yearly"))[0] == 0
    assert len(cli.snapshots()) == 1  # the second run saw nothing missed


def test_status_reports_runs_and_overdue(cli: Cli, crontab: None) -> None:
    cli.init()
    src = source(cli)
    cli.ok("schedule", "add", "hourly", "--cron", "0 * * * *", "--", str(src))
    never = cli.run("status", "--max-age", "2d")
    assert never.returncode == 1 and b"overdue" in never.stderr
    run_like_cron(cli, cron_command("hourly"))
    report = json.loads(cli.ok("status", "--json", "--max-age", "2d").stdout)
    entry = next(e for e in report["entries"] if e["name"] == "schedule:hourly")
    assert entry["last_run"]["result"] == "success" and entry["last_run"]["files"] == 2 and entry["next_run"]
    assert cli.run("status", "--max-age", "0h").returncode == 1


def write_config(cli: Cli, text: str) -> Path:
    path = cli.tmp / "home" / ".config" / "stasisfs" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_profile_drives_backup_retention_and_hooks(cli: Cli) -> None:
    cli.init()
    src = source(cli)
    marker = cli.tmp / "hook.out"
    password_file = cli.tmp / "password"
    password_file.write_text(PASSWORD)
    password_file.chmod(0o600)
    write_config(cli, f"""
[profiles.home]
repository = "{cli.repo}"
password-file = "{password_file}"
paths = ["{src}"]
tags = ["auto"]
on-success = "echo ok $STASISFS_SNAPSHOT >> {marker}"
on-failure = "echo failed: $STASISFS_REASON >> {marker}"

[profiles.home.retention]
keep-last = 2
""")
    profile_cli = Cli({k: v for k, v in cli.env.items() if k not in ("STASISFS_PASSWORD", "STASISFS_REPO")}, cli.repo, cli.tmp)
    for _ in range(3):
        profile_cli.ok("--profile", "home", "backup")
    snaps = profile_cli.ok("--profile", "home", "snapshots", "--json").stdout
    assert len(json.loads(snaps)) == 2 and all("auto" in s["tags"] for s in json.loads(snaps))
    assert marker.read_text().count("ok ") == 3
    shutil.rmtree(src)
    failed = profile_cli.run("--profile", "home", "backup")
    assert failed.returncode != 0 and b"Traceback" not in failed.stderr
    assert "failed: " in marker.read_text() and "does not exist" in marker.read_text()


@pytest.mark.parametrize("text,line,words", [
    ('[profiles.a]\nrepository = "/x"\npaths = "not a list"\n', 3, "paths must be a list"),
    ('[profiles.a]\nrepository = "/x"\n\n[profiles.a.retention]\nkeep-daily = "seven"\n', 5, "keep-daily"),
    ('[profiles.a]\nrepository = "/x"\npassword = "hunter2"\n', 3, "never goes in the config"),
    ('[profiles.a]\nrepository = "/x\n', 2, "line 2"),
    ('[profiles.a]\nrepositry = "/x"\n', 2, "unknown setting 'repositry'"),
])
def test_malformed_config_points_at_the_line(cli: Cli, text: str, line: int, words: str) -> None:
    path = write_config(cli, text)
    done = cli.run("--profile", "a", "snapshots")
    message = done.stderr.decode()
    assert done.returncode == 2 and words in message and (f"{path}:{line}" in message or f"line {line}" in message), message


def test_concurrent_runs_end_0_or_11_and_leave_a_good_repository(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "many"
    src.mkdir()
    for n in range(40):
        (src / f"f{n}").write_bytes(os.urandom(200_000))
    procs = [subprocess.Popen([sys.executable, "-m", "stasisfs", "backup", "-q", str(src)], env=cli.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else b"") for p in procs]
    assert all(code in (0, 11) for code, _ in results), results
    assert not any(b"Traceback" in err for _, err in results)
    cli.ok("check", "--read-data")
    waited = [subprocess.Popen([sys.executable, "-m", "stasisfs", "backup", "-q", "--lock-wait", "60", str(src)], env=cli.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=120) for p in waited] == [0, 0]  # with --lock-wait both succeed, one after the other


def test_a_stale_lock_is_broken_under_cron(cli: Cli, crontab: None) -> None:
    cli.init()
    src = source(cli)
    cli.ok("schedule", "add", "nightly", "--cron", "15 3 * * *", "--", str(src))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from pathlib import Path; from stasisfs.repo.repository import Repository, Credential;"
         "from stasisfs.repo.locking import RepositoryLock;"
         f"r = Repository(Path({str(cli.repo)!r})); r.unlock(Credential(password={PASSWORD!r}));"
         "l = RepositoryLock(r, 'a run that gets killed'); l.acquire(); print('held', flush=True); time.sleep(60)"],
        env=cli.env, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    holder.kill()
    holder.wait()
    assert len(list((cli.repo / "locks").iterdir())) == 1
    assert run_like_cron(cli, cron_command("nightly"))[0] == 0
    assert len(cli.snapshots()) == 1 and list((cli.repo / "locks").iterdir()) == []


def test_hooks_never_see_a_secret(cli: Cli) -> None:
    cli.init()
    src = source(cli)
    seen = cli.tmp / "hook-env"
    write_config(cli, f"""
[profiles.home]
repository = "{cli.repo}"
paths = ["{src}", "{cli.tmp / 'missing'}"]
on-success = "env > {seen}"
on-failure = "env > {seen}"
""")
    secret_file = cli.tmp / "pw"
    secret_file.write_text(PASSWORD)
    secret_file.chmod(0o600)
    cli.run("--profile", "home", "backup", env={"STASISFS_PASSWORD_FILE": str(secret_file)})
    env = seen.read_text()
    assert "STASISFS_RESULT=" in env and "STASISFS_PROFILE=home" in env
    assert PASSWORD not in env and "STASISFS_PASSWORD" not in env and str(secret_file) not in env


def test_a_profile_schedule_under_a_custom_config_home_runs_and_a_missed_one_is_flagged(cli: Cli, crontab: None) -> None:
    custom = cli.tmp / "elsewhere" / "config"
    env = {"XDG_CONFIG_HOME": str(custom)}
    cli.ok("init", env=env)
    src = source(cli)
    custom.joinpath("stasisfs").mkdir(parents=True, exist_ok=True)
    custom.joinpath("stasisfs", "config.toml").write_text(f'''
[profiles.docs]
repository = "{cli.repo}"
paths = ["{src}"]
''')
    cli.ok("schedule", "add", "docs", "--profile", "docs", "--cron", "0 * * * *", env=env)
    line = current_crontab().splitlines()[-1]
    assert f"XDG_CONFIG_HOME={custom}" in line and "STASISFS_" not in line
    code, _ = run_like_cron(cli, cron_command("docs"))
    assert code == 0 and len(cli.snapshots()) == 1
    assert cli.run("status", env=env).returncode == 0
    # The schedule was added yesterday and its last due time has no success: missed, and status says so.
    schedules = custom / "stasisfs" / "schedules.json"
    doc = json.loads(schedules.read_text())
    doc["docs"]["created"] = "2000-01-01T00:00:00+00:00"
    schedules.write_text(json.dumps(doc))
    runs = next((cli.tmp / "home" / ".local" / "state" / "stasisfs").glob("runs.json"))
    runs.write_text("{}")
    missed = cli.run("status", env=env)
    assert missed.returncode == 1 and b"MISSED" in missed.stdout and b"missed: schedule:docs" in missed.stderr
    # A run that cannot even start (its profile is gone) is recorded where status and the log show it.
    custom.joinpath("stasisfs", "config.toml").write_text("")
    code, _ = run_like_cron(cli, cron_command("docs"))
    assert code != 0
    report = json.loads(cli.run("status", "--json", env=env).stdout)
    entry = next(e for e in report["entries"] if e["name"] == "schedule:docs")
    assert entry["last_run"]["result"] == "failed" and "docs" in entry["last_run"]["reason"]
    log = (cli.tmp / "home" / ".local" / "state" / "stasisfs" / "docs.log").read_text()
    assert "error:" in log and "docs" in log
