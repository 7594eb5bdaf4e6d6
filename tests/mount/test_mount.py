"""`stasisfs mount` through the real kernel."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PASSWORD, Cli
from test_fidelity import build_hostile_tree, describe

from .conftest import Mounted, mount_pids, stasisfs_mounts

pytestmark = pytest.mark.timeout(180)


def small_backup(cli: Cli) -> Path:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "f").write_text("x")
    cli.backup(src)
    return src


def in_snapshot(m: Mounted, src: Path, name: str = "latest") -> Path:
    return m.path / "snapshots" / name / str(src).lstrip("/")


def damage_blob(cli: Cli, path: Path, blob: str) -> None:
    """Flip a byte inside a blob of `path` in the latest snapshot: `blob` is "content[0]" (its first chunk) or "subtree" (its tree)."""
    locate = subprocess.run(
        [sys.executable, "-c",
         "from pathlib import Path; from stasisfs.repo.repository import Repository, Credential; from stasisfs.repo.trees import TreeReader;"
         f"r = Repository(Path({str(cli.repo)!r})); r.unlock(Credential(password={PASSWORD!r}));"
         f"n = TreeReader(r).node_at(r.snapshots()[-1].root, {os.fsencode(path)!r}); loc = r.index.lookup(n.{blob});"
         "print(r.pack_path(loc.pack_id), loc.offset + loc.length // 2)"],
        env=cli.env, capture_output=True, text=True, check=True,
    ).stdout.split()
    pack, offset = Path(locate[0]), int(locate[1])
    raw = bytearray(pack.read_bytes())
    raw[offset] ^= 0xFF
    pack.write_bytes(bytes(raw))


def test_mounted_snapshot_equals_source(cli: Cli, mounted: Mounted) -> None:
    cli.init()
    src = cli.tmp / "src"
    build_hostile_tree(src)
    cli.backup(src)
    mounted.start()
    view = os.fsencode(in_snapshot(mounted, src))
    before, after = describe(os.fsencode(src)), describe(view)
    assert after.keys() == before.keys()
    for rel in before:
        assert after[rel] == before[rel], rel
    a, b = os.stat(os.path.join(view, b"hardlink-a")), os.stat(os.path.join(view, b"hardlink-b"))
    assert a.st_ino == b.st_ino and a.st_nlink == 3
    # cp -a out of the mount gives the tree back
    out = cli.tmp / "copy"
    subprocess.run(["cp", "-a", os.fsdecode(view), str(out)], check=True, timeout=120)
    copied = describe(os.fsencode(out))
    for rel in before:
        assert copied[rel] == before[rel], rel


def test_random_reads_of_a_large_file(cli: Cli, mounted: Mounted) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    data = os.urandom(24 * 1024 * 1024)
    (src / "large.bin").write_bytes(data)
    cli.backup(src)
    mounted.start()
    rng = random.Random(7)
    with open(in_snapshot(mounted, src) / "large.bin", "rb", buffering=0) as f:
        for _ in range(200):
            offset = rng.randrange(0, len(data))
            size = rng.choice([1, 100, 4096, 65536, 1 << 20, 5 << 20])
            f.seek(offset)
            assert f.read(size) == data[offset : offset + size]
        f.seek(0)
        assert f.read() == data


def test_writes_are_refused(cli: Cli, mounted: Mounted) -> None:
    src = small_backup(cli)
    mounted.start()
    target = in_snapshot(mounted, src)
    for action in (lambda: os.open(target / "f", os.O_WRONLY), lambda: os.open(target / "new", os.O_WRONLY | os.O_CREAT),
                   lambda: os.mkdir(target / "d"),
                   lambda: os.unlink(target / "f"), lambda: os.chmod(target / "f", 0o777),
                   lambda: os.setxattr(target / "f", "user.x", b"1")):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS


def test_views_and_new_snapshot_while_mounted(cli: Cli, mounted: Mounted) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "changes").write_text("one")
    (src / "stays").write_text("same")
    cli.backup(src, "--tag", "first")
    mounted.start()
    [only] = [p for p in os.listdir(mounted.path / "snapshots") if p != "latest"]
    assert os.readlink(mounted.path / "snapshots" / "latest") == only
    assert (mounted.path / "devices" / "testbox" / "latest" / str(src).lstrip("/") / "stays").read_text() == "same"
    assert (mounted.path / "tags" / "first" / only / str(src).lstrip("/") / "changes").read_text() == "one"
    ids = os.listdir(mounted.path / "ids")
    assert len(ids) == 1 and (mounted.path / "ids" / ids[0] / str(src).lstrip("/") / "stays").exists()
    (src / "changes").write_text("two!")
    cli.backup(src)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(os.listdir(mounted.path / "snapshots")) < 3:
        time.sleep(0.3)
    assert len(os.listdir(mounted.path / "snapshots")) == 3  # two snapshots and latest, without a remount
    assert (in_snapshot(mounted, src) / "changes").read_text() == "two!"
    versions = mounted.path / "versions" / str(src).lstrip("/")
    assert len(os.listdir(versions / "changes")) == 2
    assert len(os.listdir(versions / "stays")) == 1


def test_corrupt_chunk_gives_eio_and_the_rest_stays_readable(cli: Cli, mounted: Mounted) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "good").write_bytes(os.urandom(300_000))
    cli.backup(src)
    (src / "bad").write_bytes(os.urandom(300_000))
    cli.backup(src)
    damage_blob(cli, src / "bad", "content[0]")
    mounted.start()
    view = in_snapshot(mounted, src)
    with pytest.raises(OSError) as exc:
        (view / "bad").read_bytes()
    assert exc.value.errno == errno.EIO
    assert (view / "good").read_bytes() == (src / "good").read_bytes()
    assert sorted(os.listdir(view)) == ["bad", "good"]  # the mount stays up
    log = (cli.tmp / "home" / ".local" / "state" / "stasisfs" / "mount.log").read_text()
    assert "bad" in log


def test_damaged_tree_fails_only_its_own_directory(cli: Cli, mounted: Mounted) -> None:
    """Opening a directory reads the trees below it ahead; a damaged one must not fail the directory opened."""
    cli.init()
    src = cli.tmp / "src"
    for name in ("fine", "broken"):
        (src / name / "inner").mkdir(parents=True)
        (src / name / "inner" / "f").write_text(name)
    cli.backup(src)
    damage_blob(cli, src / "broken", "subtree")
    mounted.start()
    view = in_snapshot(mounted, src)
    assert sorted(os.listdir(view)) == ["broken", "fine"]  # the trees below were read ahead here, the damaged one too
    assert (view / "fine" / "inner" / "f").read_text() == "fine"
    with pytest.raises(OSError) as exc:
        os.listdir(view / "broken")
    assert exc.value.errno == errno.EIO
    log = (cli.tmp / "home" / ".local" / "state" / "stasisfs" / "mount.log").read_text()
    assert f"{src}/broken in snapshot" in log  # logged with its path


def test_umount_and_cleanup_after_kill(cli: Cli, mounted: Mounted) -> None:
    small_backup(cli)
    mounted.start()
    cli.ok("umount", mounted.path)
    assert str(mounted.path) not in stasisfs_mounts()
    mounted.start()
    for pid in mount_pids(mounted.path):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(OSError):
        os.listdir(mounted.path)  # "Transport endpoint is not connected"
    assert b"cleared a dead mount" in cli.ok("umount", mounted.path).stderr
    assert str(mounted.path) not in stasisfs_mounts()
    assert os.listdir(mounted.path) == []
    # mount on a dead mount point clears it itself, and says so
    mounted.start()
    for pid in mount_pids(mounted.path):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    again = cli.run("mount", mounted.path, timeout=90)
    assert again.returncode == 0 and b"cleared a dead mount" in again.stderr, again.stderr.decode()
    assert os.listdir(mounted.path)


def test_a_busy_mount_stays_and_says_who_uses_it(cli: Cli, mounted: Mounted) -> None:
    small_backup(cli)
    mounted.start()
    shell = subprocess.Popen(["sleep", "120"], cwd=mounted.path / "snapshots")
    try:
        busy = cli.run("umount", mounted.path)
        assert busy.returncode == 1 and b"busy" in busy.stderr and b"sleep" in busy.stderr and str(shell.pid).encode() in busy.stderr
        assert str(mounted.path) in stasisfs_mounts() and os.listdir(mounted.path / "snapshots")  # still serving
        lazy = cli.ok("umount", "--lazy", mounted.path)
        assert b"detached" in lazy.stderr and str(mounted.path) not in stasisfs_mounts()
    finally:
        shell.kill()
        shell.wait()


def test_sigterm_unmounts_cleanly(cli: Cli, mounted: Mounted) -> None:
    small_backup(cli)
    mounted.start()
    [pid] = mount_pids(mounted.path)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and str(mounted.path) in stasisfs_mounts():
        time.sleep(0.1)
    assert str(mounted.path) not in stasisfs_mounts()


def test_mount_in_command_substitution_does_not_hang(cli: Cli, mounted: Mounted) -> None:
    src = small_backup(cli)
    mounted.path.mkdir()
    # like $(stasisfs mount ...): the caller waits for EOF on the pipe, which only closes if the server holds no copy
    proc = subprocess.Popen([sys.executable, "-m", "stasisfs", "mount", str(mounted.path)], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (in_snapshot(mounted, src) / "f").read_text() == "x"


def test_mount_errors_are_clear(cli: Cli, tmp_path: Path) -> None:
    cli.init()
    missing = cli.run("mount", tmp_path / "nope")
    assert missing.returncode == 1 and b"not a directory" in missing.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    done = cli.run("mount", busy)
    assert done.returncode == 1 and b"not empty" in done.stderr
    (tmp_path / "m").mkdir()
    assert cli.run("mount", tmp_path / "m", env={"STASISFS_PASSWORD": "wrong password here"}).returncode == 12


def test_readahead_is_widened_when_permitted(cli: Cli, mounted: Mounted) -> None:
    small_backup(cli)
    mounted.start()
    device = os.stat(mounted.path).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    if os.geteuid() != 0:  # only root may write the bdi: the mount keeps the kernel's readahead and still serves
        assert setting.read_text().strip().isdigit()
        assert any((mounted.path / "snapshots").iterdir())
        return
    deadline = time.monotonic() + 10
    while setting.read_text().strip() != "1024" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert setting.read_text().strip() == "1024"


def test_a_sequential_reader_is_served_from_pushed_pages(cli: Cli, mounted: Mounted) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    rng = random.Random(7)
    for i in range(120):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(1, 60_000)))
    (src / "multi").write_bytes(rng.randbytes(900_000))  # several chunks, pushed one after another
    for d in range(40):  # small directories, listed before the f files: tar goes into these first
        (src / f"d{d:02d}").mkdir()
        for i in range(2):
            (src / f"d{d:02d}" / f"g{i}").write_bytes(rng.randbytes(rng.randrange(1, 20_000)))
    cli.backup(src)
    mounted.start()
    helpers = subprocess.run(["pgrep", "-f", "stasisfs.mount.pagepush"], capture_output=True, text=True).stdout.split()
    assert helpers, "the mount starts its read-ahead helper"
    view = in_snapshot(mounted, src)
    out = cli.tmp / "out"
    out.mkdir()
    subprocess.run(f"tar cf - -C {view} . | tar xf - -C {out}", shell=True, check=True, timeout=120)
    for path in src.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(src)).read_bytes() == path.read_bytes(), path
    cli.ok("umount", mounted.path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in helpers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in helpers), "the helper goes with the mount"
    log = (cli.tmp / "home" / ".local" / "state" / "stasisfs" / "mount.log").read_text()
    pushed = re.search(r"read-ahead helper: pushed (\d+) files", log)
    # Of 201 files, idle, all but the first one or two are pushed (193-199 here, also beside two busy loops): a
    # directory listed while a reader streams gets its first files pushed too. Beside other test workers starting
    # servers and Chromium, the helper falls behind tar for stretches (159, 145 and 121 seen); what it misses is read
    # the ordinary way. The share is a performance figure (scripts/bench --extra mount measures tar); this asserts
    # the mechanism works end to end, which a quarter of the files shows and a broken helper (none) does not.
    assert pushed and int(pushed.group(1)) >= 50, log[-2000:]


def test_sparse_files_show_their_holes_and_cp_keeps_them(cli: Cli, mounted: Mounted) -> None:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    image = src / "disk.img"
    with open(image, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(64 << 20)  # a 62 MiB hole
        f.seek((64 << 20) - (1 << 20))
        f.write(os.urandom(1 << 20))
    cli.backup(src)
    mounted.start()
    seen = in_snapshot(mounted, src) / "disk.img"
    st = os.stat(seen)
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 16 << 20, f"{st.st_blocks * 512} bytes allocated"
    copy = cli.tmp / "copy.img"
    subprocess.run(["cp", "--sparse=auto", str(seen), str(copy)], check=True, timeout=120)
    assert copy.read_bytes() == image.read_bytes()
    assert os.stat(copy).st_blocks * 512 < 16 << 20, "cp wrote the hole out in full"
    fs = os.statvfs(mounted.path)
    assert fs.f_bavail > 0 and fs.f_blocks > fs.f_bavail  # df: the repository's size used, the disk's free space free


def test_a_mount_point_named_with_a_space_and_an_accent_is_a_mount_like_any(cli: Cli, tmp_path: Path) -> None:
    from stasisfs.system.mountinfo import mount_at

    src = small_backup(cli)
    odd = tmp_path / "café mnt"
    odd.mkdir()
    cli.ok("mount", odd, timeout=90)
    try:
        entry = mount_at(os.fsencode(odd))
        assert entry is not None and str(odd) in stasisfs_mounts_decoded()
        if os.geteuid() == 0:  # only root may widen it, at a plain path and at this one alike (it does so once FUSE's INIT is done)
            setting = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
            deadline = time.monotonic() + 10
            while setting.read_text().strip() != "1024" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert setting.read_text().strip() == "1024"
        assert (odd / "snapshots" / "latest" / str(src).lstrip("/") / "f").read_text() == "x"
    finally:
        done = cli.run("umount", odd)
    assert done.returncode == 0 and b"unmounted" in done.stderr, done.stderr.decode()
    assert mount_at(os.fsencode(odd)) is None


def stasisfs_mounts_decoded() -> list[str]:
    from stasisfs.system.mountinfo import read

    return [os.fsdecode(e.mountpoint) for e in read() if b"stasisfs" in e.fstype]
