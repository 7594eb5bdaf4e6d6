"""What a backup's walk enters, and listing ahead of it.

`ListingAhead` lists and stats directories, in the walk's order, while the command has
nothing else to do: deriving the key from a password (Argon2id, a quarter of a second,
without the GIL) and taking in a killed run's open packs. The walk then finds its first
directories already listed, unless they changed since. It stops before the walk begins,
since two threads walking at once only contend for the GIL. Files the walk will read are
stat'ed again by it, so a listing's age never makes a file look changed while read.

It also signs each subtree it lists completely, exactly as the walk would (`WalkRules`
holds what both must agree on). The walk asks for that signature first: when the directory
cache knows it, the whole subtree's tree is reused without the walk entering it. That is
what makes crossing the finished part of a killed run, or an unchanged tree, cheap. A
signature that differs from the walk's only costs a cache miss, since records are only
ever written by the walk itself.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType

import blake3
import pathspec

from .repository import cache_root


def stasisfs_mountpoints() -> set[bytes]:
    """Mounted stasisfs filesystems: never descend into them (or stat a dead one)."""
    result = set()
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                left, _, right = line.partition(b" - ")
                fstype, source = ([*right.split(), b"", b""])[:2]
                if fstype.startswith(b"fuse") and (b"stasisfs" in fstype or source.startswith(b"stasisfs")):
                    mountpoint = left.split()[4].decode("unicode_escape").encode("latin-1")
                    result.add(mountpoint)
    except OSError:
        return result  # no /proc: nothing is known to be mounted
    return result


CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
STAT_SIGNATURE = struct.Struct("<HIIIQqqQQQQ")
MOUNT_POINT_SIGNATURE = b"mount point"


def stat_signature(name: bytes, st: os.stat_result) -> bytes:
    """What a directory's signature holds for one entry: every stat field that a change moves, and the name."""
    return STAT_SIGNATURE.pack(len(name), st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                               st.st_ctime_ns, st.st_ino, st.st_dev, st.st_nlink, st.st_rdev) + name


def is_cache_dir(path: bytes) -> bool:
    try:
        with open(os.path.join(path, b"CACHEDIR.TAG"), "rb") as f:
            return f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
    except OSError:
        return False


class Subdir(Enum):
    """What the walk does with a subdirectory it meets."""

    LEFT_OUT = 0  # not in the snapshot (its stat stays signed in the parent)
    MOUNT_POINT = 1  # another filesystem under --one-file-system: kept empty
    ENTERED = 2


class WalkRules:
    """What the walk leaves out: excluded paths, cache directories, the repository and cache themselves, stasisfs mounts."""

    def __init__(self, excludes: list[str], one_file_system: bool, repo_path: Path, exclude_caches: bool = False) -> None:
        self.spec = pathspec.GitIgnoreSpec.from_lines(excludes) if excludes else None
        self.one_file_system = one_file_system
        self.exclude_caches = exclude_caches
        # Part of every directory signature: other options give other trees.
        self.fingerprint = repr((sorted(excludes), exclude_caches, one_file_system)).encode()
        self.skip_inodes: set[tuple[int, int]] = set()
        for path in (repo_path, cache_root()):
            with contextlib.suppress(OSError):  # a cache that does not exist yet holds nothing to skip
                st = os.stat(path)
                self.skip_inodes.add((st.st_dev, st.st_ino))
        self.skip_paths = stasisfs_mountpoints()

    def excluded(self, path: bytes, is_dir: bool) -> bool:
        if self.spec is None:
            return False
        rel = os.fsdecode(path.lstrip(b"/")) + ("/" if is_dir else "")
        return self.spec.match_file(rel)

    def skipped(self, path: bytes, st: os.stat_result) -> bool:
        """A directory never entered (the walk leaves it out of the snapshot altogether)."""
        return (st.st_dev, st.st_ino) in self.skip_inodes or path in self.skip_paths

    def subdir(self, path: bytes, st: os.stat_result, root_dev: int) -> Subdir:
        if self.skipped(path, st) or (self.exclude_caches and is_cache_dir(path)):
            return Subdir.LEFT_OUT
        if self.one_file_system and st.st_dev != root_dev:
            return Subdir.MOUNT_POINT
        return Subdir.ENTERED

    def descends(self, path: bytes, st: os.stat_result, root_dev: int) -> bool:
        """Whether the walk lists this directory's entries."""
        return not (self.skipped(path, st) or self.excluded(path, True) or (self.one_file_system and st.st_dev != root_dev))


RACY_NS = 2_000_000_000  # directories changed this close to the listing are listed again by the walk


@dataclass(slots=True)
class SignedSubtree:
    """A directory whose whole subtree was listed: its signature and what it holds."""

    signature: bytes
    files: int  # regular files in it, at any depth
    nbytes: int
    first: int  # its directories are `ListingAhead._order[first:end]` (pre-order keeps a subtree together)
    end: int = 0


