"""Reading single blobs (chunks and trees) by id: local packs through a small cache of open files,
or, in a thin repository, byte ranges of the remote's packs."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from stasisfs.errors import IntegrityError
from stasisfs.format.crypto import Cipher
from stasisfs.format.pack import open_blob
from stasisfs.repo.index import Index, Location
from stasisfs.system.mountinfo import MEMORY_FILESYSTEMS, filesystem_type

OPEN_PACKS = 64


class PackSource(Protocol):
    """Where a thin repository's packs come from (`remote.packcache.RemotePacks`)."""

    @property
    def name(self) -> str: ...
    def read(self, pack_id: bytes, offset: int, length: int) -> bytes: ...
    def whole(self, pack_id: bytes) -> bytes: ...
    def listing(self) -> list[tuple[str, int]]: ...
    def invalidate(self, pack_id: bytes, offset: int, length: int) -> None: ...


def pack_path(repo_path: Path, pack_id: bytes) -> Path:
    name = pack_id.hex()
    return repo_path / "data" / name[:2] / name


class BlobReader:
    def __init__(self, repo_path: Path, cipher: Cipher, index: Callable[[], Index], remote: PackSource | None) -> None:
        self.repo_path = repo_path
        self.cipher = cipher
        self._index = index  # the repository opens its index lazily
        self.remote = remote
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._fd_lock = threading.Lock()
        self._memory_backed: bool | None = None

    def _pack_fd(self, pack_id: bytes, required: bool = True) -> int | None:
        with self._fd_lock:
            fd = self._fds.get(pack_id)
            if fd is not None:
                self._fds.move_to_end(pack_id)
                return fd
            try:
                fd = os.open(pack_path(self.repo_path, pack_id), os.O_RDONLY)
            except FileNotFoundError:
                if not required:
                    return None
                raise IntegrityError(f"pack {pack_id.hex()} is missing from the repository") from None
            self._fds[pack_id] = fd
            while len(self._fds) > OPEN_PACKS:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def load(self, chunk_id: bytes) -> bytes:
        location = self._index().lookup(chunk_id)
        if location is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is not in the index; run `stasisfs check`")
        remote = self.remote
        fd = self._pack_fd(location.pack_id, required=remote is None)
        if fd is not None:
            return self._open_box(chunk_id, location, os.pread(fd, location.length, location.offset))
        assert remote is not None
        try:
            return self._open_box(chunk_id, location, remote.read(location.pack_id, location.offset, location.length))
        except IntegrityError:  # a damaged cache block, or a bad fetch: drop it and fetch once more
            remote.invalidate(location.pack_id, location.offset, location.length)
            return self._open_box(chunk_id, location, remote.read(location.pack_id, location.offset, location.length))

    def load_if_cached(self, chunk_id: bytes, max_length: int) -> bytes | None:
        """The blob, if it is small, its bytes are in the page cache and it is intact; None rather than wait for a disk.

        Lets an event loop serve small reads inline without ever blocking on storage. For a damaged
        blob it is None too: `load`, on the blocking path, reports the damage.
        """
        location = self._index().lookup(chunk_id)
        if location is None or location.length > max_length:
            return None
        buffer = bytearray(location.length)
        fd = self._pack_fd(location.pack_id, required=self.remote is None)
        if fd is None:
            return None  # fetching from a remote may block
        try:
            # tmpfs cannot block (and does not support RWF_NOWAIT); elsewhere, refuse to wait for a disk.
            n = os.preadv(fd, [buffer], location.offset, 0 if self._is_memory_backed() else os.RWF_NOWAIT)
        except OSError:
            return None
        if n != location.length:
            return None  # partly cached, or truncated: the blocking path decides
        try:
            return self._open_box(chunk_id, location, bytes(buffer))
        except IntegrityError:
            return None  # damaged: the blocking path reads it again, and reports it

    def _is_memory_backed(self) -> bool:
        if self._memory_backed is None:
            self._memory_backed = filesystem_type(self.repo_path) in MEMORY_FILESYSTEMS
        return self._memory_backed

    def advise(self, chunk_ids: list[bytes]) -> None:
        """Ask the kernel to start reading these blobs from storage (posix_fadvise WILLNEED); never waits."""
        if self._is_memory_backed():
            return
        for location in self._index().lookup_many(chunk_ids):
            fd = self._pack_fd(location.pack_id, required=False)
            if fd is None:
                continue
            with contextlib.suppress(OSError, IntegrityError):
                os.posix_fadvise(fd, location.offset, location.length, os.POSIX_FADV_WILLNEED)

    def _open_box(self, chunk_id: bytes, location: Location, box: bytes) -> bytes:
        if len(box) != location.length:
            raise IntegrityError(f"pack {location.pack_id.hex()} is truncated")
        try:
            # The AEAD already binds the chunk id; re-hashing is for `check --read-data`.
            return open_blob(self.cipher, location.entry(chunk_id), box, verify=False)
        except IntegrityError as exc:
            raise IntegrityError(f"pack {location.pack_id.hex()} is damaged: {exc}") from None

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
