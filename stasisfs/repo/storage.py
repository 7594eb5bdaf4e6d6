"""Atomic, content-addressed files: the repository directory's only way of writing.

Every object is stored under the SHA-256 of its bytes and written
temp file -> fsync -> rename -> fsync(directory), so a crash leaves either
the whole object or nothing (plus a temp file that later runs sweep).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from stasisfs.errors import IntegrityError, StasisError, UsageError

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is written: a write may take less than it was given."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, and someone else's
    # A zombie (killed, not yet reaped) writes nothing more.
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
            return False
    return True


def write_atomic(path: Path, data: bytes | memoryview | list[bytes], mode: int = 0o600, sync: bool = True) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            for part in data if isinstance(data, list) else [data]:
                write_all(fd, part)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise StasisError(f"no space left on the device holding {path.parent}; nothing was lost, free some space and run again") from None
        raise StasisError(f"cannot write {path}: {exc.strerror}") from None


def read_json_file(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    """A small JSON settings file; `default` when it does not exist yet, a clear error when it is unreadable."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); fix or remove it") from None


def write_json_file(path: Path, doc: dict[str, Any]) -> None:
    """Atomically, mode 0600 in a 0700 directory: these files hold tokens and device state."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(doc, indent=1).encode(), mode=0o600)


def storage_id(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: Path) -> bytes:
    data = path.read_bytes()
    if storage_id(data) != path.name:
        raise IntegrityError(f"{path} is damaged: its content no longer matches its name")
    return data


def is_object_name(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def writer_alive(temp_name: str) -> bool:
    """Temp files end in the writer's pid: is that process still running?"""
    try:
        pid = int(temp_name.rsplit(".", 1)[1])
    except (ValueError, IndexError):
        return False
    return process_alive(pid)


def sweep_temp_files(directory: Path) -> None:
    """Remove temp files a killed writer left behind."""
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX) and not writer_alive(entry.name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
