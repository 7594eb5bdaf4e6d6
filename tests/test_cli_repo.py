"""The CLI contract of interface.md: commands, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import PASSWORD, Cli, processes_started_for


def make_tree(root: Path) -> Path:
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "docs" / "deep" / "b.log").write_text("beta\n")
    (root / "big.bin").write_bytes(os.urandom(2_500_000))
    return root


def test_init_backup_list_restore(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    snapshot_id = cli.backup(src)
    assert len(snapshot_id) == 64
    [snap] = cli.snapshots()
    assert snap["id"] == snapshot_id and snap["short_id"] == snapshot_id[:8]
    assert snap["device"] == "testbox" and snap["paths"] == [str(src)]
    assert snap["summary"]["files_new"] == 3  # type: ignore[index]
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    assert (cli.tmp / "out" / str(src).lstrip("/") / "docs" / "a.txt").read_text() == "alpha\n"
    assert (cli.tmp / "out" / str(src).lstrip("/") / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_restore_subpath_rules(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    cli.backup(src)
    cli.ok("restore", f"latest:{src}/docs", "--target", cli.tmp / "d")
    assert (cli.tmp / "d" / "a.txt").exists() and (cli.tmp / "d" / "deep" / "b.log").exists()
    cli.ok("restore", f"latest:{src}/docs/a.txt", "--target", cli.tmp / "f")
    assert (cli.tmp / "f" / "a.txt").read_text() == "alpha\n"


def test_restore_include_exclude(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    cli.backup(src)
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out, "--exclude", "*.log", "--exclude", "big.bin")
    base = out / str(src).lstrip("/")
    assert (base / "docs" / "a.txt").exists() and not (base / "docs" / "deep" / "b.log").exists()
    assert not (base / "big.bin").exists()
    out2 = cli.tmp / "out2"
    cli.ok("restore", "latest", "--target", out2, "--include", "*.log")
    assert (out2 / str(src).lstrip("/") / "docs" / "deep" / "b.log").exists()
    assert not (out2 / str(src).lstrip("/") / "docs" / "a.txt").exists()


def test_overwrite_modes(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    f = src / "f.txt"
    f.write_text("snapshot\n")
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    cli.backup(src)
    dest = cli.tmp / "out" / str(f).lstrip("/")
    dest.parent.mkdir(parents=True)

    def local(text: str, mtime_ns: int) -> None:
        dest.write_text(text)
        os.utime(dest, ns=(mtime_ns, mtime_ns))

    local("local\n", 2_000_000_000_000_000_000)
    cli.ok("restore", "latest", "--target", cli.tmp / "out", "--overwrite", "never")
    assert dest.read_text() == "local\n"
    cli.ok("restore", "latest", "--target", cli.tmp / "out", "--overwrite", "if-newer")
    assert dest.read_text() == "local\n"  # the local copy is newer
    local("locl\n", 500_000_000_000_000_000)
    cli.ok("restore", "latest", "--target", cli.tmp / "out", "--overwrite", "if-newer")
    assert dest.read_text() == "snapshot\n"
    local("SNAPSHOT\n", 1_000_000_000_000_000_000)  # same size and mtime: if-changed trusts them
    cli.ok("restore", "latest", "--target", cli.tmp / "out", "--overwrite", "if-changed")
    assert dest.read_text() == "SNAPSHOT\n"
    cli.ok("restore", "latest", "--target", cli.tmp / "out")  # default: always
    assert dest.read_text() == "snapshot\n"


def test_ls_find_dump_diff(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    first = cli.backup(src)
    (src / "docs" / "a.txt").write_text("changed\n")
    (src / "new.txt").write_text("n")
    (src / "docs" / "deep" / "b.log").unlink()
    second = cli.backup(src)
    listing = cli.ok("ls", "latest", str(src)).stdout.decode().splitlines()
    assert f"{src}/docs/a.txt" in listing and f"{src}/new.txt" in listing
    entries = json.loads(cli.ok("ls", "latest", "--json").stdout)
    assert any(e["path"] == f"{src}/big.bin" and e["size"] == 2_500_000 for e in entries)
    found = cli.ok("find", "*.log").stdout.decode()
    assert first[:8] in found and second[:8] not in found
    assert cli.ok("dump", f"{first[:10]}:{src}/docs/a.txt").stdout == b"alpha\n"
    assert cli.ok("dump", f"latest:{src}/docs/a.txt").stdout == b"changed\n"
    out = cli.ok("diff", first, second).stdout.decode().splitlines()
    assert f"M    {src}/docs/a.txt" in out
    assert f"+    {src}/new.txt" in out
    assert f"-    {src}/docs/deep/b.log" in out
    assert not any("big.bin" in line for line in out)


def test_stdin_backup(cli: Cli) -> None:
    cli.init()
    data = os.urandom(3_000_000)
    snapshot_id = cli.ok("backup", "--stdin", "--stdin-filename", "db.sql", input=data).stdout.decode().split()[-1]
    assert cli.ok("dump", f"{snapshot_id}:/db.sql").stdout == data


def test_unchanged_files_not_reread_and_inplace_edit_caught(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    cli.backup(src)
    second = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert second["files_unmodified"] == 3 and second["files_new"] == second["files_changed"] == 0
    assert second["data_added"] == 0
    target = src / "docs" / "a.txt"
    st = target.stat()
    target.write_text("ALPHA\n")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and same mtime
    third = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert third["files_changed"] == 1
    assert cli.ok("dump", f"latest:{target}").stdout == b"ALPHA\n"


def test_excludes_and_cachedir_and_repo_inside_paths(cli: Cli) -> None:
    src = make_tree(cli.tmp / "src")
    cli.env["STASISFS_REPO"] = str(src / "backups")  # the repository lies under the path backed up
    cli.env["XDG_CACHE_HOME"] = str(src / ".cache")
    cli.init()
    cache = src / "cachedir"
    cache.mkdir()
    (cache / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    (cache / "junk").write_text("junk")
    cli.ok("backup", src, "--exclude", "*.log", "--exclude-caches")
    paths = cli.ok("ls", "latest").stdout.decode().splitlines()
    assert f"{src}/docs/a.txt" in paths
    assert not any(p.endswith(".log") for p in paths)
    inside = [p[len(str(src)) :] for p in paths if p.startswith(f"{src}/")]
    assert "/docs/a.txt" in inside and "/.cache" in inside
    assert not any(p.startswith(("/cachedir", "/backups", "/.cache/stasisfs")) for p in inside)


def test_dry_run_writes_nothing(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    cli.ok("backup", src, "--dry-run")
    assert cli.snapshots() == []
    assert not any(cli.repo.glob("data/*/*"))


def test_time_and_tags(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    cli.ok("backup", src, "--time", "2024-02-29T12:00:00+00:00", "--tag", "t1", "--tag", "t2")
    [snap] = cli.snapshots()
    assert snap["time"] == "2024-02-29T12:00:00+00:00" and snap["tags"] == ["t1", "t2"]


def test_exit_codes(cli: Cli) -> None:
    missing = cli.run("snapshots")
    assert missing.returncode == 10 and b"stasisfs init" in missing.stderr and b"Traceback" not in missing.stderr
    cli.init()
    wrong = cli.run("snapshots", env={"STASISFS_PASSWORD": "wrong password entirely"})
    assert wrong.returncode == 12 and b"wrong password" in wrong.stderr and b"Traceback" not in wrong.stderr
    assert cli.run("restore", "latest").returncode == 2  # --target is required
    assert cli.run("nonsense").returncode == 2
    assert cli.run("dump", "ffffffff:/x").returncode == 2


def test_a_first_backups_workers_started_before_the_password_is_checked_never_outlive_it(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    wrong = cli.run("backup", src, env={"STASISFS_PASSWORD": "wrong password entirely"})
    assert wrong.returncode == 12 and b"wrong password" in wrong.stderr and b"Traceback" not in wrong.stderr
    assert processes_started_for(cli.env["XDG_CACHE_HOME"], b"stasisfs-worker") == []
    cli.ok("backup", src)
    assert processes_started_for(cli.env["XDG_CACHE_HOME"], b"stasisfs-worker") == []
    [snap] = cli.snapshots()
    assert snap["summary"]["files_new"] == snap["summary"]["total_files"] > 0  # type: ignore[index]


def test_no_password_and_no_tty_fails_at_once(cli: Cli) -> None:
    cli.init()
    env = {k: v for k, v in cli.env.items() if k != "STASISFS_PASSWORD"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stasisfs", "snapshots"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30)
    assert time.monotonic() - started < 15
    assert done.returncode == 1 and b"no password given" in done.stderr


def test_password_file_and_command(cli: Cli) -> None:
    cli.init()
    pw = cli.tmp / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    cli.env["STASISFS_PASSWORD"] = "not the password at all"
    cli.ok("snapshots", "--password-file", pw)  # options beat the environment, before or after the subcommand
    cli.ok("--password-file", pw, "snapshots")
    cli.ok("--password-command", f"cat {pw}", "snapshots")


def test_weak_password_refused(cli: Cli) -> None:
    done = cli.run("init", env={"STASISFS_PASSWORD": "password1"})
    assert (done.returncode == 1 and b"weak" in done.stderr) or b"short" in done.stderr
    assert not (cli.repo / "config").exists()


def test_lock_blocks_second_writer_and_stale_lock_is_broken(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from stasisfs.repo.repository import Repository, Credential;"
         "from stasisfs.repo.locking import RepositoryLock;"
         f"r = Repository(Path({str(cli.repo)!r})); r.unlock(Credential(password={PASSWORD!r}));"
         "l = RepositoryLock(r, 'test holder'); l.acquire(); print('held', flush=True); time.sleep(60)"],
        env=cli.env, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        blocked = cli.run("backup", src)
        assert blocked.returncode == 11 and b"locked by test holder" in blocked.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is broken
    assert len(list((cli.repo / "locks").iterdir())) == 1
    cli.backup(src)
    assert list((cli.repo / "locks").iterdir()) == []


def test_progress_json_lines_and_quiet_without_tty(cli: Cli) -> None:
    cli.init()
    src = make_tree(cli.tmp / "src")
    done = cli.ok("backup", src)
    assert b"\x1b[" not in done.stderr  # no bar without a TTY
    lines = cli.ok("backup", src, "--json").stdout.decode().splitlines()
    summary = json.loads(lines[-1])
    assert summary["message_type"] == "summary" and len(summary["snapshot_id"]) == 64
    quiet = cli.ok("backup", src, "--quiet")
    assert quiet.stdout.decode().strip().count("\n") == 0 and quiet.stderr == b""
