"""The `stasisfs-server` command: serve, and administer users and devices (also while serving)."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from .db import connect, default_db_url
from .durations import parse_duration
from .service import KEEP, Refused, Service
from .stores import open_stores
from .stores.file import FileStore

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
GROUP_OPTIONS = (
    ("--data", "data", "Server data directory [env: STASISFS_SERVER_DATA; default ./stasis-data].", False),
    ("--db", "db", "SQLAlchemy database URL, e.g. postgresql://user@host/db [default: SQLite inside --data].", False),
    ("--store", "store", "Object store URL: file:///PATH or s3://BUCKET/PREFIX [default: file://<data>/objects]. "
                         "Repeat it to keep replicas: every object is written to each.", True),
)


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> None:
    if value is not None and value != () and param.name is not None:
        settings = ctx.find_root().meta.setdefault("server.settings", {})
        settings[param.name] = (*settings.get(param.name, ()), *value) if isinstance(value, tuple) else value


def group_options(fn: F) -> F:
    """Accepted before or after the subcommand, like the client's global options."""
    for flag, name, help_text, multiple in reversed(GROUP_OPTIONS):
        fn = click.option(flag, name, default=None, expose_value=False, callback=_remember, help=help_text, multiple=multiple)(fn)
    return fn


def open_service() -> Service:
    settings = click.get_current_context().find_root().meta.get("server.settings", {})
    data = _data_dir()
    # Everything the server writes is its own: files 0600, directories 0700, whatever the caller's umask.
    os.umask(0o077)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    data.chmod(0o700)  # also when it existed before, made by hand or by an older release
    try:
        engine = connect(settings.get("db") or default_db_url(data))
        store = open_stores(list(settings.get("store") or ()) or [f"file://{data / 'objects'}"], data)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for path in data.glob("stasis.db*"):  # SQLite's database, WAL and shared-memory files
        path.chmod(0o600)
    return Service(engine, store)


@click.group(context_settings=CONTEXT)
@group_options
def cli() -> None:
    """stasisfs-server: stores encrypted objects for stasisfs devices; it never sees a key.

    \b
    Start here:
      stasisfs-server --data /srv/stasis user add alice     # last line: alice's enrolment code
      stasisfs-server --data /srv/stasis serve --listen 0.0.0.0:8443 --tls-cert C --tls-key K
    On alice's device:
      stasisfs remote add home https://backup.example:8443 --user alice --enrol-code CODE
    """


@cli.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to listen on; port 0 picks a free one.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain: serve HTTPS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key for --tls-cert.")
@click.option("--max-object-size", default=128 * 1024 * 1024, show_default=True, help="Largest accepted object upload, in bytes.")
@click.option("--alert-after", default=None, metavar="DURATION",
              help="Report a device quiet after this long without an upload (90s, 30m, 2h, 3d, 1w). Users and devices may set their own.")
@click.option("--notify", multiple=True, metavar="URL",
              help="Where alerts go: an apprise URL (json://host/path, mailto://..., ntfy://topic, gotify://..., matrix://...). Repeatable.")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT", help="Serve Prometheus metrics at http://HOST:PORT/metrics.")
@group_options
def serve(listen: str, tls_cert: str | None, tls_key: str | None, max_object_size: int, alert_after: str | None,
          notify: tuple[str, ...], metrics_listen: str | None) -> None:
    """Serve the HTTP API and the dashboard (/ui/) until SIGINT or SIGTERM.

    Prints `listening on http(s)://HOST:PORT` once it accepts requests.

    \b
    Alerts: with --notify, a device that has not uploaded for its threshold (--alert-after, or
    the user's or device's own) gets one message, and one more when it uploads again. Several
    instances on one database send each message once.
    """
    import hypercorn.trio.tcp_server
    import trio
    from hypercorn.trio import serve as hypercorn_serve

    from .app import create_app
    from .metrics import Metrics

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    service = open_service()
    service.default_alert_after = _duration(alert_after, "--alert-after") if alert_after else None
    send = None
    if notify:
        from .alerts import apprise_sender

        try:
            send = apprise_sender(notify)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    elif alert_after:
        click.echo("serve: --alert-after without --notify: quiet devices show as stale in the dashboard, and no message is sent", err=True)
    for store in getattr(service.store, "replicas", [service.store]):
        if isinstance(store, FileStore):
            store.sweep_temp_files()
    metrics = Metrics(service)
    app = create_app(service, max_object_size, metrics)
    # Hypercorn reads 64 KiB per receive; packs are ~16 MiB, and each receive costs a trip through h11
    # and the ASGI queue. Bigger reads cut the server's CPU per uploaded byte by a third.
    hypercorn.trio.tcp_server.MAX_RECV = 1 << 20  # type: ignore[attr-defined]
    config = _hypercorn_config(listen, tls_cert, tls_key)
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024

    async def run() -> None:
        stop = trio.Event()

        async def shutdown_trigger() -> None:
            await stop.wait()

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        async def check_alerts() -> None:
            from .alerts import check_interval, run_check

            assert send is not None
            last_check = -math.inf
            while not stop.is_set():
                try:
                    # Re-read often: a threshold set in the dashboard shortens the interval within 10 s.
                    interval = (await trio.to_thread.run_sync(check_interval, service)).total_seconds()
                    if trio.current_time() - last_check >= interval:
                        last_check = trio.current_time()
                        await trio.to_thread.run_sync(run_check, service, send)
                except Exception as exc:  # a database hiccup must not stop the server; the next round tries again
                    click.echo(f"serve: alert check failed: {exc}", err=True)
                    interval = 30
                with trio.move_on_after(min(interval, 10)):
                    await stop.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            binds = await nursery.start(functools.partial(hypercorn_serve, app, config, shutdown_trigger=shutdown_trigger))  # type: ignore[arg-type]
            if metrics_listen:
                metrics_binds = await nursery.start(functools.partial(
                    hypercorn_serve, metrics.asgi_app(), _hypercorn_config(metrics_listen, None, None),  # type: ignore[arg-type]
                    shutdown_trigger=shutdown_trigger))
                for bind in metrics_binds:
                    click.echo(f"metrics on {bind}/metrics", err=True)
            if send is not None:
                nursery.start_soon(check_alerts)
            for bind in binds:
                click.echo(f"listening on {bind}", nl=True)
            _remember_url(binds[0] if binds else "")
            sys.stdout.flush()
            await stop.wait()

    trio.run(run)


