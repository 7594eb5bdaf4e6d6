"""Unattended runs: schedules in the user's crontab, run records for `status`, hooks, rotating logs.

    ~/.config/stasisfs/schedules.json   {NAME: {"cron", "repo", "profile", "key_file", "args", "every_missed"}}
    ~/.config/stasisfs/keys/            machine keys made for schedules (0600); never a password
    ~/.local/state/stasisfs/runs.json   the last run and last success of every profile and schedule
    ~/.local/state/stasisfs/<NAME>.log  a scheduled run's output, rotated at 1 MiB, 5 kept

A crontab line is `<cron> <command> # stasisfs-schedule:<NAME>`; only lines with
our marker are ever touched.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stasisfs.errors import StasisError, UsageError
from stasisfs.repo.storage import read_json_file, write_json_file
from stasisfs.system.paths import XDG_DEFAULTS, config_root, state_root, xdg_dir

MARKER = "# stasisfs-schedule:"
EVERY_MISSED_CRON = "*/15 * * * *"
LOG_LIMIT = 1 << 20
LOGS_KEPT = 5
HOOK_TIMEOUT = 300




# --- run records --------------------------------------------------------------------------------

@dataclass
class RunRecord:
    started: str
    duration_s: float
    result: str  # "success", "incomplete", "failed", "skipped"
    reason: str = ""
    snapshot: str = ""
    files: int = 0
    bytes: int = 0


def record_run(key: str, record: RunRecord) -> None:
    path = state_root() / "runs.json"
    doc = read_json_file(path, {})
    entry = doc.setdefault(key, {})
    entry["last"] = asdict(record)
    if record.result == "success":
        entry["last_success"] = asdict(record)
    write_json_file(path, doc)


def runs() -> dict[str, dict[str, Any]]:
    return read_json_file(state_root() / "runs.json", {})


def last_success(key: str) -> datetime | None:
    found = runs().get(key, {}).get("last_success")
    return datetime.fromisoformat(found["started"]) if found else None


# --- hooks ------------------------------------------------------------------------------------------

def run_hook(command: str | None, result: str, reason: str, snapshot: str, profile: str) -> str | None:
    """Run an on-success/on-failure hook with the outcome in its environment; a message if it failed."""
    if not command:
        return None
    env = {**hook_environment(os.environ), "STASISFS_RESULT": result, "STASISFS_REASON": reason, "STASISFS_SNAPSHOT": snapshot,
           "STASISFS_PROFILE": profile}
    try:
        done = subprocess.run(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL, timeout=HOOK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"hook {command!r} failed: {exc}"
    return None if done.returncode == 0 else f"hook {command!r} exited with status {done.returncode}"


# Hooks are user shell commands: they get the outcome, never a secret this process was given.
HOOK_SECRETS = ("STASISFS_PASSWORD", "STASISFS_PASSWORD_FILE", "STASISFS_PASSWORD_COMMAND", "STASISFS_NEW_PASSWORD",
                "STASISFS_NEW_PASSWORD_FILE", "STASISFS_KEY_FILE")


def hook_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment minus every password, key and token source (and anything named like one)."""
    return {k: v for k, v in environ.items()
            if k not in HOOK_SECRETS and not any(word in k.upper() for word in ("PASSWORD", "TOKEN", "SECRET"))}


# --- logs -------------------------------------------------------------------------------------------

