"""Remote commands: remote add/list/remove, sync, recover, devices."""

from __future__ import annotations

import os

import click

from stasisfs.cli.common import global_options, human_size, info, open_repository, print_json, read_password, repo_path, report_sync, warn
from stasisfs.errors import EXIT_INCOMPLETE, UsageError
from stasisfs.progress import Counters, Reporter
from stasisfs.remote.devices import DeviceRemotes, Remote

# The HTTP stack (requests) is imported inside the commands that use it: every other command starts faster.


def _password_only() -> str:
    if os.environ.get("STASISFS_KEY_FILE"):
        raise UsageError("this needs the password, not a machine key (the server login and the escrowed key derive from it)")
    return read_password()


@click.group()
def remote() -> None:
    """Manage the servers this repository syncs to."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--user", required=True, help="Your user name on the server.")
@click.option("--enrol-code", default=None, metavar="CODE", help="The one-time code from the operator (first device only).")
@click.option("--cacert", type=click.Path(exists=True, dir_okay=False), help="CA certificate to trust for an https URL.")
@global_options
def remote_add(name: str, url: str, user: str, enrol_code: str | None, cacert: str | None) -> None:
    """Add a server and register this device on it.

    \b
    First device of a user:   remote add home https://host:8443 --user alice --enrol-code CODE
    Later devices:            remote add home https://host:8443 --user alice   (logs in with the password)

    The device's key is escrowed on the server wrapped under your account's
    user key, itself wrapped under your password, so `stasisfs recover` can
    bring everything back on a new machine with the URL, user name and password.
    Nothing else is uploaded yet: run `stasisfs sync`, or the next backup syncs.
    """
    from stasisfs.remote import account

    if plain_http_off_this_machine(url):
        warn(f"{url} is plain http to another machine: your login proof, tokens and object ids travel unencrypted "
             "(the objects themselves stay encrypted). Use https:// with --cacert for a private CA")
    with open_repository() as repo:
        password = _password_only()
        added = account.add_remote(repo, name, url, user, password, enrol_code, cacert, info)
    info(f"remote {name} added: device {added.device} of {user} at {url}; the device token is in ~/.config/stasisfs (mode 0600)")


def plain_http_off_this_machine(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: it may resolve anywhere


@remote.command("list")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@global_options
def remote_list(json_output: bool) -> None:
    """List remotes with their last sync."""
    with open_repository(unlock=False) as repo:
        remotes = DeviceRemotes(repo.id)
        rows = [{"name": r.name, "url": r.url, "user": r.user, "device": r.device, "thin": remotes.thin == r,
                 "last_sync": remotes.state(r.name).get("last_sync")} for r in remotes.all()]
    if json_output:
        print_json(rows)
        return
    for row in rows:
        thin = "  (thin: packs fetched on demand)" if row["thin"] else ""
        click.echo(f"{row['name']:<12} {row['url']}  user {row['user']}  device {row['device']}  last sync {row['last_sync'] or 'never'}{thin}")


@remote.command("remove")
@click.argument("name")
@global_options
def remote_remove(name: str) -> None:
    """Forget a remote on this device (its stored copy stays on the server)."""
    with open_repository(unlock=False) as repo:
        remotes = DeviceRemotes(repo.id)
        if remotes.thin is not None and remotes.thin.name == name:
            raise UsageError(f"this repository is thin and its packs live on {name}; run `stasisfs sync --pull {name}` first")
        remotes.remove(name)
    info(f"remote {name} removed")


@click.command()
@click.argument("names", nargs=-1)
@click.option("--pull", is_flag=True, help="Instead of uploading, download what the local copy lacks (completes a recovered, thin repository).")
@click.option("--limit-upload", type=click.IntRange(min=1), default=None, metavar="KiB/s", help="Cap the upload rate.")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON summary.")
@global_options
def sync(names: tuple[str, ...], pull: bool, limit_upload: int | None, json_output: bool) -> None:
    """Upload to each remote (or those NAMEd) exactly what it lacks.

    An interrupted sync resumes where it stopped. Exits 3 if any remote failed.
    Uploading needs no password: the objects are already encrypted and the
    device token (in ~/.config/stasisfs) authorises it.
    """
    from stasisfs.remote.sync import Syncer, sync_all

    counters = Counters()
    # Pushing needs neither the key nor the lock (see Syncer.push); pulling rebuilds the index, so it unlocks.
    with open_repository(unlock=pull) as repo:
        remotes = DeviceRemotes(repo.id)
        if not remotes.all():
            raise UsageError("no remotes yet: add one with `stasisfs remote add NAME URL --user USER`")
        with Reporter(counters, Reporter.choose(json_output, False), "pull" if pull else "sync"):
            if pull:
                for target in remotes.select(names):
                    fetched = Syncer(repo, remotes, counters).pull(target)
                    repo.sync_index()
                    if remotes.thin == target:
                        remotes.set_thin(None)
                    info(f"pulled {fetched} objects from {target.name}; the local copy is complete")
                return
            reports, failures = sync_all(repo, remotes, names, counters, limit_upload)
    if json_output:
        print_json({"synced": [r.__dict__ for r in reports], "failed": failures})
    else:
        report_sync(reports, failures)
    if failures:
        raise SystemExit(EXIT_INCOMPLETE)


@click.command()
@click.argument("url")
@click.option("--user", required=True, help="Your user name on the server.")
@click.option("--device", default=None, help="Which of your devices to recover (asked for when you have several).")
@click.option("--remote-name", default="origin", show_default=True, help="Name for this server in `remote list`.")
@click.option("--cacert", type=click.Path(exists=True, dir_okay=False), help="CA certificate to trust for an https URL.")
@click.option("--recovery-key", "use_recovery_key", is_flag=True,
              help="Open the device with its recovery key (read from standard input) instead of the escrowed copy; the password still logs in.")
@global_options
def recover(url: str, user: str, device: str | None, remote_name: str, cacert: str | None, use_recovery_key: bool) -> None:
    """Bring a lost device back from a server with its URL, your user name and your password.

    It creates a thin repository at --repo: keys, index and snapshots, with
    packs fetched on demand. `mount` and `restore` work at once; `sync --pull`
    downloads the rest; new backups carry on as that device.

    This machine takes the device over: the server retires every earlier copy
    of it at once, so if the lost machine turns up, its remote operations are
    refused (exit 1) and it can delete nothing here. Everything downloaded is
    authenticated with the device's key; objects that are not (junk, damage)
    are named and left out, and recover then exits 3.
    """
    from stasisfs.cli.common import read_recovery_key
    from stasisfs.remote import account

    target = repo_path()
    password = _password_only()
    master = read_recovery_key(None) if use_recovery_key else None
    done = account.recover(url, user, password, device, target, cacert, remote_name, info, master)
    repo = done.repo
    try:
        if done.taken_over:
            info(f"took over device {done.device}: any other copy of it is now retired on {remote_name} and may no longer read or write there")
        count = len(repo.snapshots())
        info(f"recovered {count} snapshot{'s' if count != 1 else ''}; packs stay on {remote_name} and are fetched when read")
        info(f"next: stasisfs --repo {repo.path} mount MOUNTPOINT   or   restore latest --target DIR   or   sync --pull")
    finally:
        repo.close()
    for problem in done.skipped:
        warn(f"skipped {problem}")
    if done.skipped:
        warn(f"{len(done.skipped)} object(s) on {remote_name} did not authenticate and were left out; everything else was recovered")
        raise SystemExit(EXIT_INCOMPLETE)


@click.group(invoke_without_command=True)
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@click.option("--web", is_flag=True, help="Print a one-time URL to your dashboard on each remote (asks for your password).")
@click.option("--remote", "remote_name", default=None, help="With --web: only this remote.")
@global_options
@click.pass_context
def devices(ctx: click.Context, json_output: bool, web: bool, remote_name: str | None) -> None:
    """List your devices on each remote, with their last upload times.

    \b
    With --web, log in with your password here (it never reaches the browser or the server)
    and print one-time URLs to the dashboard, one line per remote: open one in a browser
    within 10 minutes. It works once.
    """
    if ctx.invoked_subcommand is not None:
        return
    if web:
        _dashboard_links(remote_name)
        return
    rows = []
    with open_repository(unlock=False) as repo:
        if not DeviceRemotes(repo.id).all():
            raise UsageError("no remotes yet: add one with `stasisfs remote add NAME URL --user USER`")
        for target in DeviceRemotes(repo.id).all():
            for row in target.client().devices():
                rows.append({"remote": target.name, **row})
    if json_output:
        print_json(rows)
        return
    for row in rows:
        # A quiet device (past its alert threshold on the server) is STALE; servers before issue 22 send no state.
        marks = ("  (this device)" if row.get("this") else "") + ("  REVOKED" if row.get("revoked") else "") + (
            "  STALE: no upload within its alert threshold" if row.get("state") == "stale" else "")
        click.echo(f"{row['remote']:<10} {row['name']:<24} last upload {row.get('last_upload') or 'never'}  "
                   f"{human_size(int(row.get('bytes', 0)))}{marks}")


def _remotes_for_password(remote_name: str | None) -> list[Remote]:
    with open_repository(unlock=False) as repo:
        remotes = DeviceRemotes(repo.id).select([remote_name] if remote_name else [])
    if not remotes:
        raise UsageError("no remotes configured: add one with `stasisfs remote add NAME URL --user USER`")
    return remotes


def _dashboard_links(remote_name: str | None) -> None:
    from stasisfs.remote import account
    from stasisfs.remote.client import RemoteClient

    remotes = _remotes_for_password(remote_name)
    password = _password_only()
    for target in remotes:
        client = RemoteClient(target.url, cacert=target.cacert, name=target.name)
        account.open_account(client, target.user, password, info)
        info(f"{target.name}: one-time dashboard link for {target.user}, valid 10 minutes:")
        click.echo(client.web_login())


@devices.command("revoke")
@click.argument("name")
@click.option("--remote", "remote_name", default=None, help="Only on this remote (default: every remote).")
@global_options
def devices_revoke(name: str, remote_name: str | None) -> None:
    """Cut off a lost or stolen device at once. Needs your password; the device's backups stay recoverable."""
    remotes = _remotes_for_password(remote_name)
    from stasisfs.remote import account
    from stasisfs.remote.client import RemoteClient

    password = _password_only()
    for target in remotes:
        client = RemoteClient(target.url, cacert=target.cacert, name=target.name)
        account.open_account(client, target.user, password, info)
        client.revoke_device(name)
        info(f"device {name} revoked on {target.name}")