def _hypercorn_config(listen: str, tls_cert: str | None, tls_key: str | None) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [listen]
    config.certfile, config.keyfile = tls_cert, tls_key
    config.accesslog = None
    config.errorlog = "-"
    return config


def _data_dir() -> Path:
    settings = click.get_current_context().find_root().meta.get("server.settings", {})
    return Path(settings.get("data") or os.environ.get("STASISFS_SERVER_DATA") or "stasis-data").absolute()


def _remember_url(url: str) -> None:
    """Where this server last listened: `web-login` builds its link on it unless told another base URL."""
    if url:
        (_data_dir() / "last-url").write_text(url + "\n")


def _duration(text: str, option: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _alert_setting(text: str | None) -> Any:
    """--alert-after of `user set` and `device set`: DURATION, `never`, or `default` (follow the next level up)."""
    if text is None:
        return KEEP
    if text == "default":
        return None
    if text in ("never", "0"):
        return 0
    return int(_duration(text, "--alert-after").total_seconds())


@cli.command("web-login")
@click.option("--user", "user_name", default=None, metavar="NAME", help="Open NAME's view instead of the operator's.")
@click.option("--expires", default="10m", show_default=True, help="How long the link stays valid (at most 1d); it works once.")
@click.option("--base-url", default=None, metavar="URL",
              help="The server's address as browsers reach it [env: STASISFS_SERVER_URL; default: where `serve` last listened].")
@group_options
def web_login(user_name: str | None, expires: str, base_url: str | None) -> None:
    """Print a one-time login URL for the dashboard (last line): the operator's view, or a user's.

    Anyone holding the URL can open the session until it is used or expires: pass it on as you
    would a password.
    """
    lifetime = _duration(expires, "--expires")
    service = open_service()
    from .webaccess import WebAccess

    link = _admin(lambda: WebAccess(service.engine, service.secret).issue_link(user_name, lifetime))
    remembered = _data_dir() / "last-url"
    base = base_url or os.environ.get("STASISFS_SERVER_URL") or (remembered.read_text().strip() if remembered.exists() else "http://127.0.0.1:8080")
    click.echo(f"one-time login to {'the operator view' if user_name is None else user_name + chr(39) + 's view'}, valid {expires}:", err=True)
    click.echo(f"{base.rstrip('/')}/ui/login?t={link}")


@cli.group()
def user() -> None:
    """Manage user accounts."""


def _admin(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Refused as exc:
        raise click.ClickException(exc.reason) from None


@user.command("add")
@click.argument("name")
@click.option("--append-only", is_flag=True, help="Refuse deletes from this account.")
@click.option("--quota", type=int, default=None, help="Storage quota in bytes.")
@group_options
def user_add(name: str, append_only: bool, quota: int | None) -> None:
    """Create a user. The last line printed is their one-time enrolment code (valid 24 h)."""
    code = _admin(lambda: open_service().add_user(name, append_only, quota))
    click.echo(f"user {name} created; give them this enrolment code for their first device (valid 24 h):", err=True)
    click.echo(code)


@user.command("reissue")
@click.argument("name")
@group_options
def user_reissue(name: str) -> None:
    """Replace the user's unused enrolment codes with a new one (last line)."""
    click.echo(_admin(lambda: open_service().reissue(name)))


@user.command("set")
@click.argument("name")
@click.option("--append-only/--no-append-only", default=None, help="Refuse (or allow) deletes.")
@click.option("--quota", type=int, default=None, help="Storage quota in bytes; 0 removes the quota.")
@click.option("--alert-after", default=None, metavar="DURATION",
              help="Report the user's devices quiet after this long (2d), `never`, or `default` (the server's --alert-after).")
@group_options
def user_set(name: str, append_only: bool | None, quota: int | None, alert_after: str | None) -> None:
    """Change an existing user."""
    setting = _alert_setting(alert_after)
    _admin(lambda: open_service().set_user(name, append_only=append_only, quota=quota or None, clear_quota=quota == 0, alert_after=setting))


@user.command("enable")
@click.argument("name")
@group_options
def user_enable(name: str) -> None:
    """Enable a disabled user again: their devices' tokens work again (password sessions must log in anew)."""
    _admin(lambda: open_service().set_user(name, disabled=False))


@user.command("disable")
@click.argument("name")
@group_options
def user_disable(name: str) -> None:
    """Disable a user: every token stops working at once; data is kept. `user enable` undoes it."""
    _admin(lambda: open_service().set_user(name, disabled=True))


@user.command("maintenance-token")
@click.argument("name")
@click.option("--expires", default="1h", show_default=True, help="Lifetime: minutes (30m), hours (2h) or days (1d).")
@group_options
def user_maintenance_token(name: str, expires: str) -> None:
    """A short-lived token that may delete from NAME's (append-only) account. Last line printed.

    Give it to `stasisfs prune --maintenance-token-file F` on a trusted host.
    """
    import re
    from datetime import timedelta

    match = re.fullmatch(r"(\d+)([mhd])", expires.strip())
    if not match:
        raise click.UsageError("--expires takes a number and m, h or d, like 1h")
    lifetime = timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[match[2]]: int(match[1])})
    token = _admin(lambda: open_service().maintenance_token(name, lifetime))
    click.echo(f"maintenance token for {name}, valid {expires}; keep it secret:", err=True)
    click.echo(token)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@group_options
