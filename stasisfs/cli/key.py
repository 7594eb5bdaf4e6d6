"""Key slot commands: list, add, remove, passwd, export, import."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from stasisfs import jobs
from stasisfs.cli.common import (
    global_options,
    info,
    open_repository,
    print_json,
    prompt_password,
    read_password,
    read_recovery_key,
    repo_path,
    warn,
    write_line,
)
from stasisfs.errors import EXIT_INCOMPLETE, StasisError, UsageError
from stasisfs.format import keyslots
from stasisfs.remote.devices import DeviceRemotes
from stasisfs.repo.repository import Repository


def _new_password(repo: Repository) -> str:
    password = read_password("new password", confirm=True)
    reason = keyslots.password_weakness(password, [repo.device, "stasisfs"])
    if reason:
        raise StasisError(reason)
    return password


@click.group()
def key() -> None:
    """Manage the key slots that open this repository."""


@key.command("list")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON list.")
@global_options
def key_list(json_output: bool) -> None:
    """List key slots; * marks the one in use."""
    with open_repository() as repo:
        slots = repo.slots()
        current = repo.slot_id
    if json_output:
        print_json([{"id": s.id, "kind": s.kind, "label": s.label, "created": s.created, "current": s.id == current} for s in slots])
        return
    for s in slots:
        write_line(f"{'*' if s.id == current else ' '} {s.id}  {s.kind:<9} {s.created}  {s.label}")


@key.command("add")
@click.option("--machine", "machine_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Make a random machine key (for cron) and write it to FILE, mode 0600.")
@click.option("--label", default="", help="A note to tell this slot apart.")
@global_options
def key_add(machine_file: Path | None, label: str) -> None:
    """Add a password slot, or a machine key slot with --machine."""
    with open_repository() as repo:
        master = repo.master_keys.master
        if machine_file is not None:
            slot = jobs.add_machine_key(repo, machine_file, label or "machine")
            info(f"added machine key slot {slot.id}; key written to {machine_file} (mode 0600)")
        else:
            click.echo("Enter the password for the new slot.", err=True)
            slot = keyslots.wrap(master, repo.id, _new_password(repo).encode(), keyslots.SLOT_PASSWORD, keyslots.argon2_params(), label)
            repo.add_slot(slot)
            info(f"added password slot {slot.id}")
    click.echo(slot.id)


@key.command("remove")
@click.argument("slot_id", metavar="ID")
@global_options
def key_remove(slot_id: str) -> None:
    """Remove a key slot. The slot in use and the last slot cannot be removed."""
    with open_repository() as repo:
        if slot_id == repo.slot_id:
            raise UsageError("that is the slot you opened the repository with; open with another key to remove it")
        if len(repo.slots()) <= 1:
            raise UsageError("cannot remove the last key slot")
        repo.remove_slot(slot_id)
    info(f"removed key slot {slot_id}")


@key.command("passwd")
@click.option("--from-remote", "from_remote", default=None, metavar="NAME",
              help="The password was changed on another device: log in to remote NAME with the new password and re-wrap this "
                   "device's password slot under it (the old password is not needed).")
@global_options
def key_passwd(from_remote: str | None) -> None:
    """Change the password: re-wrap every password slot the current password opens.

    \b
    With remotes, the account password changes too, for every device of the
    account: each device's escrowed key is wrapped under one user key, and only
    that key is re-wrapped. Other devices are told on their next sync and take
    the new password with `stasisfs key passwd --from-remote NAME`.
    """
    if from_remote is not None:
        _adopt_password(from_remote)
        return
    with open_repository() as repo:
        if not repo.slot_id or next((s for s in repo.slots() if s.id == repo.slot_id), None) is None:
            raise UsageError("open the repository with the password to change it")
        current = next(s for s in repo.slots() if s.id == repo.slot_id)
        if current.kind != keyslots.SLOT_PASSWORD:
            raise UsageError("the repository was opened with a machine key; give the password instead")
        old_password = read_password()
        click.echo("Enter the new password.", err=True)
        new_password = _prompt_new_or_env(repo)
        master = repo.master_keys.master
        replaced = []
        for slot in repo.slots():
            if slot.kind != keyslots.SLOT_PASSWORD:
                continue
            try:
                keyslots.unwrap(slot, repo.id, old_password.encode())
            except StasisError:
                continue
            fresh = keyslots.wrap(master, repo.id, new_password.encode(), keyslots.SLOT_PASSWORD, keyslots.argon2_params(), slot.label)
            repo.add_slot(fresh)  # the new slot exists before the old one goes
            repo.remove_slot(slot.id)
            replaced.append(fresh.id)
            if slot.id == repo.slot_id:
                DeviceRemotes(repo.id).set_account_slot(fresh.id)
        info(f"password changed ({len(replaced)} slot{'s' if len(replaced) != 1 else ''} re-wrapped)")
        from stasisfs.remote.account import change_password_on_remotes  # the HTTP stack, only when needed

        failures = change_password_on_remotes(repo, old_password, new_password, info)
    for failure in failures:
        warn(f"remote {failure}; run `stasisfs key passwd` again when it is reachable (the old password still logs in there)")
    if failures:
        sys.exit(EXIT_INCOMPLETE)


def _adopt_password(remote_name: str) -> None:
    from stasisfs.remote.account import adopt_password_from_remote  # the HTTP stack, only when needed

    if os.environ.get("STASISFS_KEY_FILE"):
        raise UsageError("this needs the account's password, not a machine key")
    with open_repository(unlock=False) as repo:
        remote = DeviceRemotes(repo.id).get(remote_name)
        click.echo(f"Enter the current password of {remote.user} on {remote.name}.", err=True)
        password = read_password()
        slot_id = adopt_password_from_remote(repo, remote, password, info)
    info(f"this device now opens with the account's current password (key slot {slot_id})")


def _prompt_new_or_env(repo: Repository) -> str:
    """The new password: STASISFS_NEW_PASSWORD(_FILE) for scripts, else a confirmed prompt."""
    if os.environ.get("STASISFS_NEW_PASSWORD_FILE"):
        password = Path(os.environ["STASISFS_NEW_PASSWORD_FILE"]).read_text().rstrip("\n")
    elif "STASISFS_NEW_PASSWORD" in os.environ:
        password = os.environ["STASISFS_NEW_PASSWORD"]
    elif sys.stdin.isatty():
        password = prompt_password("new password: ")
        if prompt_password("new password again: ") != password:
            raise StasisError("the passwords do not match")
    else:
        raise StasisError("no new password given: set STASISFS_NEW_PASSWORD_FILE or run on a terminal")
    reason = keyslots.password_weakness(password, [repo.device, "stasisfs"])
    if reason:
        raise StasisError(reason)
    return password


@key.command("export")
@click.option("--paper", is_flag=True, help="Lines with checksums, for printing and typing back in.")
@global_options
def key_export(paper: bool) -> None:
    """Print the recovery key. Anyone holding it can read the repository: keep it offline."""
    with open_repository() as repo:
        text = keyslots.format_recovery_key(repo.master_keys.master, paper)
        repo_id = repo.id.hex()
    if paper:
        click.echo(f"stasisfs recovery key for repository {repo_id[:16]}\n")
    click.echo(text)
    if paper:
        click.echo("\nRestore access with: stasisfs key import   (then type these lines)")


@key.command("import")
@click.option("--from-file", "source", type=click.Path(exists=True, dir_okay=False), help="Read the recovery key from a file instead of standard input.")
@global_options
def key_import(source: str | None) -> None:
    """Regain access with a recovery key: adds a new password slot.

    Reads the recovery key from standard input (or --from-file), then the new
    password from a prompt, STASISFS_NEW_PASSWORD_FILE or STASISFS_NEW_PASSWORD.
    """
    repo = Repository(repo_path())
    try:
        repo.unlock_master(read_recovery_key(source))
        click.echo("Recovery key accepted. Choose a new password.", err=True)
        password = _prompt_new_or_env(repo)
        slot = keyslots.wrap(repo.master_keys.master, repo.id, password.encode(), keyslots.SLOT_PASSWORD, keyslots.argon2_params(), "recovered")
        repo.add_slot(slot)
    finally:
        repo.close()
    info(f"added password slot {slot.id}; the repository opens with the new password")
