"""What a backup's walk enters, and listing ahead of it.

`ListingAhead` lists and stats directories, in the walk's order, while the command has
nothing else to do: deriving the key from a password (Argon2id, a quarter of a second,
without the GIL) and taking in a killed run's open packs. The walk then finds its first
directories already listed, unless they changed since. It stops before the walk begins,
since two threads walking at once only contend for the GIL. Files the walk will read are
stat'ed again by it, so a listing's age never makes a file look changed while read.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from stasisfs.system.paths import cache_root

if TYPE_CHECKING:
    import pathspec


# One entry's part of its directory's signature: name length, then the stat fields any change moves.
STAT_SIGNATURE = struct.Struct("<HIIIQqqQQQQ")
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def signed_stat(name: bytes, st: os.stat_result) -> bytes:
    return STAT_SIGNATURE.pack(len(name), st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                               st.st_ctime_ns, st.st_ino, st.st_dev, st.st_nlink, st.st_rdev)


def options_fingerprint(excludes: list[str], exclude_caches: bool, one_file_system: bool) -> bytes:
    """Begins every directory signature: changing what the walk leaves out rebuilds every tree."""
    return repr((sorted(excludes), exclude_caches, one_file_system)).encode()


def holds_cachedir_tag(path: bytes) -> bool:
    """A directory marked as a cache (bford.info/cachedir): --exclude-caches leaves it out."""
    try:
        with open(os.path.join(path, b"CACHEDIR.TAG"), "rb") as f:
            return f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
    except OSError:
        return False


def stasisfs_mountpoints() -> set[bytes]:
    """Mounted stasisfs filesystems: never descend into them (or stat a dead one)."""
    from stasisfs.system import mountinfo

    return {entry.mountpoint for entry in mountinfo.read()
            if entry.fstype.startswith(b"fuse") and (b"stasisfs" in entry.fstype or entry.source.startswith(b"stasisfs"))}


class WalkRules:
    """What the walk leaves out: excluded paths, the repository and cache themselves, stasisfs mounts."""

    def __init__(self, excludes: list[str], one_file_system: bool, repo_path: Path) -> None:
        self.spec: pathspec.GitIgnoreSpec | None = None
        if excludes:
            import pathspec  # 5 ms a start-up: most runs exclude nothing

            self.spec = pathspec.GitIgnoreSpec.from_lines(excludes)
        self.one_file_system = one_file_system
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

    def descends(self, path: bytes, st: os.stat_result, root_dev: int) -> bool:
        """Whether the walk lists this directory's entries."""
        return not (self.skipped(path, st) or self.excluded(path, True) or (self.one_file_system and st.st_dev != root_dev))


RACY_NS = 2_000_000_000  # directories changed this close to the listing are listed again by the walk


class ListingAhead:
    """Directory listings (stats cached in each `DirEntry`), taken in the walk's depth-first order."""

    MAX_ENTRIES = 30_000  # about 12 MB of entries at most: what a walk crosses in the time the key takes to open

    def __init__(self, roots: list[bytes], rules: WalkRules) -> None:
        self.rules = rules
        self._listed: dict[bytes, tuple[list[os.DirEntry[bytes]], int, int]] = {}  # entries, dir mtime, dir ctime
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

    def take(self, path: bytes) -> list[os.DirEntry[bytes]] | None:
        """This directory's entries if they were listed ahead and it has not changed since; else None.

        Adding, removing or renaming an entry moves the directory's mtime. A directory whose mtime
        was already recent when listed could hide a change within the clock's granularity, so
        those are listed again.
        """
        listed = self._listed.pop(path, None)
        if listed is None:
            return None
        entries, mtime_ns, ctime_ns = listed
        try:
            now = os.lstat(path)
        except OSError:
            return None
        if (now.st_mtime_ns, now.st_ctime_ns) != (mtime_ns, ctime_ns) or mtime_ns >= self._started_ns - RACY_NS:
            return None
        return entries

    def _list(self, roots: list[bytes]) -> None:
        listed = 0
        pending: list[tuple[bytes, int]] = []
        for root in reversed(roots):
            with contextlib.suppress(OSError):
                st = os.lstat(root)
                if stat.S_ISDIR(st.st_mode) and self.rules.descends(root, st, st.st_dev):
                    pending.append((root, st.st_dev))
        while pending and listed < self.MAX_ENTRIES and not self._stop.is_set():
            path, root_dev = pending.pop()
            subdirs = []
            try:
                before = os.lstat(path)
                entries = list(os.scandir(path))
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) and self.rules.descends(entry.path, st, root_dev):
                        subdirs.append((entry.path, root_dev))
            except OSError:
                continue  # the walk lists it again, and reports what is wrong
            self._listed[path] = (entries, before.st_mtime_ns, before.st_ctime_ns)
            listed += len(entries)
            pending.extend(reversed(subdirs))
