"""Redundancy that heals: damage found by check and scrub, repaired from the other copy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli
from server_fixture import Server

pytestmark = pytest.mark.timeout(300)


def setup(cli: Cli, server: Server) -> Path:
    cli.ok("init", "--device", "laptop")
    cli.add_remote(server)
    src = cli.tmp / "src"
    src.mkdir()
    for n in range(3):
        (src / f"file{n}").write_bytes(os.urandom(2_500_000))
    cli.backup(src)
    return src


def flip(path: Path, at: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def local_packs(cli: Cli) -> list[Path]:
    return sorted(p for p in (cli.repo / "data").rglob("*") if p.is_file())


def data_pack(cli: Cli) -> Path:
    """The largest pack: file data from its first byte on (a run's second pack may hold a tree and padding only)."""
    return max(local_packs(cli), key=lambda p: p.stat().st_size)


def server_packs(server: Server) -> list[Path]:
    return sorted(p for p in (server.data / "objects").rglob("*") if p.is_file() and "data" in p.parts)


def test_bit_rot_in_a_local_pack_is_healed_from_the_server(cli: Cli, server: Server) -> None:
    src = setup(cli, server)
    victim = data_pack(cli)
    flip(victim)
    found = cli.run("check", "--read-data")
    assert found.returncode == 1 and victim.name.encode() in found.stderr
    assert b"affected: " in found.stderr and b"stasisfs repair" in found.stderr  # which files of which snapshots
    healed = cli.ok("repair")
    assert b"healed from home" in healed.stderr
    cli.ok("check", "--read-data")
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    for p in src.iterdir():
        assert (cli.tmp / "out" / str(src).lstrip("/") / p.name).read_bytes() == p.read_bytes()


def test_bit_rot_on_the_server_is_healed_from_the_local_copy(cli: Cli, server: Server) -> None:
    setup(cli, server)
    damaged = server_packs(server)[0]
    flip(damaged)
    cli.ok("check", "--remote", "home")  # structure alone cannot see it
    found = cli.run("check", "--remote", "home", "--read-data")
    assert found.returncode == 1 and damaged.name.encode() in found.stderr
    # The hint is run exactly as printed, as a user would.
    hint = re.search(rb"`stasisfs ([^`]+)` heals (?:it|them)", found.stderr + found.stdout)
    assert hint is not None, found.stderr
    cli.ok(*hint[1].decode().split())
    cli.ok("check", "--remote", "home", "--read-data")


def test_server_scrub_finds_damage_without_keys_and_sync_heals_it(cli: Cli, server: Server) -> None:
    setup(cli, server)
    assert server.admin("scrub").returncode == 0
    damaged = server_packs(server)[1]
    flip(damaged)
    scrub = server.admin("scrub")
    assert scrub.returncode == 1 and "damaged: " in scrub.stdout and damaged.name in scrub.stdout
    assert not damaged.exists()  # quarantined
    missing = cli.run("check", "--remote", "home")
    assert missing.returncode == 1 and f"pack {damaged.name} is missing from remote home".encode() in missing.stderr
    cli.ok("sync")  # the remote now lacks it, so sync uploads a good copy
    assert server.admin("scrub").returncode == 0
    cli.ok("check", "--remote", "home", "--read-data")


def test_damage_with_no_good_copy_names_the_lost_files(cli: Cli, server: Server) -> None:
    src = setup(cli, server)
    victim = data_pack(cli)
    flip(victim)
    next(p for p in server_packs(server) if p.name == victim.name).unlink()
    done = cli.run("repair")
    assert done.returncode == 1
    lost = [line.split(":", 2)[2].removesuffix(" (a whole directory)") for line in done.stdout.decode().splitlines() if line.startswith("lost: ")]
    assert lost and all(str(src).startswith(path) or path.startswith(str(src)) for path in lost)
    assert b"could not be healed" in done.stderr


def test_scrub_cli_runs_without_a_server(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "stasisfs_server", "--data", str(tmp_path / "d"), "scrub"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, timeout=60)
    assert done.returncode == 0 and "0 objects checked" in done.stdout


def test_repair_snapshots_keeps_what_is_left(cli: Cli, server: Server) -> None:
    src = setup(cli, server)
    victim = data_pack(cli)
    flip(victim)
    next(p for p in server_packs(server) if p.name == victim.name).unlink()
    assert cli.run("repair").returncode == 1
    done = cli.ok("repair", "snapshots", "--forget")
    assert b"repaired as" in done.stderr
    [snapshot] = cli.snapshots()
    assert "repaired" in snapshot["tags"]  # type: ignore[operator]
    cli.ok("check", "--read-data")
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out)
    for p in (out / str(src).lstrip("/")).rglob("*") if (out / str(src).lstrip("/")).exists() else []:
        if p.is_file():
            assert p.read_bytes() == (src / p.name).read_bytes()  # what is left is exact
    # the next backup stores the lost data again, and everything is whole
    cli.backup(src)
    cli.ok("check", "--read-data")
    whole = cli.tmp / "whole"
    cli.ok("restore", "latest", "--target", whole)
    for p in src.iterdir():
        assert (whole / str(src).lstrip("/") / p.name).read_bytes() == p.read_bytes()
