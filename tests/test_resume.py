"""A killed backup's successor salvages the open packs the killed run left."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

from conftest import Cli

from stasisfs.repo.index import Index
from stasisfs.system.crashpoints import CRASH_ENV, TUNING_ENV

FILES = 70  # 40 files after the 30th record: more than the 32 MiB between two checkpoints, so one always comes


def compressible_tree(root: Path, files: int) -> None:
    """Unique but compressible 1 MB files: 32 MiB of them (a checkpoint) still fit in the open packs."""
    root.mkdir()
    for i in range(files):
        (root / f"doc{i:03}.txt").write_bytes(b"".join(b"file %d line %d of a compressible document\n" % (i, j) for j in range(22_000)))


def crash_after_30_files(cli: Cli, src: Path) -> None:
    """Killed at the first checkpoint that has recorded 30 files; compressed, all of them still fit in the open packs."""
    killed = cli.run("backup", src, env={**cli.env, CRASH_ENV: "backup-checkpointed@30"})
    assert killed.returncode == -9, killed.stderr


def check_and_restore(cli: Cli, src: Path) -> None:
    """The repository checks clean and its latest snapshot restores to exactly `src`."""
    cli.ok("check", "--read-data")
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out, "--verify")
    for path in src.iterdir():
        assert (out / str(src).lstrip("/") / path.name).read_bytes() == path.read_bytes()


def open_packs_left(cli: Cli) -> list[Path]:
    return sorted(cli.repo.glob("data/.tmp-pack-*"))


def test_open_packs_of_a_killed_run_are_salvaged(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    compressible_tree(src, FILES)
    crash_after_30_files(cli, src)
    assert open_packs_left(cli), "the killed run should have left open packs behind"
    assert sorted(cli.repo.glob("data/.tmp-journal-*")), "with journals listing their blobs"
    assert not list(cli.repo.glob("data/*/*")), "no pack was complete yet"
    doc = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert doc["files_unmodified"] >= 30, doc  # recorded before the kill, content salvaged from the open packs
    assert doc["files_changed"] == 0, doc  # nothing recorded had to be read again
    assert doc["files_unmodified"] + doc["files_new"] == FILES
    assert not list(cli.repo.glob("data/.tmp-*")), "salvaged temp files are removed"
    check_and_restore(cli, src)


def test_a_torn_open_pack_is_salvaged_only_as_far_as_it_authenticates(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    compressible_tree(src, FILES)
    crash_after_30_files(cli, src)
    for tmp in open_packs_left(cli):  # as if the disk lost the end of each file
        os.truncate(tmp, tmp.stat().st_size // 2)
    doc = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert doc["files_changed"] > 0, doc  # files whose chunks were lost are read again
    assert doc["files_unmodified"] > 0, doc  # and those in the surviving halves are not
    check_and_restore(cli, src)


def test_a_run_knows_when_the_last_one_was_killed(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    try:
        assert index.start_backup_run() is False
        index.end_backup_run()
        assert index.start_backup_run() is False  # the last run finished
        assert index.start_backup_run() is True  # it did not
        index.end_backup_run()
        assert index.start_backup_run() is False
    finally:
        index.close()


def test_a_resumed_run_snapshot_matches_the_tree(cli: Cli) -> None:
    """Salvaged blobs make the same snapshot as a run that reads everything."""
    cli.init()
    src = cli.tmp / "src"
    compressible_tree(src, FILES)
    (src / "sub").mkdir()
    for i in range(30):
        (src / "sub" / f"n{i}").write_text(str(i))
    stop = threading.Event()

    def write_beside_src() -> None:  # what any other process does to /tmp: src's ancestors change meanwhile
        while not stop.is_set():
            (cli.tmp / "noise").write_text(str(time.monotonic()))
            (cli.tmp / "noise").unlink()
            time.sleep(0.005)

    noise = threading.Thread(target=write_beside_src, daemon=True)
    noise.start()
    try:
        crash_after_30_files(cli, src)
        resumed = cli.backup(src)
        fresh = cli.backup(src)  # forward, everything cached
    finally:
        stop.set()
        noise.join()
    # Only what the test controls: src's ancestors (/tmp and its parents) change whenever anything else writes there.
    listing = [cli.ok("ls", snap, str(src), "--json").stdout for snap in (resumed, fresh)]
    assert listing[0] == listing[1] and len(json.loads(listing[0])) > FILES
    changes = json.loads(cli.ok("diff", resumed, fresh, "--json").stdout)["changes"]
    assert [c for c in changes if str(src) in json.dumps(c)] == []


def test_directory_records_wait_until_the_workers_packs_are_durable(cli: Cli) -> None:
    """Past the first few MiB (here from the start), workers pack what they seal; a directory record may name
    their blobs only once each such worker has made its packs durable. Killed right after the first record,
    with every pack still open then lost (as a power cut loses what was never synced), the next run must not
    reuse a tree whose chunks are gone. One worker, which flushes every 0.1 s: the parent records directories
    at every checkpoint, so a record written too early would name blobs of an open pack."""
    cli.init()
    src = cli.tmp / "src"
    rng = random.Random(3)
    for d in range(30):
        folder = src / f"dir{d:02}"
        folder.mkdir(parents=True)
        for n in range(40):  # 12 MB in all: the worker takes over half a second
            (folder / f"f{n:02}.bin").write_bytes(rng.randbytes(10_000))
    env = {**cli.env, CRASH_ENV: "backup-dirs-recorded", TUNING_ENV: "checkpoint=0,dir-checkpoint=0,worker-flush=0.1,parent-packs-first=0,workers=1"}
    killed = cli.run("backup", src, env=env)
    assert killed.returncode == -9, "the run ended before it recorded a directory: " + killed.stderr.decode()
    for leftover in cli.repo.glob("data/.tmp-*"):  # open packs and journals: nothing in them was synced
        leftover.unlink()
    doc = json.loads(cli.ok("backup", src, "--json").stdout.decode().splitlines()[-1])
    assert doc["files_unmodified"] > 0, doc  # the records that were kept are used
    check_and_restore_tree(cli, src)


def check_and_restore_tree(cli: Cli, src: Path) -> None:
    cli.ok("check", "--read-data")
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out, "--verify")
    restored = out / str(src).lstrip("/")
    for path in src.rglob("*"):
        if path.is_file():
            assert (restored / path.relative_to(src)).read_bytes() == path.read_bytes()
