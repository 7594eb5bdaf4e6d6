"""`/proc/self/mountinfo`, parsed once and byte-correct: the one reader of the kernel's mount table.

Paths in it are bytes with space, tab, newline and backslash written as three-digit octal
escapes (`\\040`); nothing else is escaped, so names that are not UTF-8 come through as they are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    device: str  # "major:minor", as /sys/class/bdi names it
    mountpoint: bytes
    fstype: bytes
    source: bytes


def unescape(field: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


def parse(table: bytes) -> list[MountEntry]:
    """Every well-formed line: `id parent major:minor root mountpoint options [optional...] - fstype source superoptions`."""
    entries = []
    for line in table.splitlines():
        left, separator, right = line.partition(b" - ")
        fields, tail = left.split(b" "), right.split(b" ")
        if not separator or len(fields) < 6 or not tail[0]:
            continue
        entries.append(MountEntry(fields[2].decode("ascii", "replace"), unescape(fields[4]), unescape(tail[0]),
                                  unescape(tail[1]) if len(tail) > 1 else b""))
    return entries


def read() -> list[MountEntry]:
    """This process's mount table; empty where there is no /proc."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return parse(f.read())
    except OSError:
        return []


def mount_at(path: bytes) -> MountEntry | None:
    """The newest mount exactly at `path` (an absolute path), if any."""
    found = [entry for entry in read() if entry.mountpoint == path]
    return found[-1] if found else None


def containing(path: bytes) -> MountEntry | None:
    """The mount that holds `path` (an absolute, resolved path): the longest matching mount point, the newest on a tie."""
    best: MountEntry | None = None
    for entry in read():
        point = entry.mountpoint
        if (path == point or path.startswith(point.rstrip(b"/") + b"/")) and (best is None or len(point) >= len(best.mountpoint)):
            best = entry
    return best


MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    entry = containing(os.fsencode(os.path.realpath(path)))
    return os.fsdecode(entry.fstype) if entry is not None else ""
