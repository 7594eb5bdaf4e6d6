"""Unattended operation: schedule add/list/remove (cron) and status."""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from stasisfs import jobs
from stasisfs.cli.common import global_options, info, open_repository, print_json, setting, warn, write_line
from stasisfs.config import load_profiles
from stasisfs.errors import StasisError, UsageError
from stasisfs.format import keyslots
from stasisfs.format.retention import Duration
from stasisfs.remote.devices import DeviceRemotes
from stasisfs.repo.repository import Repository
from stasisfs.schedule import unattended
from stasisfs.system.paths import config_root, state_root

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@click.group()
def schedule() -> None:
    """Run backups from cron, with a machine key instead of the password."""


@schedule.command("add")
@click.argument("name")
@click.argument("backup_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- BACKUP-ARGS]...")
@click.option("--cron", "cron", required=True, metavar="EXPR", help="When to run, as five cron fields, e.g. '15 3 * * *'.")
@click.option("--every-missed", is_flag=True,
              help="Run every 15 minutes but back up only when the last due time has no success yet: a laptop asleep at 3 a.m. catches up.")
@global_options
def schedule_add(name: str, backup_args: tuple[str, ...], cron: str, every_missed: bool) -> None:
    """Add a crontab line that backs up on schedule NAME.

    \b
    stasisfs --repo /media/usb/backup schedule add nightly --cron '15 3 * * *' -- ~/ --exclude-caches
    stasisfs schedule add laptop --profile laptop --cron '0 * * * *' --every-missed

    It makes a machine key for the schedule (a random key slot in a 0600 file
    under ~/.config/stasisfs/keys), so the password is never stored. The line
    runs unchanged under cron (PATH=/usr/bin:/bin, no STASISFS_* variables) and
    logs to ~/.local/state/stasisfs/NAME.log.
    """
    if not NAME.match(name):
        raise UsageError("schedule names use letters, digits, '.', '_' and '-'")
    unattended.validate_cron(cron)
    if name in unattended.schedules():
        raise UsageError(f"a schedule named {name!r} exists; remove it first")
    profile = click.get_current_context().find_root().meta.get("stasisfs.settings", {}).get("profile") or os.environ.get("STASISFS_PROFILE")
    key_file = config_root() / "keys" / f"{name}.key"
    with open_repository() as repo:
        jobs.add_machine_key(repo, key_file, f"schedule {name}")
        entry = unattended.Schedule(name, cron, str(repo.path), str(key_file), str(profile) if profile else None, every_missed, list(backup_args),
                                    created=unattended.now_iso(), dirs=unattended.xdg_dirs())
    line = entry.line(unattended.executable())
    try:
        unattended.install_line(name, line)
    except StasisError:
        key_file.unlink(missing_ok=True)
        raise
    unattended.save_schedule(entry)
    info(f"added to your crontab (next run {entry.next_run().isoformat(timespec='minutes')}):")
    write_line(line)


@schedule.command("list")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@global_options
def schedule_list(json_output: bool) -> None:
    """List schedules with their next run and whether their crontab line is present."""
    crontab = unattended.read_crontab()
    rows = []
    for entry in unattended.schedules().values():
        rows.append({"name": entry.name, "cron": entry.cron, "every_missed": entry.every_missed, "repo": entry.repo, "profile": entry.profile,
                     "next_run": entry.next_run().isoformat(timespec="minutes"),
                     "installed": f"{unattended.MARKER}{entry.name}" in crontab})
    if json_output:
        print_json(rows)
        return
    for row in rows:
        missing = "" if row["installed"] else "  (its crontab line is missing!)"
        write_line(f"{row['name']:<16} {row['cron']:<16} next {row['next_run']}  {row['profile'] or row['repo']}{missing}")


@schedule.command("remove")
@click.argument("name")
@global_options
def schedule_remove(name: str) -> None:
    """Remove schedule NAME: exactly its crontab line, its machine key file and key slot."""
    entry = unattended.forget_schedule(name)
    if not unattended.remove_line(name):
        warn(f"the crontab had no line for schedule {name}")
    key_file = Path(entry.key_file)
    try:
        _, slot_id, _ = keyslots.parse_machine_key(key_file.read_text())
        repo = Repository(Path(entry.repo))
        try:
            repo.remove_slot(slot_id)
        finally:
            repo.close()
    except (OSError, StasisError) as exc:
        warn(f"could not remove the schedule's key slot: {exc}")
    key_file.unlink(missing_ok=True)
    info(f"schedule {name} removed")


