"""Packs of a thin repository: fetched from the remote on demand with Range requests, cached encrypted.

A pack is cached in fixed blocks, one file per block
(`<cache>/packs/<pack id>/<block number>`, written atomically), so a reader
never sees half a block and several processes can share the cache. Bytes from
here are authenticated by the AEAD of each blob, like bytes from a local pack;
a block that fails is dropped and fetched again. The cache has a size cap and
evicts the least recently written blocks.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from stasisfs.remote.client import PerThread, RemoteAuthError
from stasisfs.remote.devices import DeviceRemotes, Remote
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import write_atomic

BLOCK = 2 * 1024 * 1024
DEFAULT_CAP = 4 * 1024**3


class RemotePacks:
    def __init__(self, cache_dir: Path, remote: Remote, cap: int = DEFAULT_CAP) -> None:
        self.root = cache_dir / "packs"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.remote = remote
        self.cap = cap
        self._client = PerThread(remote.client)
        self._lock = threading.Lock()
        self._cached_bytes: int | None = None

    def _block_path(self, pack_id: bytes, block: int) -> Path:
        return self.root / pack_id.hex() / str(block)

    @property
    def name(self) -> str:
        return self.remote.name

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        pieces: dict[int, bytes] = {}
        for block in range(first, last + 1):
            with contextlib.suppress(FileNotFoundError):
                pieces[block] = self._slice(self._block_path(pack_id, block), block, offset, length)
        missing = [b for b in range(first, last + 1) if b not in pieces]
        if missing:
            for block, data in self._fetch(pack_id, missing[0], missing[-1]).items():
                start, end = _span(block, offset, length)
                pieces[block] = data[start:end]
        return b"".join(pieces[b] for b in range(first, last + 1))

    @staticmethod
    def _slice(path: Path, block: int, offset: int, length: int) -> bytes:
        """Only the part of a cached block the read needs: small reads must not copy whole blocks."""
        start, end = _span(block, offset, length)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)

    def _fetch(self, pack_id: bytes, first: int, last: int) -> dict[int, bytes]:
        """One Range request for blocks first..last; the pack's last block may be short."""
        client = self._client()
        try:
            data = client.get_range_upto(self.remote.device, "data", pack_id.hex(), first * BLOCK, (last - first + 1) * BLOCK)
        except RemoteAuthError:
            renew = getattr(self.remote, "renew", None)
            if renew is None:
                raise
            renew()  # a password session that expired (another device's packs in a mount)
            client.token = self.remote.token
            data = client.get_range_upto(self.remote.device, "data", pack_id.hex(), first * BLOCK, (last - first + 1) * BLOCK)
        (self.root / pack_id.hex()).mkdir(exist_ok=True, mode=0o700)
        fetched = {}
        for block in range(first, last + 1):
            piece = data[(block - first) * BLOCK : (block - first + 1) * BLOCK]
            if piece:
                write_atomic(self._block_path(pack_id, block), piece, sync=False)  # a cache: losing it costs a refetch
                fetched[block] = piece
        self._account(len(data))
        return fetched

    def whole(self, pack_id: bytes) -> bytes:
        """The whole pack, uncached, checked against its id (for `check --read-data`)."""
        return self._client().get_object(self.remote.device, "data", pack_id.hex())

    def listing(self) -> list[tuple[str, int]]:
        return list(self._client().list_objects(self.remote.device, "data"))

    def invalidate(self, pack_id: bytes, offset: int, length: int) -> None:
        for block in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1):
            self._block_path(pack_id, block).unlink(missing_ok=True)

    def _account(self, added: int) -> None:
        with self._lock:
            if self._cached_bytes is None:
                self._cached_bytes = sum(size for _, _, size in self._blocks())
            self._cached_bytes += added
            if self._cached_bytes <= self.cap:
                return
            # Evict the oldest blocks down to 80% of the cap.
            for _, path, size in sorted(self._blocks()):
                if self._cached_bytes <= self.cap * 0.8:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    self._cached_bytes -= size

    def _blocks(self) -> list[tuple[float, Path, int]]:
        found = []
        for pack_dir in os.scandir(self.root):
            if not pack_dir.is_dir():
                continue
            for entry in os.scandir(pack_dir.path):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    found.append((st.st_mtime, Path(entry.path), st.st_size))
        return found


def _span(block: int, offset: int, length: int) -> tuple[int, int]:
    """The [start, end) of a read of `length` bytes at pack `offset` that falls within `block`."""
    base = block * BLOCK
    return max(offset, base) - base, min(offset + length, base + BLOCK) - base


def thin_pack_source(repo: Repository) -> RemotePacks | None:
    """For a thin repository (made by `recover`), where its missing packs come from; None if every pack is local."""
    thin = DeviceRemotes(repo.id).thin
    return RemotePacks(repo.cache_dir, thin) if thin is not None else None


def attach_thin_packs(repo: Repository) -> Repository:
    repo.fetch_packs_from(thin_pack_source(repo))
    return repo
