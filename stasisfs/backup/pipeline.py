"""Backup: walk -> files cache -> chunk -> dedup -> pack, then trees, then the snapshot.

The walk runs on the calling thread; changed small files are read, cut, hashed,
compressed, sealed and (past a run's first few MiB) packed in batches by worker
processes (`workers.py`; `workerprocess.py`: spawned, each with its own GIL and session key;
threads where processes cannot start), and large files by a thread pool (blake3,
zstd, AES-GCM and file reads release the GIL). Trees are written bottom-up once their children are known. Order of durability: packs, index objects, snapshot.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import BinaryIO

import blake3

from stasisfs.backup.presign import MOUNT_POINT, ReverseSigner, Signed
from stasisfs.backup.walk import WalkRules, holds_cachedir_tag, options_fingerprint, signed_stat
from stasisfs.backup.workers import (
    BatchDone,
    FileResult,
    flush_worker,
    init_worker,
    open_for_backup,
    process_files,
    use_repository_in_threads,
)
from stasisfs.format.chunker import CHUNK_MIN, Chunker, ReadInto
from stasisfs.format.pack import BLOB_DATA, BLOB_TREE
from stasisfs.format.snapshot import Snapshot, Summary
from stasisfs.format.tree import DIR, FILE, Node, encode_tree, split_path
from stasisfs.progress import Counters
from stasisfs.repo.index import file_record
from stasisfs.repo.packer import BlobWriter
from stasisfs.repo.packfile import discard_open_packs_of
from stasisfs.repo.repository import Repository
from stasisfs.system.crashpoints import crash_point, tuned
from stasisfs.system.fsmeta import node_from_stat, read_xattrs
from stasisfs.system.pools import Answer, StartingWorker, TaskRunner, process_ids
from stasisfs.system.workerprocess import WorkerProcess

LARGE_FILE = 16 * 1024 * 1024  # larger files stream through a parent thread instead of a worker process
# How far the walk runs ahead of the trees written: enough to keep workers fed, little enough to bound memory.
CHECKPOINT_EVERY = tuned("checkpoint", 0.25)  # seconds between saves of the files cache (and the open packs' journals) during a run,
CHECKPOINT_BYTES = 32 << 20  # or this much file data, whichever comes first
DIR_CHECKPOINT_EVERY = tuned("dir-checkpoint", 2.0)  # directory records too, less often: each one first makes the open packs durable
SEAL_AHEAD = 6  # chunks of one large file hashed, compressed and sealed at once (threads: those release the GIL)
MAX_PENDING_ITEMS = 4096  # entries walked ahead of the oldest unwritten tree (their boxes are bounded by bytes)
MAX_PENDING_BYTES = 12 * 1024 * 1024
MAX_PENDING_DIRS = 1024
SIZE_SPREAD = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive sizes land far apart
ROUTES_KEPT = 65536  # sizes of larger files remembered, and the worker each went to
# While the oldest tree waits on one worker and another has nothing left to do, the walk goes on
# to feed it, up to this many times the limits above.
WALK_ON_WHILE_IDLE = 4
# The parent packs what workers seal until a run has sent them this much: a small run (an hourly
# edit) then writes one pack with its trees. Past it, each worker packs what it seals itself.
PARENT_PACKS_FIRST = int(tuned("parent-packs-first", 4 * 1024 * 1024))


@dataclass
class BackupOptions:
    paths: list[bytes]
    excludes: list[str] = field(default_factory=list)
    exclude_caches: bool = False
    one_file_system: bool = False
    tags: list[str] = field(default_factory=list)
    time: datetime | None = None
    dry_run: bool = False
    workers: int = int(tuned("workers", max(2, min(4, os.cpu_count() or 2))))


class Backup:
    def __init__(self, repo: Repository, options: BackupOptions, counters: Counters | None = None,
                 warn: Callable[[str], None] | None = None, presigned: ReverseSigner | None = None,
                 spawned: list[WorkerProcess] | None = None) -> None:
        self.repo = repo
        self.options = options
        self.counters = counters or Counters()
        self.warnings: list[str] = []
        self._warn_sink = warn
        # Set by a signal handler: the walk stops at its next entry (never mid-call into a pool, which could deadlock it).
        self.stop = threading.Event()
        self.writer = BlobWriter(repo, dry_run=options.dry_run)
        self.summary = Summary()
        self._summary_lock = threading.Lock()
        self.keys = repo.master_keys
        self.index = repo.index
        # Its first open may probe it in a child process (after a killed run): meanwhile, not on the walk's path.
        threading.Thread(target=self._open_files_cache, name="backup-files-cache", daemon=True).start()
        self._chunkers = threading.local()
        # Records not yet written (encoded), kept only until a checkpoint: memory stays flat over the run.
        self._file_records: list[tuple[bytes, bytes]] = []  # written once the packs are safe
        self._records_saved = 0  # how many checkpoints wrote so far
        self._path_keys: dict[bytes, bytes] = {}  # files being read -> keyed path hash, computed once
        self._files_cache_empty = False  # a first backup: no file can be unchanged, so none is looked up
        self._index_was_empty = False  # no chunk stored as the run began: workers need not look up new small files
        self._legacy_files = False  # a files cache from before records were grouped by directory: read, then dropped
        self._last_checkpoint = time.monotonic()
        self._bytes_since_checkpoint = 0
        self._dir_records: list[tuple[bytes, bytes]] = []  # dir key -> signature | tree id, likewise
        # Directory records waiting for workers' packs: (taken at, workers whose open packs they need, records).
        self._dirs_waiting: deque[tuple[float, frozenset[tuple[int, int]], list[tuple[bytes, bytes]]]] = deque()
        self._dirs_recorded = 0
        self._unsettled_workers: set[tuple[int, int]] = set()  # workers whose last answer left blobs in open packs
        self._worker_flushed: dict[tuple[int, int], float] = {}  # worker -> when its packs were last made durable
        self._sent_to_workers = 0  # file bytes sent in batches so far
        self._stored_by_workers = 0  # bytes of sealed blobs the workers packed themselves
        self._last_dir_checkpoint = time.monotonic()
        self._options_fingerprint = options_fingerprint(options.excludes, options.exclude_caches, options.one_file_system)
        self._hardlinks: dict[tuple[int, int], Future[Node | None] | PendingFile] = {}
        self._jobs: deque[DirJob] = deque()
        # One queue and one single-worker pool per worker: a file goes to the worker its size picks, so copies
        # of a file (same size) meet in one worker, which stores them once (workers pack what they seal).
        self._batches = [BatchQueue(self, worker) for worker in range(options.workers)]
        self._in_flight = [0] * options.workers  # batches sent to each worker and not answered yet
        self._load = [0] * options.workers  # file bytes given to each worker and not answered yet
        self._routes: dict[int, int] = {}  # size -> worker, for files past one chunk: copies meet in one worker
        self._procs: list[TaskRunner] | None = None
        self._starting: list[StartingWorker] | None = None  # spawned early for a resumed run
        self._sealers = ThreadPoolExecutor(options.workers, thread_name_prefix="backup-seal")  # threads start on first use
        self._pending_items = 0
        self._pending_bytes = 0
        self._procs_lock = threading.Lock()
        self._worker_pids: set[int] = set()
        self.rules = WalkRules(options.excludes, options.one_file_system, repo.path)  # now that the cache exists
        self._begun = False
        self._presigned = presigned
        self._spawned = list(spawned or [])  # worker processes started before the key was derived, adopted as the workers

    def _open_files_cache(self) -> None:
        with contextlib.suppress(Exception):  # the walk's own first use reports what is wrong
            self.index.open_files_cache()

    # --- reporting ---
    @property
    def bytes_stored(self) -> int:
        """Sealed bytes this run added to packs (compressed and encrypted), wherever they were packed."""
        return self.writer.bytes_added + self._stored_by_workers

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self._warn_sink is not None:
            self._warn_sink(message)

    # --- content ---
    def _chunker(self) -> Chunker:
        chunker = getattr(self._chunkers, "chunker", None)
        if chunker is None:
            chunker = self._chunkers.chunker = Chunker(self.keys.chunker_seed)
        return chunker

    def _store_chunk(self, data: bytes | memoryview) -> bytes:
        chunk_id = self.keys.chunk_id_of(data)
        if self.writer.add(chunk_id, BLOB_DATA, data):
            with self._summary_lock:
                self.summary.data_added += len(data)
        return chunk_id

    def store_stream(self, readinto: ReadInto) -> tuple[list[bytes], int]:
        """Cut a stream in order; its chunks are sealed on several threads, a bounded number at a time."""
        content: list[bytes] = []
        size = 0
        sealing: deque[Future[bytes]] = deque()
        for data in self._chunker().cut(readinto):
            sealing.append(self._sealers.submit(self._store_chunk, bytes(data)))  # the cutter reuses its window
            size += len(data)
            self.counters.add(nbytes=len(data))
            if len(sealing) >= SEAL_AHEAD:
                content.append(sealing.popleft().result())
        content.extend(future.result() for future in sealing)
        return content, size

    def _read_file(self, path: bytes, node: Node, st: os.stat_result) -> Node | None:
        """Large files, in a parent thread: streamed chunk by chunk, so memory stays bounded."""
        result = FileResult()
        try:
            fd = open_for_backup(path)
        except OSError as exc:
            result.error = f"cannot read {os.fsdecode(path)}: {exc.strerror}; skipped"
            return self._complete(path, node, st, result)
        try:
            result.xattrs = read_xattrs(fd)
            result.content, result.size = self.store_stream(lambda view: os.readv(fd, [view]))
            after = os.fstat(fd)
            result.changed = (after.st_mtime_ns, after.st_size) != (st.st_mtime_ns, st.st_size) or result.size != st.st_size
        except OSError as exc:
            result.error = f"cannot read {os.fsdecode(path)}: {exc.strerror}; skipped"
        finally:
            os.close(fd)
        return self._complete(path, node, st, result, counted=True)

    def _complete(self, path: bytes, node: Node, st: os.stat_result, result: FileResult, counted: bool = False) -> Node | None:
        """Fold a file's chunking result into the snapshot (parent side): pack new blobs, note the file."""
        path_key = self._path_keys.pop(path, None)
        if result.error is not None:
            self.warn(result.error)
            return None
        whole_small_file = max(st.st_size, result.size) < CHUNK_MIN  # one chunk, cut by the file's end, not by content
        added = result.added
        self._stored_by_workers += result.stored
        for chunk_id, box, raw_length in result.new_blobs:
            if self.writer.add_sealed(chunk_id, BLOB_DATA, box, raw_length, content_defined=not whole_small_file):
                added += raw_length
        if added:
            with self._summary_lock:
                self.summary.data_added += added
        node.content, node.size, node.xattrs = result.content, result.size, result.xattrs
        if result.changed:
            self.warn(f"{os.fsdecode(path)} changed while it was being read; the snapshot holds what was read")
        else:
            self._record_file(path_key or self._record_key(path), st, node.content, result.size)
        self.counters.add(files=1, nbytes=0 if counted else result.size)
        return node

    def _record_file(self, key: bytes, st: os.stat_result, content: list[bytes], nbytes: int) -> None:
        self._file_records.append((key, file_record(st, content)))
        self._checkpoint(nbytes)

    def _checkpoint(self, nbytes: int) -> None:
        """Save the files cache as the run goes, so a killed run's successor skips what it finished.

        Safe before the packs are: a record counts only while all its chunks are in the index, and a
        chunk enters the index only once its pack is durable (see `Index.unchanged_content`), or once
        the next run salvaged it from this run's open packs (`salvage_open_packs`).
        """
        now = time.monotonic()
        self._bytes_since_checkpoint += nbytes
        if self.options.dry_run or (now - self._last_checkpoint < CHECKPOINT_EVERY and self._bytes_since_checkpoint < CHECKPOINT_BYTES):
            return
        self._last_checkpoint, self._bytes_since_checkpoint = now, 0
        batch, self._file_records = self._file_records, []
        self._records_saved += len(batch)
        self.writer.journal()  # the blobs behind these records become salvageable
        self.index.put_file_records(batch)
        crash_point("backup-checkpointed", self._records_saved)
        if now - self._last_dir_checkpoint >= DIR_CHECKPOINT_EVERY and not self.warnings and self._dir_records:
            # A directory record names a tree whose whole subtree must be stored: make every blob written
            # so far durable first (closing the open packs early), then the records are safe to keep.
            # Blobs workers packed themselves are durable once each of those workers has flushed since.
            self._last_dir_checkpoint = now
            self.writer.flush()
            dirs, self._dir_records = self._dir_records, []
            self._dirs_waiting.append((now, frozenset(self._unsettled_workers), dirs))
        self._keep_durable_dir_records()

    def _keep_durable_dir_records(self) -> None:
        while self._dirs_waiting:
            taken_at, workers, dirs = self._dirs_waiting[0]
            if any(self._worker_flushed.get(w, -1.0) < taken_at for w in workers):
                return
            self._dirs_waiting.popleft()
            self.index.put_file_records(dirs, scattered=True)
            self._dirs_recorded += len(dirs)
            crash_point("backup-dirs-recorded", self._dirs_recorded)

    def _batch_done(self, done: BatchDone) -> None:
        if done.settled:
            self._unsettled_workers.discard(done.worker)
        else:
            self._unsettled_workers.add(done.worker)
        self._worker_flushed[done.worker] = done.flushed_at

    def _route(self, size: int) -> BatchQueue:
        """The worker a file goes to: always the same for one size, so copies of a file meet in one worker.

        Small files spread by a multiplicative hash of their size (sizes' parity is uneven: 1.05:1 on the bench
        tree); the first file of a larger size goes to the worker with the fewest bytes to do, since a few
        such files are most of a tree's bytes and any fixed rule split the bench tree's 2:3.
        """
        if size < CHUNK_MIN:
            return self._batches[((size * SIZE_SPREAD) & 0xFFFF_FFFF_FFFF_FFFF) * len(self._batches) >> 64]
        worker = self._routes.get(size)
        if worker is None:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()  # only copies met after this may be stored twice
            worker = self._routes[size] = min(range(len(self._load)), key=self._load.__getitem__)
        return self._batches[worker]

    def _feed_idle_workers(self) -> None:
        """Before the walk waits on one worker: send the others' partial batches, if they have nothing to do."""
        for queue in self._batches:
            batch = queue.current
            if not self._in_flight[queue.worker] and batch.jobs and not batch.sent:
                batch.submit()

    def _flush_workers(self) -> None:
        """The end of a run: every worker holding blobs in open packs (or packs not in an index object) writes them."""
        if not self._unsettled_workers:
            return
        for future in [pool.submit(flush_worker) for pool in self.procs]:
            self._unsettled_workers.discard(future.result())
        assert not self._unsettled_workers, "every worker flushed"

    # --- the walk ---
    def _record_key(self, path: bytes, dir_key: bytes | None = None) -> bytes:
        """A file's files-cache key: a prefix of its directory's key, then its own path hash.

        A directory's records then sit together in the index: the walk touches a few index pages per
        directory instead of one per file (3-4x less CPU per record, and far fewer mapped pages).
        """
        if dir_key is None:
            dir_key = self.keys.path_key(b"dir\0" + os.path.dirname(path))
        return dir_key[:8] + self.keys.path_key(path)[:24]

    def _file_node(self, pool: ThreadPoolExecutor, path: bytes, node: Node, st: os.stat_result, dir_key: bytes | None = None) -> PendingItem:
        path_key = self._record_key(path, dir_key)
        legacy_key = self.keys.path_key(path) if self._legacy_files else None
        known, content = (False, None) if self._files_cache_empty else self.index.unchanged_content(path_key, st, legacy_key)
        if content is not None:
            if self._legacy_files:  # recorded again under its grouped key: the old records go after this run
                self._record_file(path_key, st, content, 0)
            node.content, node.xattrs = content, read_xattrs(path)
            with self._summary_lock:
                self.summary.files_unmodified += 1
            self.counters.add(files=1, nbytes=st.st_size)
            return node
        with self._summary_lock:
            if known:
                self.summary.files_changed += 1
            else:
                self.summary.files_new += 1
        self._path_keys[path] = path_key
        key = node.hardlink_key
        if key is not None and key in self._hardlinks:
            return LinkedFile(self, self._hardlinks[key], node, path, st)
        item: Future[Node | None] | PendingFile = (
            pool.submit(self._read_file, path, node, st) if st.st_size >= LARGE_FILE
            else self._route(st.st_size).add(path, node, st)
        )
        if key is not None:
            self._hardlinks[key] = item
        return item

    def _save_tree(self, nodes: list[Node]) -> bytes:
        data = encode_tree(nodes)
        tree_id = self.keys.chunk_id_of(data)
        if self.writer.add(tree_id, BLOB_TREE, data, content_defined=False):
            with self._summary_lock:
                self.summary.dirs_new += 1
        return tree_id

    def _save_dir(self, pool: ThreadPoolExecutor, path: bytes, dir_node: Node, root_dev: int) -> bytes:
        """Walk one real directory (subdirectories recursively) and queue its tree; returns its signature.

        The signature hashes every entry's stat (ctime moves on any content, mode, owner or
        xattr change) and the subdirectories' signatures. When it matches the one recorded
        with the directory's last tree, that tree is reused without building a node.
        """
        try:
            entries = list(os.scandir(path))  # trees are sorted when encoded
        except OSError as exc:
            self.warn(f"cannot list {os.fsdecode(path)}: {exc.strerror}; saved as empty")
            entries = []
        signed = [self._options_fingerprint]  # hashed at once: the same digest as hashing piece by piece
        walked: list[tuple[os.DirEntry[bytes], os.stat_result, Node | None]] = []
        spec = self.rules.spec
        stop = self.stop
        for entry in entries:
            if stop.is_set():
                raise KeyboardInterrupt
            try:
                st = entry.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(st.st_mode)
                if spec is not None and self.rules.excluded(entry.path, is_dir):
                    continue
                # A subdirectory's xattrs are read only if this directory's tree is rebuilt (below).
                dir_entry_node = node_from_stat(entry.name, entry.path, st, xattrs_later=True) if is_dir else None
            except OSError as exc:
                self.warn(f"cannot read {os.fsdecode(entry.path)}: {exc.strerror}; skipped")
                continue
            signed.append(signed_stat(entry.name, st))
            signed.append(entry.name)
            if dir_entry_node is not None:
                child_signature = self._subdir(pool, entry.path, dir_entry_node, st, root_dev)
                if child_signature is None:
                    continue  # its stat stays signed: a CACHEDIR.TAG appearing or going changes it
                signed.append(child_signature)
            walked.append((entry, st, dir_entry_node))
        digest = blake3.blake3(b"".join(signed)).digest()
        dir_key = self.keys.path_key(b"dir\0" + path)
        cached = self.index.cached_tree(dir_key, digest)
        if cached is not None:
            dir_node.subtree = cached  # its record stands as it is: nothing to write
            files = [st for _, st, n in walked if n is None and stat.S_ISREG(st.st_mode)]
            with self._summary_lock:
                self.summary.files_unmodified += len(files)
            self.counters.add(files=len(files), nbytes=sum(st.st_size for st in files))
            return digest
        pending: list[PendingItem] = []
        queued_bytes = 0
        for entry, st, dir_entry_node in walked:
            if dir_entry_node is not None:
                try:
                    dir_entry_node.xattrs = read_xattrs(entry.path)
                except OSError as exc:
                    self.warn(f"cannot read {os.fsdecode(entry.path)}: {exc.strerror}; skipped")
                    continue
                pending.append(dir_entry_node)
                continue
            try:
                node = node_from_stat(entry.name, entry.path, st, xattrs_later=stat.S_ISREG(st.st_mode))  # see _file_node
            except OSError as exc:
                self.warn(f"cannot read {os.fsdecode(entry.path)}: {exc.strerror}; skipped")
                continue
            if node.type == FILE:
                item = self._file_node(pool, entry.path, node, st, dir_key)
                if not isinstance(item, Node):
                    queued_bytes += st.st_size
                pending.append(item)
            else:
                pending.append(node)
        self._jobs.append(DirJob(dir_node, pending, queued_bytes, dir_key, digest))
        self._pending_items += len(pending)
        self._pending_bytes += queued_bytes
        self._drain(MAX_PENDING_ITEMS)
        return digest

    def _drain(self, max_pending: int) -> None:
        """Write queued trees, oldest first, until at most `max_pending` entries wait.

        Jobs are queued in post-order, so a tree is always written after the trees of its
        subdirectories; not waiting at each directory keeps the workers busy across them.
        """
        while self._jobs and self._pending_over(max_pending):
            if max_pending and not self._pending_over(max_pending, WALK_ON_WHILE_IDLE) and not self._wait_for(self._jobs[0]):
                return  # a worker ran out of work meanwhile: walk on, and feed it
            job = self._jobs.popleft()
            self._pending_items -= len(job.items)
            self._pending_bytes -= job.queued_bytes
            nodes = []
            for item in job.items:
                result = item if isinstance(item, Node) else item.result()
                if result is not None:
                    nodes.append(result)
            job.node.subtree = self._save_tree(nodes)
            if job.dir_key:
                self._dir_records.append((job.dir_key, job.signature + job.node.subtree))

    def _pending_over(self, max_pending: int, times: int = 1) -> bool:
        return (self._pending_items > max_pending * times or self._pending_bytes > MAX_PENDING_BYTES * times
                or len(self._jobs) > MAX_PENDING_DIRS * times)

    def _wait_for(self, job: DirJob) -> bool:
        """Wait until every entry of `job` is answered; False as soon as a worker process has nothing left to do.

        The walk then goes on instead, and feeds that worker: waiting here while it idles left one of two
        cores unused for a tenth of a first backup. With threads standing in for processes, just waits.
        """
        with self._procs_lock:
            procs = self._procs  # never started here: a run with nothing changed starts none
        workers = [runner for runner in procs or [] if isinstance(runner, WorkerProcess)]
        if not workers or len(workers) < len(procs or []):
            return True
        for item in job.items:
            if isinstance(item, PendingFile):
                item.batch.submit()  # once: nothing more comes to a batch the walk has left
        poller = select.poll()
        for worker in workers:
            poller.register(worker.answer_fd, select.POLLIN)
        first_waiting = 0
        while True:
            starving = [worker.read_arrived() for worker in workers]  # the walk fills its batch: a partial one costs a round trip
            while first_waiting < len(job.items) and is_answered(job.items[first_waiting]):
                first_waiting += 1
            if first_waiting == len(job.items):
                return True
            if any(starving):
                return False
            poller.poll(5)  # an answer, or a large file's thread finishing (polled)

    def _subdir(self, pool: ThreadPoolExecutor, path: bytes, node: Node, st: os.stat_result, root_dev: int) -> bytes | None:
        """Descend into a directory and return its signature; None to leave it out of the snapshot entirely."""
        if self.rules.skipped(path, st):
            return None
        if self.options.exclude_caches and holds_cachedir_tag(path):
            return None
        if self.options.one_file_system and st.st_dev != root_dev:
            node.subtree = self._save_tree([])  # keep the mount point, not what is mounted on it
            return MOUNT_POINT
        if self._presigned is not None:
            signed = self._presigned.take(path)
            if signed is not None and self._reuse_presigned(path, node, signed):
                return signed.signature
        return self._save_dir(pool, path, node, root_dev)

    def _reuse_presigned(self, path: bytes, node: Node, signed: Signed) -> bool:
        """Reuse the tree recorded under the helper's signature of this directory, if there is one."""
        cached = self.index.cached_tree(self.keys.path_key(b"dir\0" + path), signed.signature)
        if cached is None:
            return False
        node.subtree = cached
        with self._summary_lock:
            self.summary.files_unmodified += signed.files
        self.counters.add(files=signed.files, nbytes=signed.nbytes)
        return True

    def _save_path(self, pool: ThreadPoolExecutor, path: bytes) -> Node | None:
        """One backed-up path as a node (directories recursively)."""
        try:
            st = os.lstat(path)
            node = node_from_stat(os.path.basename(path) or b"/", path, st)
        except OSError as exc:
            self.warn(f"cannot read {os.fsdecode(path)}: {exc.strerror}; skipped")
            return None
        if node.type == DIR:
            return node if self._subdir(pool, path, node, st, st.st_dev) is not None else None
        if node.type == FILE:
            item = self._file_node(pool, path, node, st)
            return item if isinstance(item, Node) else item.result()
        return node

    def _build_root(self, pool: ThreadPoolExecutor, paths: list[bytes]) -> bytes:
        """A tree for `/` holding every backed-up path, with the real metadata of the directories above them."""

        def build(prefix: list[bytes], targets: list[list[bytes]]) -> list[Node]:
            by_name: dict[bytes, list[list[bytes]]] = {}
            for parts in targets:
                by_name.setdefault(parts[len(prefix)], []).append(parts)
            nodes = []
            for name, group in sorted(by_name.items()):
                here = [*prefix, name]
                full = b"/" + b"/".join(here)
                if any(len(parts) == len(here) for parts in group):
                    node = self._save_path(pool, full)
                else:
                    try:
                        node = node_from_stat(name, full, os.lstat(full))
                    except OSError as exc:
                        self.warn(f"cannot read {os.fsdecode(full)}: {exc.strerror}; skipped")
                        continue
                    children = build(here, group)
                    self._drain(0)
                    node.subtree = self._save_tree(children)
                if node is not None:
                    nodes.append(node)
            return nodes

        top = build([], [split_path(p) for p in paths])
        self._drain(0)
        return self._save_tree(top)

    def begin(self) -> None:
        """Mark the run as started in the index; after a killed run, start the workers at once (once).

        Called before a resume's salvage, so the workers start while it runs; `run` calls it otherwise.
        """
        if self._begun or self.options.dry_run:
            return
        self._begun = True
        if self.index.start_backup_run():
            # The last run was killed: its finished part is crossed quickly, so have the workers ready. They are
            # spawned here, on the main thread (see pools), and the wait for them runs while the salvage does.
            starting = self._start_workers()
            with self._procs_lock:
                self._starting = starting
            threading.Thread(target=lambda: self.procs, name="backup-start-workers", daemon=True).start()

    def run(self) -> Snapshot:
        started = time.monotonic()
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
        paths = normalize_paths(self.options.paths)
        self._files_cache_empty = self.index.files_empty()
        self._index_was_empty = self.index.chunk_count() == 0  # after a resume's salvage; see workers.py
        self._legacy_files = self.index.has_legacy_files()
        if self._presigned is not None:
            if self._files_cache_empty:
                self._presigned.stop()  # a first backup: no signature to reuse
            else:
                try:
                    self._presigned = self._presigned.fresh()
                except OSError:  # no process to spare now: the walk does it all
                    self._presigned = None
        self.begin()
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="backup-large") as pool:
                root = self._build_root(pool, paths)
            if self._presigned is not None:
                self._presigned.stop()
            return self._finish(root, paths, started)
        except BaseException:
            self.writer.abort()
            self._shutdown()  # the workers stop: their open packs can go too (a killed run's are salvaged instead)
            discard_open_packs_of(self.repo, {os.getpid(), *self._worker_pids})  # threads' packs carry the parent's pid
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._presigned is not None:
            self._presigned.stop()
        self._sealers.shutdown(cancel_futures=True)
        with self._procs_lock:  # waits for a pool still starting
            for pool in self._procs or []:
                pool.shutdown(cancel_futures=True)

    @property
    def procs(self) -> list[TaskRunner]:
        """The chunking workers, one pool each, started on first use: a run with nothing changed starts none."""
        with self._procs_lock:
            if self._procs is None:
                self._procs = [starting.ready() for starting in self._starting or self._start_workers()]
                self._worker_pids = process_ids(self._procs)
            return self._procs

    def _start_workers(self) -> list[StartingWorker]:
        """Worker processes (own GILs); threads when processes cannot be started here."""
        initargs = (self.keys.master, str(self.repo.path), str(self.index.path), self.writer.verify, self.options.dry_run)
        share = partial(use_repository_in_threads, self.repo)
        spawned, self._spawned = self._spawned, []
        return [StartingWorker(f"backup-{n}", init_worker, initargs, share, spawned.pop() if spawned else None)
                for n in range(self.options.workers)]

    def run_stdin(self, stream: BinaryIO, filename: str) -> Snapshot:
        started = time.monotonic()
        name = os.fsencode(filename.strip("/")) or b"stdin"
        try:
            content, size = self.store_stream(fill_from(stream))
        finally:
            self._shutdown()
        now = time.time_ns()
        node = Node(name=name, type=FILE, mode=0o644, uid=os.getuid(), gid=os.getgid(), mtime_ns=now, size=size, content=content)
        self.summary.files_new = 1
        root = self._save_tree([node])
        return self._finish(root, [b"/" + name], started)

    def _finish(self, root: bytes, paths: list[bytes], started: float) -> Snapshot:
        self.writer.flush()
        self._flush_workers()
        if not self.options.dry_run:
            self.index.put_file_records(self._file_records)
            for _, _, dirs in self._dirs_waiting:
                self.index.put_file_records(dirs, scattered=True)
            self._dirs_waiting.clear()
            if not self.warnings:  # a tree that left out an unreadable file must not be reused silently
                self.index.put_file_records(self._dir_records, scattered=True)
                if self._legacy_files:  # every file met is recorded under its grouped key now
                    self.index.drop_legacy_files()
            self._file_records, self._dir_records = [], []
        s = self.summary
        s.total_files = self.counters.files_done
        s.total_bytes = self.counters.bytes_done
        s.duration_s = round(time.monotonic() - started, 3)
        snapshot = Snapshot(
            time=self.options.time or datetime.now(UTC).astimezone(),
            device=self.repo.device,
            paths=paths,
            root=root,
            tags=list(self.options.tags),
            summary=s,
            incomplete=list(self.warnings),
        )
        if not self.options.dry_run:
            self.repo.save_snapshot(snapshot)
            self.index.end_backup_run()
        return snapshot