@dataclass(slots=True)
class _Frame:
    path: bytes
    root_dev: int
    entries: list[os.DirEntry[bytes]]
    signed: list[bytes]
    first: int
    next: int = 0
    files: int = 0
    nbytes: int = 0
    complete: bool = True


class ListingAhead:
    """Directory listings (stats cached in each `DirEntry`), taken in the walk's depth-first order."""

    MAX_ENTRIES = 100_000  # about 40 MB of entries at most, for a walk that has not started yet

    def __init__(self, roots: list[bytes], rules: WalkRules) -> None:
        self.rules = rules
        self._listed: dict[bytes, tuple[list[os.DirEntry[bytes]], int, int]] = {}  # entries, dir mtime, dir ctime
        self._signed: dict[bytes, SignedSubtree] = {}
        self._order: list[tuple[bytes, int, int]] = []  # every directory listed, in pre-order: path, mtime, ctime
        self._count = 0
        self._started_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._list, args=(roots,), name="backup-list-ahead", daemon=True)

    def __enter__(self) -> ListingAhead:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def wait(self) -> None:
        """Until everything is listed (or the cap is reached)."""
        self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _unchanged(self, path: bytes, mtime_ns: int, ctime_ns: int) -> bool:
        """Adding, removing or renaming an entry moves the directory's mtime. A directory whose mtime
        was already recent when listed could hide a change within the clock's granularity, so
        those count as changed."""
        try:
            now = os.lstat(path)
        except OSError:
            return False
        return (now.st_mtime_ns, now.st_ctime_ns) == (mtime_ns, ctime_ns) and mtime_ns < self._started_ns - RACY_NS

    def take(self, path: bytes) -> list[os.DirEntry[bytes]] | None:
        """This directory's entries if they were listed ahead and it has not changed since; else None."""
        listed = self._listed.pop(path, None)
        if listed is None:
            return None
        entries, mtime_ns, ctime_ns = listed
        return entries if self._unchanged(path, mtime_ns, ctime_ns) else None

    def signature(self, path: bytes) -> SignedSubtree | None:
        """The subtree's signature as listed, or None (not listed whole, or unknown). Check it with `still_valid`."""
        return self._signed.get(path)

    def still_valid(self, subtree: SignedSubtree) -> bool:
        """Whether no directory in the subtree changed since it was listed. If so, its listings are let go: the walk is done with them."""
        directories = self._order[subtree.first : subtree.end]
        if not all(self._unchanged(path, mtime_ns, ctime_ns) for path, mtime_ns, ctime_ns in directories):
            return False
        for path, _, _ in directories:
            self._listed.pop(path, None)
            self._signed.pop(path, None)
        return True

    def _open(self, path: bytes, root_dev: int) -> _Frame | None:
        try:
            before = os.lstat(path)
            entries = list(os.scandir(path))
        except OSError:
            return None  # the walk lists it again, and reports what is wrong
        self._listed[path] = (entries, before.st_mtime_ns, before.st_ctime_ns)
        self._order.append((path, before.st_mtime_ns, before.st_ctime_ns))
        self._count += len(entries)
        return _Frame(path, root_dev, entries, [self.rules.fingerprint], len(self._order) - 1)

    def _list(self, roots: list[bytes]) -> None:
        for root in roots:
            with contextlib.suppress(OSError):
                st = os.lstat(root)
                if stat.S_ISDIR(st.st_mode) and self.rules.subdir(root, st, st.st_dev) is Subdir.ENTERED:
                    self._list_tree(root, st.st_dev)

    def _list_tree(self, root: bytes, root_dev: int) -> None:
        """Depth-first in the walk's order; each directory is signed once all it holds is (post-order)."""
        frame = self._open(root, root_dev)
        stack = [frame] if frame is not None else []
        spec = self.rules.spec
        while stack:
            if self._stop.is_set() or self._count >= self.MAX_ENTRIES:
                return
            frame = stack[-1]
            if frame.next < len(frame.entries):
                entry = frame.entries[frame.next]
                frame.next += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    frame.complete = False
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if spec is not None and self.rules.excluded(entry.path, is_dir):
                    continue
                frame.signed.append(stat_signature(entry.name, st))
                if not is_dir:
                    if stat.S_ISREG(st.st_mode):
                        frame.files += 1
                        frame.nbytes += st.st_size
                    continue
                action = self.rules.subdir(entry.path, st, frame.root_dev)
                if action is Subdir.MOUNT_POINT:
                    frame.signed.append(MOUNT_POINT_SIGNATURE)
                elif action is Subdir.ENTERED:
                    child = self._open(entry.path, frame.root_dev)
                    if child is None:
                        frame.complete = False
                    else:
                        stack.append(child)
                continue
            stack.pop()
            parent = stack[-1] if stack else None
            if not frame.complete:
                if parent is not None:
                    parent.complete = False
                continue
            digest = blake3.blake3(b"".join(frame.signed)).digest()
            self._signed[frame.path] = SignedSubtree(digest, frame.files, frame.nbytes, frame.first, len(self._order))
            if parent is not None:
                parent.signed.append(digest)
                parent.files += frame.files
                parent.nbytes += frame.nbytes
