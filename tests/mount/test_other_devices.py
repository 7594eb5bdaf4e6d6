"""A mount shows the user's other devices under devices/, read lazily from the server."""

from __future__ import annotations

import os

import pytest
from conftest import Cli
from server_fixture import Server

from .conftest import Mounted

pytestmark = pytest.mark.timeout(300)


def test_other_devices_appear_under_devices(cli: Cli, server: Server) -> None:
    code = server.add_user("alice")
    laptop = Cli(cli.env | {"STASISFS_REPO": str(cli.tmp / "laptop-repo"), "XDG_CACHE_HOME": str(cli.tmp / "laptop-cache")},
                 cli.tmp / "laptop-repo", cli.tmp)
    laptop.ok("init", "--device", "laptop")
    laptop.ok("remote", "add", "home", server.url, "--user", "alice", "--enrol-code", code)
    laptop_src = cli.tmp / "laptop-files"
    laptop_src.mkdir()
    (laptop_src / "thesis.txt").write_bytes(b"chapter one\n" * 1000)
    (laptop_src / "big.bin").write_bytes(os.urandom(6_000_000))
    laptop.backup(laptop_src)

    cli.ok("init", "--device", "desktop")  # another device of alice, on this machine
    cli.ok("remote", "add", "home", server.url, "--user", "alice")
    desk_src = cli.tmp / "desk-files"
    desk_src.mkdir()
    (desk_src / "photo.raw").write_bytes(b"pixels" * 100)
    cli.backup(desk_src)

    mounted = Mounted(cli, cli.tmp / "mnt")
    try:
        mounted.start()
        root = mounted.path
        assert sorted(os.listdir(root / "devices")) == ["desktop", "laptop"]
        # this device's snapshots stay where they were; the laptop's are only under devices/
        assert len([n for n in os.listdir(root / "snapshots") if n != "latest"]) == 1
        assert (root / "snapshots" / "latest" / str(desk_src).lstrip("/") / "photo.raw").read_bytes() == b"pixels" * 100
        other = root / "devices" / "laptop" / "latest" / str(laptop_src).lstrip("/")
        assert os.path.islink(root / "devices" / "laptop" / "latest")
        assert sorted(os.listdir(other)) == ["big.bin", "thesis.txt"]
        assert (other / "thesis.txt").read_bytes() == (laptop_src / "thesis.txt").read_bytes()
        assert (other / "big.bin").read_bytes() == (laptop_src / "big.bin").read_bytes()
        assert os.path.islink(root / "devices" / "desktop" / "latest")
    finally:
        mounted.stop()
    # the laptop's data was fetched into this device's cache, encrypted, never into its repository
    laptop_packs = {p.name for p in (cli.tmp / "laptop-repo" / "data").rglob("*") if p.is_file()}
    assert not laptop_packs & {p.name for p in (cli.repo / "data").rglob("*") if p.is_file()}
