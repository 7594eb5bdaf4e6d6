"""What a backup's walk enters, and what a directory's signature is made of (the walk and `presign` share both)."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
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
