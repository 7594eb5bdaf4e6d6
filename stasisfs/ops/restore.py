"""Restore with restic 0.17's path and overwrite rules.

Directories are created while walking; file contents are written in batches by
worker processes (`pools.py`; threads where processes cannot start), each file
under a temporary name renamed into place when complete; hard links are made
once their first path exists; directory metadata
is applied last, deepest first, because writing into a directory changes its
mtime. A chunk that fails authentication is never written: the file is left
out and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from stasisfs.errors import IntegrityError
from stasisfs.format.snapshot import Snapshot
from stasisfs.format.tree import DIR, FILE, SYMLINK, Node
from stasisfs.progress import Counters
from stasisfs.remote.packcache import attach_thin_packs
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import write_all
from stasisfs.repo.trees import TreeReader
from stasisfs.system.fsmeta import apply_metadata, create_special
from stasisfs.system.pools import LeastBusy, WorkerContext, start_workers

if TYPE_CHECKING:
    import pathspec

OVERWRITE_MODES = ("always", "if-changed", "if-newer", "never")
SPARSE_BLOCK = 64 * 1024
BATCHES_PER_WRITER = 2  # queued for each writer: the walk runs ahead of them by a bounded amount
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


PARTIAL_PREFIX = b".stasisfs-partial-"


def _spec(patterns: list[str]) -> pathspec.GitIgnoreSpec | None:
    if not patterns:
        return None
    import pathspec  # imported on use: every command loads this module, few restore with patterns

    return pathspec.GitIgnoreSpec.from_lines(patterns)


def partial_name(dest: bytes) -> bytes:
    """Where `dest` is written before its rename: the same directory, a name fixed by `dest`, so a rerun
    after an interruption writes over the leftover instead of adding another."""
    head, name = os.path.split(dest)
    return os.path.join(head, PARTIAL_PREFIX + hashlib.blake2b(name, digest_size=8).hexdigest().encode())


def write_sparse(fd: int, data: bytes) -> None:
    """Seek over all-zero blocks so they stay holes; the final ftruncate fixes the size."""
    view = memoryview(data)
    for start in range(0, len(data), SPARSE_BLOCK):
        block = view[start : start + SPARSE_BLOCK]
        if block == _ZERO_BLOCK[: len(block)]:
            os.lseek(fd, len(block), os.SEEK_CUR)
        else:
            write_all(fd, block)


@dataclass
class FileOutcome:
    restored: bool = False
    verified: bool = False
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class FileWriter:
    """Writes one file's content and metadata; runs in a writer process (or thread)."""

    def __init__(self, repo: Repository, sparse: bool, verify: bool, as_root: bool) -> None:
        self.repo, self.sparse, self.verify, self.as_root = repo, sparse, verify, as_root

    def write(self, dest: bytes, node: Node) -> FileOutcome:
        """Content and metadata go to a temporary name, renamed over `dest` last: an interrupted
        restore never leaves a file that looks complete, and the next run writes it again."""
        outcome = FileOutcome()
        final, dest = dest, partial_name(dest)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            outcome.errors.append(f"cannot create {os.fsdecode(final)}: {exc.strerror}")
            return outcome
        try:
            for chunk_id in node.content:
                data = self.repo.blobs.load(chunk_id)
                if self.sparse:
                    write_sparse(fd, data)
                else:
                    write_all(fd, data)
                outcome.bytes += len(data)
            if self.sparse:
                os.ftruncate(fd, outcome.bytes)  # a trailing hole needs the size set
        except IntegrityError as exc:
            os.close(fd)
            os.unlink(dest)  # never leave wrong bytes behind
            outcome.errors.append(f"{os.fsdecode(final)} not restored: {exc}")
            outcome.bytes = 0
            return outcome
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(dest)
            outcome.errors.append(f"cannot write {os.fsdecode(final)}: {exc.strerror}")
            return outcome
        os.close(fd)
        if self.verify:
            outcome.verified = self._verify(dest, node)
            if not outcome.verified:
                outcome.errors.append(f"{os.fsdecode(final)} failed verification after restore")
        try:
            outcome.warnings += apply_metadata(dest, node, self.as_root)
        except OSError as exc:
            outcome.warnings.append(f"cannot restore metadata of {os.fsdecode(final)}: {exc.strerror}")
        try:
            os.rename(dest, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(dest)
            outcome.errors.append(f"cannot create {os.fsdecode(final)}: {exc.strerror}")
            return outcome
        outcome.restored = True
        return outcome

    def _verify(self, dest: bytes, node: Node) -> bool:
        keys = self.repo.master_keys
        with open(dest, "rb") as f:
            for chunk_id in node.content:
                location = self.repo.index.lookup(chunk_id)
                if location is None or keys.chunk_id_of(f.read(location.raw_length)) != chunk_id:
                    return False
            return f.read(1) == b""


class WriteBatch:
    MAX_FILES = 32
    MAX_BYTES = 8 * 1024 * 1024

    def __init__(self) -> None:
        self.jobs: list[tuple[bytes, Node]] = []
        self.bytes = 0

    def add(self, dest: bytes, node: Node) -> None:
        self.jobs.append((dest, node))
        self.bytes += node.size

    @property
    def full(self) -> bool:
        return len(self.jobs) >= self.MAX_FILES or self.bytes >= self.MAX_BYTES


_context: WorkerContext[Repository, FileWriter] = WorkerContext()


def use_repository_in_threads(repo: Repository) -> None:
    _context.share(repo)


def init_writer(repo_path: str, master: bytes, sparse: bool, verify: bool, as_root: bool) -> None:
    """Initializer for a writer process (which `workerprocess.serve` set up to exit with the parent), or a writer thread."""
    # A writer process opens the repository and its index once; writer threads use the parent's.
    repo = _context.shared(lambda: attach_thin_packs(Repository.for_worker(Path(repo_path), master)))
    _context.start(FileWriter(repo, sparse, verify, as_root))


@dataclass
class WrittenBatch:
    """What a writer reports for a batch: counts, and only the messages there are (one answer, not one per file)."""

    files: int = 0
    bytes: int = 0
    verified: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, outcome: FileOutcome) -> WrittenBatch:
        self.files += outcome.restored
        self.bytes += outcome.bytes
        self.verified += outcome.verified
        self.errors += outcome.errors
        self.warnings += outcome.warnings
        return self


