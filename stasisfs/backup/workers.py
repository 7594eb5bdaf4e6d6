"""Chunking worker processes: read, cut, hash, dedup-check, compress, seal and pack, off the main GIL.

Each worker process derives its own `Cipher`, so it seals under its own random session
id: nonces can never collide with another process's. Workers open the LMDB index
themselves (never inherited across a fork).

A batch is handled one of two ways, as the parent asks:
- *returned*: the sealed boxes go back to the parent, which packs them with everything
  else of the run. A small run (an hourly edit) then writes one pack, not one per process.
- *packed here*: the worker packs the boxes itself, into its own open packs, and indexes
  them; only chunk ids go back. Past the first few MiB of a run this is what it does, so
  the parent is not the bottleneck of a big backup. Each worker has its own queue and
  a file goes to the one its size picks: copies of a file meet in one worker, which
  stores them once (two workers would each store a copy the other has not indexed yet:
  2% of the bench tree). The worker journals its open packs
  before it answers (a killed run's successor salvages them), and makes them durable
  every `FLUSH_EVERY` seconds; the parent writes a directory record only once every
  worker that stored part of it has flushed since (see `pipeline.Backup._checkpoint`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rbloom import Bloom

from stasisfs.format.chunker import CHUNK_MIN, Chunker
from stasisfs.format.crypto import Cipher
from stasisfs.format.pack import BLOB_DATA
from stasisfs.repo.packer import BlobWriter, ChunkSealer
from stasisfs.repo.repository import Repository
from stasisfs.system.crashpoints import tuned
from stasisfs.system.fsmeta import read_xattrs
from stasisfs.system.kernel import release_free_heap
from stasisfs.system.pools import WorkerContext

O_NOATIME = getattr(os, "O_NOATIME", 0)
SEEN_LIMIT = 65536  # chunk ids a worker remembers sealing: bounded, so memory does not grow with the tree
SMALL_FILES_EXPECTED = 2_000_000  # the whole small files a worker's Bloom filter is sized for (2.4 MB at 1% false positives)


TRIM_EVERY = 0.25  # seconds between returns of a worker's free heap to the kernel (a trim costs about 0.1 ms)
FLUSH_EVERY = tuned("worker-flush", 2.0)  # seconds between making a worker's own packs durable (the parent's directory records wait for it)


@dataclass(slots=True)
class FileResult:
    content: list[bytes] = field(default_factory=list)
    size: int = 0
    new_blobs: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # returned batches: chunk id, sealed box, plaintext length
    added: int = 0  # packed-here batches: plaintext bytes the worker stored (new to the repository)
    stored: int = 0  # and the sealed bytes they took
    error: str | None = None
    changed: bool = False
    xattrs: dict[bytes, bytes] = field(default_factory=dict)  # read through the open file: the walk leaves them to the reader

    def __reduce__(self) -> tuple[type[FileResult], tuple[object, ...]]:
        # Positional fields: a tenth of the default (slots) pickling cost, paid per file on both sides of the pipe.
        return FileResult, (self.content, self.size, self.new_blobs, self.added, self.stored, self.error, self.changed, self.xattrs)


@dataclass(slots=True)
class BatchDone:
    files: list[FileResult]
    worker: tuple[int, int]  # process id, thread id
    flushed_at: float  # monotonic time this worker's packs were last made durable (blobs sealed before it are safe)
    settled: bool  # nothing this worker packed waits in an open pack or for an index object


def open_for_backup(path: bytes) -> int:
    try:
        return os.open(path, os.O_RDONLY | O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # O_NOATIME is only allowed to the owner


class ChunkWorker:
    def __init__(self, repo: Repository, verify: bool, dry_run: bool) -> None:
        self.keys = repo.master_keys
        self.sealer = ChunkSealer(Cipher(self.keys), verify)  # a fresh session id: nonces never collide
        self.chunker = Chunker(self.keys.chunker_seed)
        self.index = repo.index
        self.writer = BlobWriter(repo, dry_run=dry_run, verify=verify)  # packs nothing until a batch is packed here
        self.flushed_at = self.trimmed_at = time.monotonic()
        self.seen: set[bytes] = set()
        # The whole small files this worker stored this run. Every copy of a small file comes to the worker
        # its size picks, so when the index held no chunk as the run began, a small file not in here is new,
        # and is not looked up: at random over the index, each lookup maps 64 KiB of it (a worker's memory
        # grew with the index). Past the expected count false positives rise, and lookups come back.
        self.small_files_stored = Bloom(SMALL_FILES_EXPECTED, 0.01)

    def process(self, path: bytes, size: int, mtime_ns: int, pack_here: bool, index_was_empty: bool = False) -> FileResult:
        result = FileResult()
        try:
            fd = open_for_backup(path)
        except OSError as exc:
            result.error = f"cannot read {os.fsdecode(path)}: {exc.strerror}; skipped"
            return result
        try:
            result.xattrs = read_xattrs(fd)
            stored_before = self.writer.bytes_added
            for data in self._chunks(fd, size):
                chunk_id = self.keys.chunk_id_of(data)
                whole_small_file = not result.content and len(data) < CHUNK_MIN  # cut by the file's end, not by content
                result.content.append(chunk_id)
                result.size += len(data)
                known_new = False
                if whole_small_file:
                    known_new = index_was_empty and chunk_id not in self.small_files_stored
                    self.small_files_stored.add(chunk_id)
                if pack_here:
                    if self.writer.add(chunk_id, BLOB_DATA, data, content_defined=not whole_small_file, known_new=known_new):
                        result.added += len(data)
                    continue
                if chunk_id in self.seen or (not known_new and self.index.has_chunk(chunk_id)):
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
        result.stored = self.writer.bytes_added - stored_before
        result.changed = (after.st_mtime_ns, after.st_size) != (mtime_ns, size) or result.size != size
        return result

    def _chunks(self, fd: int, size: int) -> Iterable[bytes | memoryview]:
        if size < CHUNK_MIN:  # most files: one read, one chunk, none of the chunker's window
            data = os.read(fd, size + 1)
            if len(data) <= size:  # a short read of a regular file means end of file
                return (data,) if data else ()
            os.lseek(fd, 0, os.SEEK_SET)  # it grew since it was listed: cut it as it is now
        return self.chunker.cut(lambda view: os.readv(fd, [view]))

    def settle(self) -> None:
        """After a packed-here batch: journal the open packs, and make them durable now and then."""
        self.index.release_mapped_pages()  # its dedup probes map index pages, and a probe writes nothing
        started = time.monotonic()
        if started - self.trimmed_at >= TRIM_EVERY:
            release_free_heap()  # pack buffers, padding and headers freed since: 5 MB a worker
            self.trimmed_at = started
        if started - self.flushed_at >= FLUSH_EVERY:
            self.writer.flush()
            self.flushed_at = started  # everything sealed before `started` is in a durable pack now
        else:
            self.writer.journal()


_context: WorkerContext[Repository, ChunkWorker] = WorkerContext()


def init_worker(master: bytes, repo_path: str, index_path: str, verify: bool, dry_run: bool) -> None:
    """Initializer for a worker process (which `workerprocess.serve` set up to exit with the parent), or for a worker thread."""
    repo = _context.shared(lambda: Repository.for_worker(Path(repo_path), master, Path(index_path)),
                           lambda shared: str(shared.index.path) == index_path)
    _context.start(ChunkWorker(repo, verify, dry_run))


def use_repository_in_threads(repo: Repository) -> None:
    """Share the parent's open repository with worker threads (LMDB forbids opening its index twice in a process)."""
    _context.share(repo)


def process_files(jobs: list[tuple[bytes, int, int]], pack_here: bool, index_was_empty: bool = False) -> BatchDone:
    worker = _context.worker
    files = [worker.process(path, size, mtime_ns, pack_here, index_was_empty) for path, size, mtime_ns in jobs]
    if pack_here:
        worker.settle()
    return BatchDone(files, worker_id(), worker.flushed_at, worker.writer.settled())


def worker_id() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def flush_worker() -> tuple[int, int]:
    """The end of a run: write this worker's open packs and their index object; raises if that failed (a full disk, say)."""
    _context.worker.writer.flush()
    return worker_id()