def fill_from(stream: BinaryIO) -> ReadInto:
    """A readinto for pipes, whose short reads do not mean end of input: fill the view or hit EOF."""
    raw = stream.readinto  # type: ignore[attr-defined]

    def readinto(view: memoryview) -> int:
        total = 0
        while total < len(view):
            n = raw(view[total:])
            if not n:
                break
            total += n
        return total

    return readinto


class PendingFile:
    """One file's place in a `ProcessBatch`."""

    __slots__ = ("batch", "position")

    def __init__(self, batch: ProcessBatch, position: int) -> None:
        self.batch, self.position = batch, position

    def result(self) -> Node | None:
        return self.batch.resolve()[self.position]


class LinkedFile:
    """Another name of an inode already queued: its content is read once."""

    __slots__ = ("backup", "first", "node", "path", "st")

    def __init__(self, backup: Backup, first: Future[Node | None] | PendingFile, node: Node, path: bytes, st: os.stat_result) -> None:
        self.backup, self.first, self.node, self.path, self.st = backup, first, node, path, st

    def result(self) -> Node | None:
        first = self.first.result()
        if first is None:
            return None
        return self.backup._complete(self.path, self.node, self.st, FileResult(content=first.content, size=first.size, xattrs=first.xattrs))


class ProcessBatch:
    """Files sent to a worker process together, to spread the cost of a round trip."""

    MAX_FILES = 64
    MAX_BYTES = 4 * 1024 * 1024

    def __init__(self, backup: Backup, worker: int) -> None:
        self.backup = backup
        self.worker = worker
        self.jobs: list[tuple[bytes, Node, os.stat_result]] = []
        self.bytes = 0
        self.answer: Answer[BatchDone] | None = None
        self.pack_here = False
        self.nodes: list[Node | None] | None = None

    @property
    def full(self) -> bool:
        return len(self.jobs) >= self.MAX_FILES or self.bytes >= self.MAX_BYTES

    @property
    def sent(self) -> bool:
        return self.answer is not None or self.nodes is not None

    def submit(self) -> None:
        if not self.sent:
            backup = self.backup
            self.pack_here = backup._sent_to_workers >= PARENT_PACKS_FIRST
            backup._sent_to_workers += self.bytes
            jobs = [(p, st.st_size, st.st_mtime_ns) for p, _, st in self.jobs]
            self.answer = backup.procs[self.worker].submit(process_files, jobs, self.pack_here, backup._index_was_empty)
            backup._in_flight[self.worker] += 1

    def answered(self) -> bool:
        return self.nodes is not None or (self.answer is not None and self.answer.done())

    def resolve(self) -> list[Node | None]:
        if self.nodes is None:
            self.submit()
            assert self.answer is not None
            answer, self.answer = self.answer, None
            self.backup._feed_idle_workers()  # the walk stops here: first give an idle worker what it has
            done = answer.result()
            self.backup._in_flight[self.worker] -= 1
            self.backup._load[self.worker] -= self.bytes
            self.backup._batch_done(done)
            self.nodes = [self.backup._complete(p, node, st, r) for (p, node, st), r in zip(self.jobs, done.files, strict=True)]
            self.jobs = []  # the sealed boxes are packed now: let them go
        return self.nodes


