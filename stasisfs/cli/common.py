"""Shared CLI plumbing: global options, credentials, opening the repository, output."""

from __future__ import annotations

import getpass
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from stasisfs import jobs
from stasisfs.config import Profile, get_profile
from stasisfs.errors import EXIT_INCOMPLETE, RepositoryMissing, StasisError, UsageError
from stasisfs.format import keyslots
from stasisfs.format.keyslots import parse_machine_key
from stasisfs.format.snapshot import SnapshotFilter
from stasisfs.progress import counted, iec
from stasisfs.remote.packcache import attach_thin_packs
from stasisfs.remote.sync import SyncReport
from stasisfs.repo.repository import Credential, Repository

F = TypeVar("F", bound=Callable[..., Any])

# Global options are accepted before or after the subcommand: each is declared on the
# group and on every command, and stored on the root context only when given.
GLOBAL_OPTIONS = (
    ("--repo", "repo", "Local repository directory [env: STASISFS_REPO]."),
    ("--password-file", "password_file", "Read the password from this file [env: STASISFS_PASSWORD_FILE]."),
    ("--password-command", "password_command", "Run this command and use its output as the password [env: STASISFS_PASSWORD_COMMAND]."),
    ("--key-file", "key_file", "Open with a machine key file instead of a password [env: STASISFS_KEY_FILE]."),
    ("--profile", "profile", "Use this profile from ~/.config/stasisfs/config.toml [env: STASISFS_PROFILE]."),
)
PROFILE_SETTINGS = {"repo": "repository", "password_file": "password_file", "password_command": "password_command", "key_file": "key_file"}


def _store(ctx: click.Context, param: click.Parameter, value: object) -> None:
    if value is not None and param.name is not None:
        ctx.find_root().meta.setdefault("stasisfs.settings", {})[param.name] = value


def global_options(fn: F) -> F:
    for flag, name, help_text in reversed(GLOBAL_OPTIONS):
        metavar = "CMD" if "command" in name else ("NAME" if name == "profile" else "PATH")
        fn = click.option(flag, name, default=None, expose_value=False, callback=_store, help=help_text, metavar=metavar)(fn)
    return fn


