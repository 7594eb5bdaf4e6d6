"""Small changes stay small: one pack per small run, padded to 64 KiB unless it holds a content-defined
cut; prune merges the small packs, counts their padding and loses nothing."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from conftest import Cli

from stasisfs.format.chunker import CHUNK_MIN
from stasisfs.format.crypto import padme

WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"lorem", b"ipsum", b"orbit", b"gravel"]


def home(cli: Cli, files: int = 300) -> list[Path]:
    rng = random.Random(5)
    made = []
    for n in range(files):
        path = cli.tmp / "home" / f"dir{n % 15:02d}" / f"note{n:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\n".join(b" ".join(rng.choices(WORDS, k=10)) for _ in range(rng.randrange(1, 60))))
        made.append(path)
    return made


def pack_sizes(cli: Cli) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cli.repo.glob("data/*/*") if p.is_file()}


def stored(cli: Cli) -> int:
    return sum(p.stat().st_size for p in cli.repo.rglob("*") if p.is_file() and p.parent.name != "locks")


def test_a_one_line_edit_writes_one_pack_at_the_small_floor(cli: Cli) -> None:
    cli.init()
    files = home(cli)
    cli.backup(cli.tmp / "home")
    before = pack_sizes(cli)
    with open(files[7], "ab") as f:
        f.write(b"\none more line")
    cli.backup(cli.tmp / "home")
    new = {name: size for name, size in pack_sizes(cli).items() if name not in before}
    assert list(new.values()) == [64 * 1024]  # one pack (not two), padded to the small floor


def test_a_change_inside_a_large_file_keeps_the_1_mib_floor(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(CHUNK_MIN * 3))
    cli.backup(src)
    before = pack_sizes(cli)
    with open(src / "big.bin", "r+b") as f:
        f.seek(CHUNK_MIN * 2 + 100)
        f.write(b"changed")
    cli.backup(src)
    new = [size for name, size in pack_sizes(cli).items() if name not in before]
    assert len(new) == 1 and new[0] >= 1 << 20 and new[0] == padme(new[0])


def test_prune_merges_small_packs_and_every_snapshot_still_restores(cli: Cli) -> None:
    cli.init()
    files = home(cli)
    cli.backup(cli.tmp / "home")
    first = stored(cli)
    rng = random.Random(9)
    for hour in range(24):
        with open(rng.choice(files), "ab") as f:
            f.write(b"\nedit %d" % hour)
        cli.backup(cli.tmp / "home")
    grown = (stored(cli) - first) / 24
    assert grown <= 256 * 1024, f"{grown / 1024:.0f} KiB a snapshot before prune"
    packs_before = len(pack_sizes(cli))

    plan = json.loads(cli.ok("prune", "--dry-run", "--json").stdout)
    assert plan["packs_consolidated"] == packs_before and plan["padding_bytes"] > 0 and plan["unused_bytes"] == 0
    summary = json.loads(cli.ok("prune", "--json").stdout)
    assert summary["bytes_freed"] > 0
    assert len(pack_sizes(cli)) <= 2
    assert (stored(cli) - first) / 24 <= 64 * 1024
    again = json.loads(cli.ok("prune", "--dry-run", "--json").stdout)
    assert again["packs_repacked"] == 0  # merged packs are not merged again: prune reaches a fixed point

    cli.ok("check", "--read-data")
    snapshots = cli.snapshots()
    assert len(snapshots) == 25
    for files_at in (snapshots[0], snapshots[-1]):
        target = cli.tmp / f"out-{files_at['short_id']}"
        cli.ok("restore", str(files_at["id"]), "--target", target)
        restored = sorted(p.relative_to(target).as_posix() for p in target.rglob("*.txt"))
        assert len(restored) == len(files)
    latest = cli.tmp / f"out-{snapshots[-1]['short_id']}"
    for path in files:
        assert (latest / path.relative_to("/")).read_bytes() == path.read_bytes()


def test_prune_leaves_a_single_small_pack_alone(cli: Cli) -> None:
    cli.init()
    home(cli, files=20)
    cli.backup(cli.tmp / "home")
    plan = json.loads(cli.ok("prune", "--dry-run", "--json").stdout)
    assert plan["packs_consolidated"] == 0 and plan["packs_repacked"] == 0
