"""Damage and privacy: corrupt packs, damaged local index, and nothing readable in the repository or cache."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Cli

MARKER_NAME = "zebra-unicorn-filename"
MARKER_CONTENT = b"plaintext-marker-" * 4000


def backed_up(cli: Cli) -> Path:
    cli.init()
    src = cli.tmp / "src"
    (src / "dir-of-secrets").mkdir(parents=True)
    (src / "dir-of-secrets" / MARKER_NAME).write_bytes(MARKER_CONTENT)
    (src / "random.bin").write_bytes(os.urandom(1_500_000))
    cli.backup(src)
    return src


def packs(cli: Cli) -> list[Path]:
    return sorted(p for p in cli.repo.glob("data/*/*") if p.is_file())


def test_corrupt_pack_is_named_by_check_and_never_restored_silently(cli: Cli) -> None:
    src = backed_up(cli)
    for pack in packs(cli):
        data = bytearray(pack.read_bytes())
        data[100] ^= 0x55  # inside the first blob of every pack
        pack.write_bytes(bytes(data))
    done = cli.run("check", "--read-data")
    assert done.returncode == 1
    for pack in packs(cli):
        assert pack.name.encode() in done.stderr
    out = cli.tmp / "out"
    restore = cli.run("restore", "latest", "--target", out)
    assert restore.returncode == 1 and b"Traceback" not in restore.stderr
    for path in out.rglob("*"):
        if path.is_file():  # whatever was restored is exactly right
            original = src / path.relative_to(out / str(src).lstrip("/"))
            assert path.read_bytes() == original.read_bytes()


def test_read_data_subset(cli: Cli) -> None:
    backed_up(cli)
    done = cli.ok("check", "--read-data-subset", "50%")
    assert b"packs read" in done.stderr
    assert cli.run("check", "--read-data-subset", "7").returncode == 2


def test_missing_pack_reported(cli: Cli) -> None:
    backed_up(cli)
    victim = packs(cli)[0]
    victim.unlink()
    done = cli.run("check")
    assert done.returncode == 1 and victim.name.encode() in done.stderr


def index_file(cli: Cli) -> Path:
    [path] = (cli.tmp / "cache" / "stasisfs").glob("*/index/data.mdb")
    return path


def test_truncated_index_detected_and_rebuilt(cli: Cli) -> None:
    src = backed_up(cli)
    path = index_file(cli)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    done = cli.ok("snapshots")
    assert b"truncated" in done.stderr and b"rebuilt from the repository" in done.stderr and b"Traceback" not in done.stderr
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    checked = cli.ok("check")  # only a cache: named, rebuilt, and the repository checks clean
    assert b"truncated" in checked.stderr and b"Traceback" not in checked.stderr
    cli.ok("check", "--read-data")
    assert cli.ok("dump", f"latest:{src}/dir-of-secrets/{MARKER_NAME}").stdout == MARKER_CONTENT


def test_deleted_index_rebuilt_transparently(cli: Cli) -> None:
    src = backed_up(cli)
    index_file(cli).unlink()
    assert cli.ok("dump", f"latest:{src}/dir-of-secrets/{MARKER_NAME}").stdout == MARKER_CONTENT


def test_index_rebuilt_from_pack_headers_when_index_objects_are_lost(cli: Cli) -> None:
    src = backed_up(cli)
    for obj in (cli.repo / "index").iterdir():
        obj.write_bytes(b"garbage")
    cli.ok("repair", "index")
    cli.ok("check", "--read-data")
    assert cli.ok("dump", f"latest:{src}/dir-of-secrets/{MARKER_NAME}").stdout == MARKER_CONTENT


def test_nothing_readable_in_repository_or_cache(cli: Cli) -> None:
    src = backed_up(cli)
    needles = [MARKER_NAME.encode(), b"dir-of-secrets", MARKER_CONTENT[:40], os.fsencode(src), b"testbox"]
    for root in (cli.repo, cli.tmp / "cache"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for needle in needles:
                    assert needle not in data, f"{needle!r} readable in {path}"


def test_every_pack_is_padded(cli: Cli) -> None:
    backed_up(cli)  # random.bin is cut by the chunker: its pack keeps the 1 MiB floor
    from stasisfs.format.crypto import padme

    sizes = [pack.stat().st_size for pack in packs(cli)]
    assert sizes and all(size == padme(size) for size in sizes)
    assert max(sizes) >= 1 << 20


def test_index_objects_are_padded_so_a_small_change_does_not_show_its_chunk_count(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "base").write_bytes(os.urandom(100_000))
    cli.backup(src)
    sizes = []
    for count in (1, 40):
        before = set((cli.repo / "index").iterdir())
        for n in range(count):
            (src / f"new-{count}-{n}").write_bytes(os.urandom(3000))
        cli.backup(src)
        new = set((cli.repo / "index").iterdir()) - before
        sizes.append(sorted(p.stat().st_size for p in new))
    assert sizes[0] == sizes[1], f"one new chunk and forty new chunks gave index objects of {sizes[0]} and {sizes[1]} bytes"
