"""Packs being written: a temp file in `data/` beside a journal of sealed entry batches, and
finding the ones killed runs left behind (which `packer.salvage_open_packs` seals)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from stasisfs.errors import StasisError
from stasisfs.repo.storage import TEMP_PREFIX, fsync_dir, write_all, writer_alive

if TYPE_CHECKING:
    from stasisfs.repo.repository import Repository


class PackFile:
    """An open pack spooled to a temp file in `data/`; renamed to its id once sealed.

    Beside it, a journal of sealed entry batches (`BlobWriter.journal`) lets the next run
    salvage what a killed run had packed (`salvage_open_packs`).
    """

    def __init__(self, repo: Repository, tmp: Path | None = None, fd: int | None = None) -> None:
        """A new temp pack; or, given both, one already open (see `adopt`)."""
        self.repo = repo
        if tmp is None or fd is None:
            tmp = repo.path / "data" / f"{TEMP_PREFIX}pack-{secrets.token_hex(8)}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.tmp, self.fd = tmp, fd
        self.journal_path = journal_path_of(tmp)
        self._journal_fd: int | None = None

    @classmethod
    def adopt(cls, repo: Repository, tmp: Path, length: int) -> PackFile:
        """Take over a dead writer's temp pack, cut to its first `length` bytes, to finish and commit it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(fd, length)
        os.lseek(fd, length, os.SEEK_SET)
        return cls(repo, tmp, fd)

    def _write_all(self, fd: int, data: bytes) -> None:
        try:
            write_all(fd, data)
        except OSError as exc:
            self.discard()
            if exc.errno == errno.ENOSPC:
                raise StasisError(f"no space left on the device holding {self.repo.path}; nothing was lost, free some space and run again") from None
            raise

    def write(self, data: bytes) -> None:
        self._write_all(self.fd, data)

    def journal(self, record: bytes) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._write_all(self._journal_fd, record)

    def _drop_journal(self) -> None:
        if self._journal_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._journal_fd)
            self._journal_fd = None
            self.journal_path.unlink(missing_ok=True)

    def commit(self, pack_id: bytes) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        final = self.repo.pack_path(pack_id)
        os.replace(self.tmp, final)
        fsync_dir(final.parent)
        self._drop_journal()  # only now: a journal whose temp pack is gone is swept as junk

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.tmp.unlink(missing_ok=True)
        self._drop_journal()


def journal_path_of(pack_tmp: Path) -> Path:
    return pack_tmp.with_name(pack_tmp.name.replace("pack-", "journal-", 1))


def discard_open_packs_of(repo: Repository, pids: set[int]) -> None:
    """Drop the temp packs and journals these (finished) writer processes left: a failed run's, not a killed one's."""
    suffixes = {str(pid) for pid in pids}
    for entry in os.scandir(repo.path / "data"):
        if entry.name.startswith((f"{TEMP_PREFIX}pack-", f"{TEMP_PREFIX}journal-")) and entry.name.rsplit(".", 1)[-1] in suffixes:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def abandoned_open_packs(repo: Repository) -> list[tuple[Path, Path]]:
    """(temp pack, its journal) pairs left by killed runs."""
    found = []
    for entry in os.scandir(repo.path / "data"):
        if entry.name.startswith(f"{TEMP_PREFIX}pack-") and not writer_alive(entry.name):
            tmp = Path(entry.path)
            journal = journal_path_of(tmp)
            if journal.exists():
                found.append((tmp, journal))
    return found
