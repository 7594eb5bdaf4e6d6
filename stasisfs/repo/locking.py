"""Repository locks: sealed files under `locks/`, refreshed while held.

A lock is stale when its process is gone (same host, same boot) or the host
rebooted since (boot id differs), or, for another host, when it has not been
refreshed for `STALE_AFTER` seconds. Stale locks are removed, not obeyed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import threading
import time
from pathlib import Path

from stasisfs.errors import IntegrityError, RepositoryLocked
from stasisfs.format.crypto import KIND_LOCK
from stasisfs.repo.repository import Repository, hostname, pad_small, unpad_small
from stasisfs.repo.storage import process_alive, write_atomic

REFRESH_EVERY = 300
STALE_AFTER = 1800


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class RepositoryLock:
    """Exclusive writer lock. Use as a context manager."""

    def __init__(self, repo: Repository, purpose: str, wait: float = 0) -> None:
        self.repo = repo
        self.purpose = purpose
        self.wait = wait  # seconds to wait for another run's lock before giving up
        self.name = secrets.token_hex(32)
        self.path = repo.path / "locks" / self.name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        doc = {"host": hostname(), "pid": os.getpid(), "boot_id": boot_id(), "time": time.time(), "purpose": self.purpose}
        return self.repo.cipher.seal(pad_small(json.dumps(doc).encode()), KIND_LOCK)

    def _others(self) -> list[tuple[Path, dict[str, object] | None]]:
        result = []
        for entry in os.scandir(self.repo.path / "locks"):
            if entry.name == self.name or entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                doc = json.loads(unpad_small(self.repo.cipher.open(path.read_bytes(), KIND_LOCK)))
            except FileNotFoundError:
                continue
            except (IntegrityError, ValueError):
                doc = None  # unreadable: treated as stale
            result.append((path, doc))
        return result

    @staticmethod
    def is_stale(doc: dict[str, object] | None) -> bool:
        if doc is None:
            return True
        if doc.get("host") == hostname():
            return doc.get("boot_id") != boot_id() or not process_alive(int(str(doc.get("pid", 0))))
        return time.time() - float(str(doc.get("time", 0))) > STALE_AFTER

    def _check_others(self) -> None:
        for path, doc in self._others():
            if self.is_stale(doc):
                path.unlink(missing_ok=True)
                continue
            assert doc is not None
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(doc["time"]))))
            raise RepositoryLocked(
                f"repository is locked by {doc.get('purpose', 'another run')} (PID {doc.get('pid')} on {doc.get('host')}, "
                f"refreshed {since}); try again when it finishes"
            )

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self._try_acquire()
                break
            except RepositoryLocked:
                if time.monotonic() >= deadline:
                    raise
                # Two waiters that raced each other both back off; a random pause lets one win next time.
                time.sleep(max(0.0, min(deadline - time.monotonic(), random.uniform(0.2, 1.0))))
        self._thread = threading.Thread(target=self._refresh, name="lock-refresh", daemon=True)
        self._thread.start()

    def _try_acquire(self) -> None:
        self._check_others()
        write_atomic(self.path, self._record())
        try:
            self._check_others()  # someone raced us between the check and the write
        except RepositoryLocked:
            self.path.unlink(missing_ok=True)
            raise

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            with contextlib.suppress(Exception):
                write_atomic(self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