def user_list(as_json: bool) -> None:
    """List users with their usage."""
    rows = _admin(lambda: open_service().users())
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        flags = ",".join(f for f in ("disabled" * row["disabled"], "append-only" * row["append_only"], "not-enrolled" * (not row["enrolled"])) if f)
        quota = f"/{row['quota']}" if row["quota"] else ""
        click.echo(f"{row['name']:<20} {row['devices']:>3} devices  {row['used']}{quota} bytes  {flags}")


@cli.group()
def device() -> None:
    """Manage users' devices."""


@device.command("list")
@click.argument("user_name", metavar="[USER]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@group_options
def device_list(user_name: str | None, as_json: bool) -> None:
    """List a user's devices, or every user's."""
    service = open_service()
    names = [user_name] if user_name else [u["name"] for u in _admin(service.users)]
    rows = [{"user": name, **row} for name in names for row in _admin(functools.partial(service.devices, user_name=name))]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        when = row["last_upload"] or "never"
        revoked = "  REVOKED" if row["revoked"] else ""
        click.echo(f"{row['user']:<16} {row['name']:<24} last upload {when}  {row['objects']} objects  {row['bytes']} bytes{revoked}")


@device.command("revoke")
@click.argument("user_name", metavar="USER")
@click.argument("device_name", metavar="DEVICE")
@group_options
def device_revoke(user_name: str, device_name: str) -> None:
    """Revoke a device: its tokens stop working at once."""
    _admin(lambda: open_service().revoke_device(None, device_name, user_name=user_name))
    click.echo(f"device {device_name} of {user_name} revoked at {datetime.now(UTC).isoformat(timespec='seconds')}")


@device.command("set")
@click.argument("user_name", metavar="USER")
@click.argument("device_name", metavar="DEVICE")
@click.option("--alert-after", required=True, metavar="DURATION",
              help="Report this device quiet after this long (6h), `never`, or `default` (its user's threshold).")
@group_options
def device_set(user_name: str, device_name: str, alert_after: str) -> None:
    """Set a device's own quiet-alert threshold."""
    setting = _alert_setting(alert_after)
    _admin(lambda: open_service().set_device_alert_after(user_name, device_name, setting))


@cli.command()
@group_options
def scrub() -> None:
    """Verify every stored object's SHA-256 against its id (no keys needed).

    Damaged or missing objects are reported and quarantined: moved aside and
    dropped from the catalog, so each device's next `stasisfs sync` or
    `stasisfs repair --remote` uploads a good copy. Exits 1 if anything was found.
    """
    counts = open_service().scrub(lambda line: click.echo(line))
    click.echo(f"scrub: {counts['checked']} objects checked, {counts['damaged']} damaged, {counts['missing']} missing, "
               f"{counts['recopied']} replicas re-copied")
    if counts["damaged"] or counts["missing"]:
        sys.exit(1)


def main() -> None:
    cli.main(prog_name="stasisfs-server")