def _store_filter(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    if value and param.name is not None:
        ctx.find_root().meta.setdefault("stasisfs.filter", {})[param.name] = value


def filter_options(fn: F) -> F:
    """`--path P` and `--tag T` (repeatable), as restic has them: they choose which snapshots `latest` and lists see."""
    fn = click.option("--tag", "filter_tags", multiple=True, metavar="T", expose_value=False, callback=_store_filter,
                      help="Only snapshots with this tag (repeatable: all of them).")(fn)
    return click.option("--path", "filter_paths", multiple=True, metavar="P", expose_value=False, callback=_store_filter,
                        help="Only snapshots that hold this path (repeatable: all of them).")(fn)


def snapshot_filter() -> SnapshotFilter:
    chosen = click.get_current_context().find_root().meta.get("stasisfs.filter", {})
    paths = tuple(os.fsencode(os.path.abspath(p)) for p in chosen.get("filter_paths", ()))
    return SnapshotFilter(paths, tuple(chosen.get("filter_tags", ())))


def active_profile() -> Profile | None:
    """The profile chosen with --profile or STASISFS_PROFILE, loaded (and validated) once."""
    root = click.get_current_context().find_root()
    name = root.meta.get("stasisfs.settings", {}).get("profile") or os.environ.get("STASISFS_PROFILE")
    if not name:
        return None
    if "stasisfs.profile" not in root.meta:
        root.meta["stasisfs.profile"] = get_profile(str(name))
    profile: Profile = root.meta["stasisfs.profile"]
    return profile


def setting(name: str, env: str, from_profile: bool = True) -> str | None:
    """Options, then the environment, then the profile."""
    settings = click.get_current_context().find_root().meta.get("stasisfs.settings", {})
    profile = active_profile() if from_profile else None  # a chosen profile is validated even when options override it
    value = settings.get(name)
    if value is not None:
        return str(value)
    if os.environ.get(env):
        return os.environ[env]
    profile = profile if name in PROFILE_SETTINGS else None
    found = getattr(profile, PROFILE_SETTINGS[name]) if profile is not None else None
    return str(found) if found else None


def repo_path() -> Path:
    value = setting("repo", "STASISFS_REPO")
    if not value:
        raise RepositoryMissing("no repository given: pass --repo DIR or set STASISFS_REPO (or use a profile with --profile NAME)")
    return Path(value)


def _read_password_file(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as exc:
        raise StasisError(f"cannot read password file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"password file {path} is readable by others; chmod 600 it")
    return text.rstrip("\n")


def _run_password_command(command: str) -> str:
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise StasisError(f"password command failed: {exc}") from None
    if done.returncode != 0:
        raise StasisError(f"password command exited with status {done.returncode}")
    return done.stdout.rstrip("\n")


def _can_prompt() -> bool:
    return sys.stdin.isatty()


def prompt_password(prompt: str = "repository password: ") -> str:
    try:
        return getpass.getpass(prompt)
    except EOFError:  # Ctrl-D; Ctrl-C goes on to the command's interrupt handling (exit 130)
        raise StasisError("no password entered") from None


def read_password(purpose: str = "repository password", confirm: bool = False) -> str:
    """The password from (in order) options, environment, or a prompt on a TTY. Never waits without a TTY."""
    ctx_settings = click.get_current_context().find_root().meta.get("stasisfs.settings", {})
    if ctx_settings.get("password_file"):
        return _read_password_file(str(ctx_settings["password_file"]))
    if ctx_settings.get("password_command"):
        return _run_password_command(str(ctx_settings["password_command"]))
    if os.environ.get("STASISFS_PASSWORD_FILE"):
        return _read_password_file(os.environ["STASISFS_PASSWORD_FILE"])
    if os.environ.get("STASISFS_PASSWORD_COMMAND"):
        return _run_password_command(os.environ["STASISFS_PASSWORD_COMMAND"])
    if "STASISFS_PASSWORD" in os.environ:
        return os.environ["STASISFS_PASSWORD"]
    profile = active_profile()
    if profile is not None and profile.password_file:
        return _read_password_file(profile.password_file)
    if profile is not None and profile.password_command:
        return _run_password_command(profile.password_command)
    if not _can_prompt():
        raise StasisError(
            "no password given and no terminal to ask on: use --password-file, --password-command, "
            "--key-file or STASISFS_PASSWORD"
        )
    password = prompt_password(f"{purpose}: ")
    if confirm and prompt_password(f"{purpose} again: ") != password:
        raise StasisError("the passwords do not match")
    return password


def _password_source_given() -> bool:
    settings = click.get_current_context().find_root().meta.get("stasisfs.settings", {})
    return bool(settings.get("password_file") or settings.get("password_command")) or any(
        v in os.environ for v in ("STASISFS_PASSWORD", "STASISFS_PASSWORD_FILE", "STASISFS_PASSWORD_COMMAND"))


def read_credential() -> Credential:
    key_file = setting("key_file", "STASISFS_KEY_FILE", from_profile=False)
    if not key_file and not _password_source_given():
        key_file = setting("key_file", "STASISFS_KEY_FILE")  # the profile's, unless a password was given
    if key_file:
        try:
            repo_id, slot, secret = parse_machine_key(Path(key_file).read_text())
        except OSError as exc:
            raise StasisError(f"cannot read key file {key_file}: {exc.strerror}") from None
        return Credential(machine_slot=slot, machine_secret=secret, machine_repo=repo_id)
    return Credential(password=read_password())


@contextmanager
def interruptible(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop`, which the work checks between items, rather than raising at any instruction:
    a KeyboardInterrupt inside a process pool's own bookkeeping can leave it waiting forever. A second signal
    raises at once. Whatever arrived is raised as KeyboardInterrupt when the block ends."""
    def request_stop(_signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.is_set():
        raise KeyboardInterrupt


# Every repository a command opened: after the command's own output, `damage_exit` names what was skipped.
_opened: list[Repository] = []


@contextmanager
def open_repository(unlock: bool = True) -> Iterator[Repository]:
    repo = attach_thin_packs(Repository(repo_path()))
    _opened.append(repo)
    try:
        if unlock:
            repo.unlock(read_credential())
        yield repo
    finally:
        repo.close()


@contextmanager
def unlocked(repo: Repository) -> Iterator[Repository]:
    """Opens the key of a repository opened with `unlock=False`, once other work has started meanwhile."""
    repo.unlock(read_credential())
    yield repo


def damage_exit() -> int:
    """Name the damaged objects the command skipped and the repairs it made; EXIT_INCOMPLETE if anything was skipped."""
    skipped = 0
    for repo in _opened:
        for line in repo.notices:
            warn(line)
        for name, why in sorted(repo.damaged.items()):
            warn(f"skipped damaged object {repo.path / name}: {why}")
        skipped += len(repo.damaged)
    if not skipped:
        return 0
    warn(f"{skipped} damaged object(s) skipped; everything else was done. `stasisfs repair` heals them from a remote; "
         "`stasisfs repair snapshots --forget` sets aside damaged snapshots that no copy can heal")
    return EXIT_INCOMPLETE


def warn(message: str) -> None:
    click.echo(f"stasisfs: warning: {message}", err=True)


def info(message: str) -> None:
    click.echo(message, err=True)


def print_json(doc: object) -> None:
    click.echo(json.dumps(doc, ensure_ascii=True))


def fs(path: bytes) -> str:
    """A path for display and JSON: bytes that are not UTF-8 survive as surrogate escapes."""
    return os.fsdecode(path)


human_size = iec  # one formatter of sizes for bars and summaries alike
__all__ = ["counted", "human_size"]  # re-exported for the commands


def write_line(*parts: str | bytes) -> None:
    """Write to stdout as bytes, so file names that are not UTF-8 come out unchanged."""
    out = sys.stdout.buffer
    out.write(b"".join(p if isinstance(p, bytes) else p.encode() for p in parts) + b"\n")


def report_sync(reports: list[SyncReport], failures: dict[str, str]) -> None:
    for report in reports:
        for line in report.warnings:
            warn(line)
        deleted = f", {report.deleted} deleted" if report.deleted else ""
        info(f"synced to {report.remote}: {report.uploaded} objects uploaded ({human_size(report.uploaded_bytes)}), "
             f"{report.already_there} already there{deleted}")
    for name, reason in failures.items():
        warn(f"sync to remote {name} failed: {reason}. The local snapshot is safe; the next sync or backup catches up")


def read_maintenance_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip().splitlines()[-1]
    except (OSError, IndexError) as exc:
        raise UsageError(f"cannot read the maintenance token from {path}: {exc}") from None


def sync_after_change(repo: Repository, json_output: bool, maintenance_token: str | None = None,
                      names: list[str] | None = None) -> dict[str, str]:
    """Sync to every remote, or to `names` (after backup, forget, prune), and say how it went. Returns failures: exit 3."""
    outcome = jobs.sync_after_change(repo, names, maintenance_token)
    if not json_output:
        report_sync(outcome.reports, outcome.failures)
    return outcome.failures


def read_recovery_key(source: str | None) -> bytes:
    """A recovery key from a file, or from standard input (typed or pasted, ending with an empty line)."""
    if source:
        text = Path(source).read_text()
    elif sys.stdin.isatty():
        click.echo("Type or paste the recovery key, then an empty line:", err=True)
        lines = []
        for line in sys.stdin:
            if not line.strip():
                break
            lines.append(line)
        text = "".join(lines)
    else:
        text = sys.stdin.read()
    return keyslots.parse_recovery_key(text)
