"""An in-memory store: for tests, and for caches in front of slower stores."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from . import ObjectNotFound, ObjectStore


class MemoryStore(ObjectStore):
    def __init__(self) -> None:
        self.url = "memory://"
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | list[bytes]) -> None:
        joined = b"".join(data) if isinstance(data, list) else bytes(data)
        with self._lock:
            self._objects[key] = joined

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            data = self._objects.get(key)
        if data is None:
            raise ObjectNotFound(key)
        return data[offset : None if length is None else offset + length]

    def size(self, key: str) -> int | None:
        with self._lock:
            data = self._objects.get(key)
        return None if data is None else len(data)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._objects.pop(key, None) is not None

    def keys(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            selected = sorted(k for k in self._objects if k.startswith(prefix))
        yield from selected
