"""The full-loss drill: back up and sync, lose the device, recover with URL + user + password, mount lazily, restore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Cli
from server_fixture import Server
from test_fidelity import build_hostile_tree, describe

from .conftest import Mounted

pytestmark = pytest.mark.timeout(300)


def test_full_loss_drill(cli: Cli, server: Server, mounted: Mounted) -> None:
    cli.ok("init", "--device", "laptop")
    cli.add_remote(server)
    src = cli.tmp / "src"
    build_hostile_tree(src)
    (src / "bulk").write_bytes(os.urandom(12_000_000))
    before = describe(os.fsencode(src))
    cli.backup(src)

    # the laptop is gone: repository, cache and configuration
    cli.wipe_device()
    cli.ok("recover", server.url, "--user", "alice")
    stored = sum(p.stat().st_size for p in (server.data / "objects").rglob("*") if p.is_file())
    local = sum(p.stat().st_size for p in cli.repo.rglob("*") if p.is_file())
    assert local < stored / 20, (local, stored)

    # browse at once: packs are fetched lazily as files are read
    mounted.start()
    view = os.fsencode(mounted.latest()) + os.fsencode(src)
    fetched_before_reading = _cached_pack_bytes(cli.tmp / "cache")
    assert sorted(os.listdir(view)) == sorted(os.listdir(os.fsencode(src)))
    assert fetched_before_reading < stored / 2
    assert describe(view) == before
    mounted.stop()

    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out, "--sparse")
    assert describe(os.fsencode(out) + os.fsencode(src)) == before


def _cached_pack_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "packs" in p.parts)