def _entries() -> list[tuple[str, str | None, unattended.Schedule | None]]:
    """(run key, repository, schedule) for every profile, schedule, and the --repo given."""
    found: list[tuple[str, str | None, unattended.Schedule | None]] = []
    for profile in load_profiles().values():
        found.append((f"profile:{profile.name}", profile.repository, None))
    for entry in unattended.schedules().values():
        found.append((f"schedule:{entry.name}", entry.repo, entry))
    repo = setting("repo", "STASISFS_REPO")
    if repo and not any(r == str(Path(repo).absolute()) for _, r, _ in found):
        found.append((f"repo:{Path(repo).absolute()}", str(Path(repo).absolute()), None))
    return found


def _remote_states(repo: str | None) -> dict[str, Any]:
    if not repo:
        return {}
    try:
        opened = Repository(Path(repo))
    except StasisError:
        return {}
    try:
        remotes = DeviceRemotes(opened.id)
        states = {r.name: remotes.state(r.name) for r in remotes.all()}
        return {name: {"last_sync": state.get("last_sync"), "pending_deletes": sum(len(v) for v in state.get("delete", {}).values())}
                for name, state in states.items()}
    finally:
        opened.close()


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@click.option("--max-age", metavar="DURATION", help="Exit 1 when any profile's or schedule's last success is older than this (e.g. 2d, 36h).")
@global_options
def status(json_output: bool, max_age: str | None) -> None:
    """Show each profile and schedule: last run, last success, next run, remotes.

    For monitoring: `stasisfs status --max-age 2d` exits 1 when a backup is overdue.
    """
    try:
        limit = Duration.parse(max_age) if max_age else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    runs = unattended.runs()
    now = datetime.now().astimezone()
    rows: list[dict[str, Any]] = []
    overdue: list[str] = []
    missed: list[str] = []
    for key, repo, entry in _entries():
        record = runs.get(key, {})
        success = record.get("last_success")
        row = {"name": key, "repository": repo, "last_run": record.get("last"), "last_success": success,
               "next_run": entry.next_run().isoformat(timespec="minutes") if entry else None, "remotes": _remote_states(repo)}
        due = unattended.missed_due_time(entry, success["started"] if success else None, now) if entry else None
        row["missed"] = due.isoformat(timespec="minutes") if due else None
        if due is not None:
            missed.append(key)
        rows.append(row)
        if limit is not None and (success is None or datetime.fromisoformat(success["started"]) < limit.before(now)):
            overdue.append(key)
    if json_output:
        print_json({"entries": rows, "overdue": overdue, "missed": missed})
    else:
        for row in rows:
            last = row["last_run"] or {}
            write_line(f"{row['name']}  ({row['repository'] or 'no repository'})")
            if last:
                write_line(f"  last run     {last['started']}  {last['result']}  {last['duration_s']}s  "
                           f"{last['snapshot'][:8]}  {last['files']} files  {last['bytes']} bytes  {last['reason']}".rstrip())
            else:
                write_line("  last run     never")
            success = row["last_success"]
            write_line(f"  last success {success['started'] if success else 'never'}")
            if row["next_run"]:
                write_line(f"  next run     {row['next_run']}")
            if row["missed"]:
                write_line(f"  MISSED       the run due {row['missed']} did not succeed; see {state_root()}/"
                           f"{row['name'].split(':', 1)[1]}.log")
            for remote, state in row["remotes"].items():
                pending = f", {state['pending_deletes']} deletions pending" if state["pending_deletes"] else ""
                write_line(f"  remote {remote}: last sync {state['last_sync'] or 'never'}{pending}")
        if not rows:
            info("nothing to report: no profiles, schedules or --repo")
    if overdue and not json_output:
        warn(f"overdue (no success within {max_age}): {', '.join(overdue)}")
    if missed and not json_output:
        warn(f"missed: {', '.join(missed)} did not succeed at their last due time")
    if overdue or missed:
        sys.exit(1)
