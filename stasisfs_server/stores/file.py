"""A directory of files: `<root>/<device>/<kind>/<2 hex>/<id>`, written temp -> fsync -> rename -> fsync(dir)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from stasisfs.repo.storage import write_all

from . import ObjectNotFound, ObjectStore

TEMP_PREFIX = ".tmp-"


class FileStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)  # also when it existed before
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        device, kind, object_id = key.split("/")
        return self.root / device / kind / object_id[:2] / object_id

    def put(self, key: str, data: bytes | list[bytes]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A unique temp name per attempt: a retried upload never races a failed one's cleanup (rest-server #142).
        tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for part in data if isinstance(data, list) else [data]:
                    write_all(fd, part)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def sweep_temp_files(self, older_than: float = 3600) -> int:
        """Remove uploads a killed server left half-written. Only old ones: other instances may share this directory."""
        import time

        removed = 0
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > older_than:
                    path.unlink()
                    removed += 1
        return removed

    def keys(self, prefix: str = "") -> Iterator[str]:
        found = []
        for device in _names(self.root):
            for kind in _names(self.root / device):
                for fan in _names(self.root / device / kind):
                    for name in _names(self.root / device / kind / fan):
                        key = f"{device}/{kind}/{name}"
                        if key.startswith(prefix) and not name.startswith(TEMP_PREFIX):
                            found.append(key)
        yield from sorted(found)


def _names(directory: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(directory) if not e.name.startswith(TEMP_PREFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []
