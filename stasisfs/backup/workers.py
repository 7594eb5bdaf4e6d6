"""Chunking worker processes: read, cut, hash, dedup-check, compress and seal, off the main GIL.

Each worker process derives its own `Cipher`, so it seals under its own random session
id: nonces can never collide with another process's. Workers open the LMDB index
themselves (never inherited across a fork) only to skip chunks already stored; the
parent still makes the final dedup decision when it packs the returned boxes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stasisfs.format.chunker import Chunker
from stasisfs.format.crypto import Cipher, MasterKeys
from stasisfs.repo.index import Index
from stasisfs.repo.packer import ChunkSealer
from stasisfs.system.fsmeta import read_xattrs
from stasisfs.system.pools import WorkerContext, exit_with_parent

O_NOATIME = getattr(os, "O_NOATIME", 0)
SEEN_LIMIT = 65536  # chunk ids a worker remembers sealing: bounded, so memory does not grow with the tree


@dataclass
class FileResult:
    content: list[bytes] = field(default_factory=list)
    size: int = 0
    new_blobs: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # chunk id, sealed box, plaintext length
    error: str | None = None
    changed: bool = False
    xattrs: dict[bytes, bytes] = field(default_factory=dict)  # read through the open file: the walk leaves them to the reader


def open_for_backup(path: bytes) -> int:
    try:
        return os.open(path, os.O_RDONLY | O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # O_NOATIME is only allowed to the owner


class ChunkWorker:
    def __init__(self, master: bytes, repo_id: bytes, index: Index, verify: bool) -> None:
        self.keys = MasterKeys(master, repo_id)
        self.sealer = ChunkSealer(Cipher(self.keys), verify)  # a fresh session id: nonces never collide
        self.chunker = Chunker(self.keys.chunker_seed)
        self.index = index
        self.seen: set[bytes] = set()

    def process(self, path: bytes, size: int, mtime_ns: int) -> FileResult:
        result = FileResult()
        try:
            fd = open_for_backup(path)
        except OSError as exc:
            result.error = f"cannot read {os.fsdecode(path)}: {exc.strerror}; skipped"
            return result
        try:
            result.xattrs = read_xattrs(fd)
            for data in self.chunker.cut(lambda view: os.readv(fd, [view])):
                chunk_id = self.keys.chunk_id_of(data)
                result.content.append(chunk_id)
                result.size += len(data)
                if chunk_id in self.seen or self.index.has_chunk(chunk_id):
                    continue
                if len(self.seen) >= SEEN_LIMIT:
                    self.seen.clear()  # only saves sealing a repeat twice; the parent's claim decides
                self.seen.add(chunk_id)
                result.new_blobs.append((chunk_id, self.sealer.seal(chunk_id, data), len(data)))
            after = os.fstat(fd)
        except OSError as exc:
            result.error = f"cannot read {os.fsdecode(path)}: {exc.strerror}; skipped"
            return result
        finally:
            os.close(fd)
        result.changed = (after.st_mtime_ns, after.st_size) != (mtime_ns, size) or result.size != size
        return result


_context: WorkerContext[Index, ChunkWorker] = WorkerContext()


def init_worker(master: bytes, repo_id: bytes, index_path: str, verify: bool) -> None:
    """Initializer for a worker process, or for a worker thread when processes are unavailable."""
    exit_with_parent()
    index = _context.shared(lambda: Index(Path(index_path), probe_first=False), lambda shared: str(shared.path) == index_path)
    _context.start(ChunkWorker(master, repo_id, index, verify))


def use_index_in_threads(index: Index) -> None:
    """Share the parent's open index with worker threads (LMDB forbids opening it twice in a process)."""
    _context.share(index)


def process_files(jobs: list[tuple[bytes, int, int]]) -> list[FileResult]:
    worker = _context.worker
    return [worker.process(*job) for job in jobs]
