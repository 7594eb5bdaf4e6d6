"""Every metadata case round-trips exactly through backup -> restore, compared attribute by attribute."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import Cli

AS_ROOT = os.geteuid() == 0


def build_hostile_tree(root: Path) -> None:
    r = os.fsencode(root)
    os.makedirs(r)
    j = os.path.join

    def write(name: bytes, data: bytes, mode: int = 0o644, mtime_ns: int | None = None) -> bytes:
        path = j(r, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
        return path

    write(b"plain.txt", b"hello\n")
    write(b"empty", b"")
    write(b"setuid", b"#!/bin/sh\n", 0o4755)
    write(b"setgid", b"x", 0o2750)
    write(b"private", b"secret", 0o600)
    write(b"pre1970", b"old", mtime_ns=-1_234_567_890_123_456_789)
    write(b"post2038", b"future", mtime_ns=4_102_444_800_987_654_321)
    write(b"nanos", b"ns", mtime_ns=1_700_000_000_123_456_789)
    write(b"\xff\xfe-latin1-\xe9", b"not utf-8 name")
    write(b"line\nbreak", b"newline in name")
    write(b"n" * 255, b"longest name")
    write(b"big", os.urandom(3_000_000) + b"\0" * 2_000_000 + os.urandom(1000))
    hl = write(b"hardlink-a", b"shared inode")
    os.link(hl, j(r, b"hardlink-b"))
    os.makedirs(j(r, b"sub", b"hardlink-dir"))
    os.link(hl, j(r, b"sub", b"hardlink-dir", b"hardlink-c"))
    os.symlink(b"plain.txt", j(r, b"link"))
    os.symlink(b"/does/not/exist", j(r, b"dangling"))
    os.mkdir(j(r, b"emptydir"))
    os.mkdir(j(r, b"sticky"), 0o1777)
    os.chmod(j(r, b"sticky"), 0o1777)
    os.mkfifo(j(r, b"fifo"), 0o640)
    sparse = j(r, b"sparse")
    with open(sparse, "wb") as f:
        f.write(b"start")
        f.seek(20 * 1024 * 1024)
        f.write(b"end")
    os.setxattr(j(r, b"plain.txt"), b"user.colour", b"blue\x00\xff")
    os.setxattr(j(r, b"sub"), b"user.dir", b"on a dir")
    deep = r
    for i in range(120):
        deep = j(deep, b"d%d" % i)
    os.makedirs(deep)
    write(os.path.relpath(j(deep, b"bottom"), r), b"deep")
    if AS_ROOT:
        os.mknod(j(r, b"chardev"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(j(r, b"blockdev"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
        owned = write(b"owned", b"owner", 0o640)
        os.lchown(owned, 1234, 5678)
        os.lchown(j(r, b"link"), 4321, 8765)
        os.chown(j(r, b"emptydir"), 1111, 2222)
    os.chmod(j(r, b"sub"), 0o750)
    os.utime(j(r, b"emptydir"), ns=(1_000_000_123, 1_000_000_123))
    os.utime(j(r, b"link"), ns=(2_000_000_456, 2_000_000_456), follow_symlinks=False)


def describe(root: bytes) -> dict[bytes, tuple[object, ...]]:
    """Everything a user expects back, per relative path (atime and ctime are not restorable)."""
    result: dict[bytes, tuple[object, ...]] = {}
    inode_groups: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {n: os.getxattr(path, n) for n in os.listxattr(path)}
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
                inode_groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            is_dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            result[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                           st.st_nlink if not stat.S_ISDIR(st.st_mode) else None, content, sorted(xattrs.items()),
                           st.st_rdev if is_dev else None)
    result[b"<hardlink groups>"] = tuple(sorted(tuple(sorted(g)) for g in inode_groups.values() if len(g) > 1))
    return result


@pytest.mark.timeout(180)
def test_every_metadata_case_roundtrips(cli: Cli) -> None:
    cli.init()
    src = cli.tmp / "src"
    build_hostile_tree(src)
    before = describe(os.fsencode(src))
    cli.backup(src)
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out, "--sparse", "--verify")
    restored = os.fsencode(out) + os.fsencode(src)
    after = describe(restored)
    assert after.keys() == before.keys()
    for rel in before:
        assert after[rel] == before[rel], rel
    # the restored root directory of the backup keeps its mode and mtime too
    assert os.stat(restored).st_mode == os.stat(src).st_mode
    assert os.stat(restored).st_mtime_ns == os.stat(src).st_mtime_ns
    # holes stay holes with --sparse
    sparse = os.stat(os.path.join(restored, b"sparse"))
    assert sparse.st_blocks * 512 < 1024 * 1024


def test_unreadable_file_named_skipped_exit_3(cli: Cli) -> None:
    """Root reads everything, so this runs the whole CLI as `nobody` in a directory nobody owns."""
    if not AS_ROOT:
        pytest.skip("needs root to switch to an unprivileged user")
    import shutil
    import subprocess
    import sys
    import tempfile

    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is part of every Debian"
    base = Path(tempfile.mkdtemp(prefix="stasisfs-nobody-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        src = base / "src"
        src.mkdir()
        (src / "ok.txt").write_text("fine")
        (src / "locked.txt").write_text("no")
        for p in [base, *base.rglob("*")]:
            os.lchown(p, 65534, 65534)
        (src / "locked.txt").chmod(0o000)
        env = {**cli.env, "HOME": str(base), "XDG_CACHE_HOME": str(base / "cache"), "XDG_CONFIG_HOME": str(base / "config"),
               "STASISFS_REPO": str(base / "repo")}

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "stasisfs", *args],
                                  env=env, capture_output=True, timeout=60, cwd=base)

        assert run("init").returncode == 0
        done = run("backup", str(src))
        assert done.returncode == 3, done.stderr
        assert b"locked.txt" in done.stderr and b"Traceback" not in done.stderr
        listing = run("ls", "latest").stdout.decode()
        assert f"{src}/ok.txt" in listing and "locked.txt" not in listing
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_xattr_added_between_backups_is_in_the_next_snapshot(cli: Cli) -> None:
    """The walk leaves xattrs to whoever needs them (a file's reader, a rebuilt parent tree): a change still shows."""
    cli.init()
    src = cli.tree({"deep/sub/file.txt": "unchanged content"})
    cli.backup(src)
    os.setxattr(src / "deep" / "sub", b"user.label", b"dir, later")
    os.setxattr(src / "deep" / "sub" / "file.txt", b"user.label", b"file, later")
    cli.backup(src)
    out = cli.tmp / "out"
    cli.ok("restore", "latest", "--target", out)
    restored = out / str(src).lstrip("/") / "deep" / "sub"
    assert os.getxattr(restored, b"user.label") == b"dir, later"
    assert os.getxattr(restored / "file.txt", b"user.label") == b"file, later"