def write_files(jobs: list[tuple[bytes, Node]]) -> WrittenBatch:
    writer, written = _context.worker, WrittenBatch()
    for dest, node in jobs:
        written.add(writer.write(dest, node))
    return written


def default_writers() -> int:
    """A writer per core and one more, to use the time another waits on a read (3 beat 2 and 4 on two cores)."""
    return min(8, (os.cpu_count() or 2) + 1)


@dataclass
class RestoreOptions:
    target: bytes
    subpath: bytes = b""
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    overwrite: str = "always"
    verify: bool = False
    sparse: bool = False
    workers: int = field(default_factory=default_writers)


@dataclass
class RestoreResult:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    verified: int = 0  # with --verify: files read back from disk that matched their chunk ids
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Restorer:
    def __init__(self, repo: Repository, options: RestoreOptions, counters: Counters | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        self.repo = repo
        self.options = options
        self.reader = TreeReader(repo)
        self.counters = counters or Counters()
        self.result = RestoreResult()
        self._report = report or (lambda message: None)
        self._as_root = os.geteuid() == 0
        self._include = _spec(options.includes)
        self._made: dict[bytes, bool] = {}  # directory -> created by this run
        # Set by a signal handler: the walk stops at its next entry (never mid-call into the pool, which could deadlock it).
        self.stop = threading.Event()
        self._exclude = _spec(options.excludes)

    def _error(self, message: str) -> None:
        self.result.errors.append(message)
        self._report(message)

    def _selected(self, path: bytes, node: Node) -> bool:
        rel = os.fsdecode(path.lstrip(b"/")) + ("/" if node.type == DIR else "")
        return not (self._exclude is not None and self._exclude.match_file(rel))

    def _included(self, path: bytes, node: Node) -> bool:
        if self._include is None:
            return True
        rel = os.fsdecode(path.lstrip(b"/")) + ("/" if node.type == DIR else "")
        return self._include.match_file(rel)

    def plan_root(self, snapshot: Snapshot) -> tuple[Node, bytes, bytes]:
        """(node, its path in the snapshot, where it lands) for restic 0.17's `SNAPSHOT[:PATH]` rules."""
        target = os.path.abspath(self.options.target)
        if not self.options.subpath.strip(b"/"):
            return self.reader.root_node(snapshot.root), b"/", target
        node = self.reader.node_at(snapshot.root, self.options.subpath)
        path = b"/" + self.options.subpath.strip(b"/")
        if node.type == DIR:
            return node, path, target
        return node, path, os.path.join(target, node.name)

    def run(self, snapshot: Snapshot) -> RestoreResult:
        root, root_path, root_dest = self.plan_root(snapshot)
        os.makedirs(self.options.target, exist_ok=True)
        self._made = {os.path.abspath(self.options.target): False}
        dir_nodes: list[tuple[bytes, Node]] = []
        links: list[tuple[bytes, bytes, Node]] = []
        first_paths: dict[tuple[int, int], bytes] = {}
        # The walk is depth-first, parents first, so a subtree is one contiguous run of paths.
        excluded: bytes | None = None
        included: bytes | None = None
        batch = WriteBatch()
        writers = self._writers()
        interrupted = False
        try:
            for path, node in self.reader.walk(root, root_path):
                if self.stop.is_set():
                    raise KeyboardInterrupt
                if excluded is not None and path.startswith(excluded):
                    continue
                if not self._selected(path, node):
                    excluded = path.rstrip(b"/") + b"/"
                    continue
                if included is not None and not path.startswith(included):
                    included = None
                rel = path[len(root_path) :].lstrip(b"/") if root_path != b"/" else path.lstrip(b"/")
                dest = os.path.join(root_dest, rel) if rel else root_dest
                wanted = included is not None or self._included(path, node)
                if node.type == DIR:
                    dir_nodes.append((dest, node))
                    if wanted:
                        if self._include is not None and included is None:
                            included = path.rstrip(b"/") + b"/"
                        self._ensure_dir(dest)
                    continue
                if not wanted:
                    continue
                try:
                    fresh_parent = self._ensure_dir(os.path.dirname(dest))
                except OSError as exc:
                    self._error(f"cannot create {os.fsdecode(os.path.dirname(dest))}: {exc.strerror}")
                    continue
                if not fresh_parent and not self._may_replace(dest, node):
                    self.result.skipped += 1
                    continue
                key = node.hardlink_key
                if key is not None and key in first_paths:
                    links.append((first_paths[key], dest, node))
                    continue
                if key is not None:
                    first_paths[key] = dest
                if node.type == FILE:
                    batch.add(dest, node)
                    if batch.full:
                        writers.submit(write_files, batch.jobs)
                        batch = WriteBatch()
                else:
                    self._restore_other(dest, node)
            if batch.jobs:
                writers.submit(write_files, batch.jobs)
        except BaseException:
            interrupted = True  # Ctrl-C, SIGTERM or an error: drop what is queued, finish what is being written
            raise
        finally:
            writers.shutdown(cancel=interrupted)
        # the shutdown collected every batch's answer
        for source, dest, node in links:
            self._restore_link(source, dest, node)
        for dest, node in reversed(dir_nodes):
            if dest in self._made:
                self._apply(dest, node)
        return self.result

    def _writers(self) -> LeastBusy[WrittenBatch]:
        """Writer processes (own GILs); threads when processes cannot be started here."""
        keys = self.repo.master_keys
        initargs = (str(self.repo.path), keys.master, self.options.sparse, self.options.verify, self._as_root)
        runners = start_workers(self.options.workers, "restore", init_writer, initargs, partial(use_repository_in_threads, self.repo))
        return LeastBusy(runners, self._take, self._writer_failed, per_runner=BATCHES_PER_WRITER)

    def _writer_failed(self, exc: BaseException) -> None:
        self._error(f"a restore writer failed: {exc}")

    def _ensure_dir(self, dest: bytes) -> bool:
        """Create a directory (and missing parents) once; True when this run created it, so nothing in it pre-exists."""
        fresh = self._made.get(dest)
        if fresh is not None:
            return fresh
        parent = os.path.dirname(dest)
        if parent != dest and parent not in self._made:
            self._ensure_dir(parent)
        try:
            os.mkdir(dest, 0o700)  # its real mode is applied last
            fresh = True
        except FileExistsError:
            if os.path.isdir(dest) and not os.path.islink(dest):
                fresh = False
            elif self.options.overwrite == "never":
                raise
            else:
                os.unlink(dest)
                os.mkdir(dest, 0o700)
                fresh = True
        self._made[dest] = fresh
        return fresh

    def _may_replace(self, dest: bytes, node: Node) -> bool:
        """Apply --overwrite to an existing destination; removes it when it is to be replaced."""
        try:
            existing = os.lstat(dest)
        except FileNotFoundError:
            return True
        mode = self.options.overwrite
        if mode == "never":
            return False
        if mode == "if-newer" and node.mtime_ns <= existing.st_mtime_ns:
            return False
        if (
            mode == "if-changed"
            and node.type == FILE
            and stat.S_ISREG(existing.st_mode)
            and existing.st_size == node.size
            and existing.st_mtime_ns == node.mtime_ns
        ):
            return False
        if stat.S_ISDIR(existing.st_mode):
            shutil.rmtree(dest)
        else:
            os.unlink(dest)
        return True

    def _apply(self, dest: bytes, node: Node) -> None:
        try:
            warnings = apply_metadata(dest, node, self._as_root)
        except OSError as exc:
            warnings = [f"cannot restore metadata of {os.fsdecode(dest)}: {exc.strerror}"]
        self.result.warnings.extend(warnings)

    def _take(self, written: WrittenBatch) -> None:
        """Fold a writer's answer into the result (in the walk's thread, as `LeastBusy` collects it)."""
        self.result.errors.extend(written.errors)
        self.result.warnings.extend(written.warnings)
        self.result.files += written.files
        self.result.bytes += written.bytes
        self.result.verified += written.verified
        for message in written.errors:
            self._report(message)
        self.counters.add(files=written.files, nbytes=written.bytes)

    def _restore_other(self, dest: bytes, node: Node) -> None:
        try:
            if node.type == SYMLINK:
                os.symlink(node.target, dest)
            else:
                create_special(dest, node)
        except OSError as exc:
            self._error(f"cannot create {os.fsdecode(dest)}: {exc.strerror}")
            return
        self._apply(dest, node)

    def _restore_link(self, source: bytes, dest: bytes, node: Node) -> None:
        try:
            os.link(source, dest)
        except OSError:  # the first path failed or lives elsewhere: restore a copy
            self._take(WrittenBatch().add(FileWriter(self.repo, self.options.sparse, self.options.verify, self._as_root).write(dest, node)))
            return
        self.result.files += 1
