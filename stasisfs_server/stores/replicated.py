"""Several stores as replicas: every write goes to all of them before it is acknowledged;
reads come from the first that answers with a good copy.

Object keys end in the SHA-256 of the object, so a full read is verified and a
damaged replica is skipped. `heal` re-copies a missing or damaged replica from a
good one (run by `stasisfs-server scrub`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

from . import ObjectNotFound, ObjectStore

log = logging.getLogger("stasisfs.server")


def _verifies(key: str, data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == key.rsplit("/", 1)[-1]


class ReplicatedStore(ObjectStore):
    def __init__(self, replicas: list[ObjectStore]) -> None:
        self.replicas = replicas
        self.url = " + ".join(r.url for r in replicas)

    def put(self, key: str, data: bytes | list[bytes]) -> None:
        for replica in self.replicas:
            replica.put(key, data)  # a failure fails the upload: the client retries, nothing half-acknowledged

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        last: Exception | None = None
        unverified: bytes | None = None
        for replica in self.replicas:
            try:
                if offset == 0 and length is None:
                    data = replica.get(key)
                    if _verifies(key, data):
                        return data
                    log.warning("replica %s holds a damaged copy of %s; reading another", replica.url, key)
                    unverified = data if unverified is None else unverified
                    continue
                return replica.get(key, offset, length)  # ranges are authenticated by the client's AEAD
            except ObjectNotFound as exc:
                last = exc
            except Exception as exc:  # an unhealthy replica: fall back to the next
                log.warning("replica %s failed reading %s: %s", replica.url, key, exc)
                last = exc
        if unverified is not None:
            return unverified  # no replica verifies: serve one anyway; the client checks it and reports the damage
        if isinstance(last, ObjectNotFound) or last is None:
            raise ObjectNotFound(key)
        raise last

    def size(self, key: str) -> int | None:
        for replica in self.replicas:
            try:
                size = replica.size(key)
            except Exception as exc:
                log.warning("replica %s failed: %s", replica.url, exc)
                continue
            if size is not None:
                return size
        return None

    def delete(self, key: str) -> bool:
        deleted = False
        for replica in self.replicas:
            deleted = replica.delete(key) or deleted
        return deleted

    def keys(self, prefix: str = "") -> Iterator[str]:
        seen: set[str] = set()
        for replica in self.replicas:
            seen.update(replica.keys(prefix))
        yield from sorted(seen)

    def heal(self, key: str) -> tuple[bool, list[str]]:
        """(a good copy exists, the replicas re-copied from it)."""
        good: bytes | None = None
        bad = []
        for replica in self.replicas:
            try:
                data = replica.get(key)
            except Exception:
                bad.append(replica)
                continue
            if _verifies(key, data):
                good = good if good is not None else data
            else:
                bad.append(replica)
        if good is None:
            return False, []
        for replica in bad:
            replica.put(key, good)
        return True, [r.url for r in bad]