def log_to_rotating_file(name: str) -> Path:
    """Send this process's stdout and stderr to `<state>/<name>.log`, rotating it first when it is large."""
    path = state_root() / f"{name}.log"
    if path.exists() and path.stat().st_size > LOG_LIMIT:
        for n in range(LOGS_KEPT - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{n + 1}"))
        path.replace(path.with_name(f"{path.name}.1"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"--- {datetime.now().astimezone().isoformat(timespec='seconds')} pid {os.getpid()}", file=sys.stderr, flush=True)
    return path


# --- schedules --------------------------------------------------------------------------------------

@dataclass
class Schedule:
    name: str
    cron: str
    repo: str
    key_file: str
    profile: str | None = None
    every_missed: bool = False
    args: list[str] = field(default_factory=list)
    created: str = ""  # ISO time the schedule was added: due times before it are not missed runs
    # The XDG directories as they were when it was added: cron's bare environment would find other ones.
    dirs: dict[str, str] = field(default_factory=dict)

    def command(self, executable: list[str]) -> str:
        parts = [f"{name}={value}" for name, value in sorted(self.dirs.items())]
        parts = (["env", *parts] if parts else []) + [*executable, "--repo", self.repo, "--key-file", self.key_file]
        if self.profile:
            parts += ["--profile", self.profile]
        parts += ["backup", "--quiet", "--schedule", self.name]
        if self.every_missed:
            parts.append("--every-missed")
        parts += self.args
        return shlex.join(parts)

    def line(self, executable: list[str]) -> str:
        when = EVERY_MISSED_CRON if self.every_missed else self.cron
        return f"{when} {self.command(executable).replace('%', chr(92) + '%')} {MARKER}{self.name}"

    def next_run(self, after: datetime | None = None) -> datetime:
        from croniter import croniter

        return croniter(self.cron, after or datetime.now().astimezone()).get_next(datetime)  # type: ignore[no-any-return]

    def previous_run(self, before: datetime | None = None) -> datetime:
        from croniter import croniter

        return croniter(self.cron, before or datetime.now().astimezone()).get_prev(datetime)  # type: ignore[no-any-return]


def xdg_dirs() -> dict[str, str]:
    """This user's config, cache and state directories, absolute, as a cron line must name them."""
    return {name: str(xdg_dir(name)) for name in XDG_DEFAULTS}


MISSED_GRACE_S = 15 * 60  # a run still going, or a few minutes late, is not missed


def missed_due_time(schedule: Schedule, last_success: str | None, now: datetime) -> datetime | None:
    """The last due time with no success since, once its grace has passed; None when nothing is missed."""
    due = schedule.previous_run(now - timedelta(seconds=MISSED_GRACE_S))
    if schedule.created and due < datetime.fromisoformat(schedule.created):
        return None
    if last_success is not None and datetime.fromisoformat(last_success) >= due:
        return None
    return due


def executable() -> list[str]:
    """The absolute command that runs this stasisfs, for a cron line with PATH=/usr/bin:/bin."""
    script = Path(sys.executable).with_name("stasisfs")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "stasisfs"]


def validate_cron(expression: str) -> None:
    from croniter import croniter

    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise UsageError(f"{expression!r} is not a cron expression with five fields, like '15 3 * * *'")


def schedules() -> dict[str, Schedule]:
    return {name: Schedule(**doc) for name, doc in read_json_file(config_root() / "schedules.json", {}).items()}


def save_schedule(schedule: Schedule) -> None:
    doc = read_json_file(config_root() / "schedules.json", {})
    doc[schedule.name] = asdict(schedule)
    write_json_file(config_root() / "schedules.json", doc)


def forget_schedule(name: str) -> Schedule:
    doc = read_json_file(config_root() / "schedules.json", {})
    if name not in doc:
        raise UsageError(f"no schedule named {name!r}; see `stasisfs schedule list`")
    schedule = Schedule(**doc.pop(name))
    write_json_file(config_root() / "schedules.json", doc)
    return schedule


def read_crontab() -> str:
    try:
        done = subprocess.run(["crontab", "-l"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise StasisError("crontab is not installed: install Debian's `cron` package") from None
    if done.returncode != 0:
        if "no crontab" in done.stderr:
            return ""
        raise StasisError(f"crontab -l failed: {done.stderr.strip()}")
    return done.stdout


def write_crontab(text: str) -> None:
    done = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise StasisError(f"crontab refused the new table: {done.stderr.strip()}")


def install_line(name: str, line: str) -> None:
    current = read_crontab()
    if any(existing.endswith(f"{MARKER}{name}") for existing in current.splitlines()):
        raise UsageError(f"the crontab already has a stasisfs schedule named {name!r}")
    write_crontab(current + ("" if not current or current.endswith("\n") else "\n") + line + "\n")


def remove_line(name: str) -> bool:
    current = read_crontab()
    lines = current.splitlines(keepends=True)
    kept = [line for line in lines if not line.rstrip("\n").endswith(f"{MARKER}{name}")]
    if len(kept) == len(lines):
        return False
    write_crontab("".join(kept))
    return True


def missed(schedule: Schedule, key: str) -> bool:
    """True when no success happened since the schedule's latest due time."""
    done = last_success(key)
    return done is None or done < schedule.previous_run()


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")
