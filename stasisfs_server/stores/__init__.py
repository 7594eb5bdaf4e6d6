"""Object stores: where the bytes live. The catalog of what exists lives in the database.

Every store takes keys of the form `<device>/<kind>/<64 hex id>`, built only by
`object_key`, and never interprets them as paths given by a client.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

_KEY = re.compile(r"^[0-9a-f]{32}/[a-z]{1,16}/[0-9a-f]{64}$")


class ObjectNotFound(Exception):
    """The store holds no object under this key."""


def object_key(device_uid: str, kind: str, object_id: str) -> str:
    key = f"{device_uid}/{kind}/{object_id}"
    if not _KEY.match(key):
        raise ValueError(f"malformed object key {key!r}")
    return key


class ObjectStore(ABC):
    """Write-once blobs by key. Implementations must make `put` atomic: a reader sees all of it or nothing."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes | list[bytes]) -> None:
        """Store `data` (or the concatenation of its parts, as received) under `key`."""

    @abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes [offset, offset+length) of the object; raises ObjectNotFound."""

    def stream(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        """The range as pieces, for passing through to a client without holding it whole; stores that can stream override it."""
        yield self.get(key, offset, length)

    @abstractmethod
    def size(self, key: str) -> int | None: ...

    @abstractmethod
    def delete(self, key: str) -> bool:
        """True if something was deleted."""

    @abstractmethod
    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix`, in sorted order."""


def open_store(url: str, data_dir: Path) -> ObjectStore:
    from .file import FileStore
    from .memory import MemoryStore

    if url.startswith("file://"):
        return FileStore(Path(url[len("file://") :]))
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("s3://"):
        from .s3 import S3Store

        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"store URL {url!r} names no bucket: use s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix)
    raise ValueError(f"unsupported store URL {url!r}: use file:///PATH, s3://BUCKET/PREFIX or memory://")


def open_stores(urls: list[str], data_dir: Path) -> ObjectStore:
    """One store, or several kept as replicas of each other."""
    stores = [open_store(url, data_dir) for url in urls]
    if len(stores) == 1:
        return stores[0]
    from .replicated import ReplicatedStore

    return ReplicatedStore(stores)