class BatchQueue:
    """The batch being filled; a batch is sent when full, or as soon as anyone waits on it."""

    def __init__(self, backup: Backup, worker: int) -> None:
        self.backup = backup
        self.worker = worker
        self.current = ProcessBatch(backup, worker)

    def add(self, path: bytes, node: Node, st: os.stat_result) -> PendingFile:
        batch = self.current
        if batch.sent or batch.full:
            batch = self.current = ProcessBatch(self.backup, self.worker)
        batch.jobs.append((path, node, st))
        batch.bytes += st.st_size
        self.backup._load[self.worker] += st.st_size
        if batch.full:
            batch.submit()
        return PendingFile(batch, len(batch.jobs) - 1)


PendingItem = Node | Future[Node | None] | PendingFile | LinkedFile


def is_answered(item: PendingItem) -> bool:
    """An entry whose node is known, or comes without waiting."""
    if isinstance(item, Node):
        return True
    if isinstance(item, PendingFile):
        return item.batch.answered()
    if isinstance(item, LinkedFile):
        return is_answered(item.first)
    return item.done()


@dataclass(slots=True)
class DirJob:
    """A walked directory whose tree is written once its entries are known."""

    node: Node
    items: list[PendingItem]
    queued_bytes: int = 0  # file bytes sent to workers, whose sealed results wait in memory
    dir_key: bytes = b""  # keyed path hash, for the directory cache
    signature: bytes = b""


def normalize_paths(paths: list[bytes]) -> list[bytes]:
    """Absolute, normalised, deduplicated; a path inside another given path is dropped."""
    result: list[bytes] = []
    for p in sorted({os.path.normpath(os.path.abspath(p)) for p in paths}):
        if not any(p == q or p.startswith(q.rstrip(b"/") + b"/") for q in result):
            result.append(p)
    return result


def count_tree(paths: list[bytes], counters: Counters, stop: threading.Event, rules: WalkRules | None = None) -> None:
    """The scanner behind the progress bar's total and ETA; runs beside the backup.

    It follows the walk's own rules (excludes, one file system, skipped directories) and counts regular
    files only, as the summary does, so the bar's total and the summary's count agree.
    """
    for top in paths:
        try:
            root_dev = os.lstat(top).st_dev
        except OSError:
            continue
        stack = [top]
        while stack:
            if stop.is_set():
                return
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if rules is None or rules.descends(entry.path, st, root_dev):
                        stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode) and (rules is None or not rules.excluded(entry.path, False)):
                    counters.total_files += 1
                    counters.total_bytes += st.st_size
    counters.total_known = True

