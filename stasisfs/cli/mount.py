"""`stasisfs mount` and `stasisfs umount`."""

from __future__ import annotations

from pathlib import Path

import click

from stasisfs.cli.common import global_options, info, open_repository, read_password, setting, warn
from stasisfs.errors import StasisError, UsageError
from stasisfs.repo.repository import Repository

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1] if value and value[-1] in SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise UsageError(f"--cache-size {text!r}: expected a size like 256M or 1G") from None
    return int(number * SIZE_UNITS[unit])


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="Stay attached; unmount with Ctrl-C.")
@click.option("--cache-size", default="32M", show_default=True,
              help="Memory for decrypted chunks (small files that tar or cp -r open next go straight to the page cache).")
@click.option("--no-other-devices", is_flag=True, help="Do not show your other devices from the remotes under devices/.")
@global_options
def mount(mountpoint: Path, foreground: bool, cache_size: str, no_other_devices: bool) -> None:
    """Browse every snapshot as a read-only filesystem at MOUNTPOINT.

    \b
    MOUNTPOINT/snapshots/<time>/...      each snapshot, and snapshots/latest
    MOUNTPOINT/devices/<device>/<time>   per device, with its own latest; with remotes,
                                         your other devices too (read lazily from the server)
    MOUNTPOINT/ids/<short id>            by snapshot id
    MOUNTPOINT/tags/<tag>/<time>         by tag
    MOUNTPOINT/versions/<path>/<time>    every distinct version of a file

    Returns once the filesystem is serving. Unmount with `stasisfs umount MOUNTPOINT`.
    """
    from stasisfs.mount import lifecycle

    cache_bytes = parse_size(cache_size)
    mountpoint = mountpoint.absolute()
    cleared = lifecycle.check_mountpoint(mountpoint)
    if cleared:
        info(cleared)
    with open_repository() as repo:
        others = [] if no_other_devices else _other_devices(repo)
        if foreground:
            lifecycle.log_to_stderr()
            lifecycle.serve(repo, mountpoint, cache_bytes, lambda: info(f"serving {mountpoint}; Ctrl-C to unmount"), others)
        else:
            lifecycle.mount_detached(repo, mountpoint, cache_bytes, others)
            info(f"mounted at {mountpoint}; unmount with: stasisfs umount {mountpoint}")


def _other_devices(repo: Repository) -> list[Repository]:
    """Other devices of the user whose escrowed keys open with the password; none without remotes or a password."""
    from stasisfs.remote.devices import DeviceRemotes

    if not DeviceRemotes(repo.id).all() or setting("key_file", "STASISFS_KEY_FILE"):
        return []
    from stasisfs.remote.account import open_other_devices

    try:
        return open_other_devices(repo, read_password(), info)
    except StasisError as exc:
        warn(f"your other devices are not shown: {exc}")
        return []


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lazy", is_flag=True, help="Detach even while processes use it; it goes once they let go.")
@global_options
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount a stasisfs mount, or clear one left behind by a killed process.

    A mount in use (a shell inside it, an open file) stays mounted and this
    exits 1 naming who uses it; --lazy detaches it anyway.
    """
    from stasisfs.mount import lifecycle

    info(f"{lifecycle.umount(mountpoint.absolute(), lazy)}: {mountpoint}")
