"""Restore with restic 0.17's path and overwrite rules.

Directories are created while walking; file contents are written by a thread
pool; hard links are made once their first path exists; directory metadata
is applied last, deepest first, because writing into a directory changes its
mtime. A chunk that fails authentication is never written: the file is left
out and reported.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pathspec

from .errors import IntegrityError
from .fsmeta import apply_metadata, create_special
from .progress import Counters
from .reader import TreeReader
from .repository import Repository
from .snapshot import Snapshot
from .tree import DIR, FILE, SYMLINK, Node

OVERWRITE_MODES = ("always", "if-changed", "if-newer", "never")
SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
class RestoreOptions:
    target: bytes
    subpath: bytes = b""
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    overwrite: str = "always"
    verify: bool = False
    sparse: bool = False
    workers: int = 4


@dataclass
class RestoreResult:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
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
        self._lock = threading.Lock()
        self._as_root = os.geteuid() == 0
        self._include = pathspec.GitIgnoreSpec.from_lines(options.includes) if options.includes else None
        self._exclude = pathspec.GitIgnoreSpec.from_lines(options.excludes) if options.excludes else None

    def _error(self, message: str) -> None:
        with self._lock:
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
        dirs: list[tuple[bytes, Node]] = []
        links: list[tuple[bytes, bytes, Node]] = []
        first_paths: dict[tuple[int, int], bytes] = {}
        excluded_dirs: list[bytes] = []
        included_dirs: list[bytes] = []
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(self.options.workers, thread_name_prefix="restore") as pool:
            for path, node in self.reader.walk(root, root_path):
                if any(path.startswith(d + b"/") for d in excluded_dirs):
                    continue
                if not self._selected(path, node):
                    if node.type == DIR:
                        excluded_dirs.append(path)
                    continue
                rel = path[len(root_path) :].lstrip(b"/") if root_path != b"/" else path.lstrip(b"/")
                dest = os.path.join(root_dest, rel) if rel else root_dest
                inherited = any(path == d or path.startswith(d.rstrip(b"/") + b"/") for d in included_dirs)
                if node.type == DIR:
                    if self._include is not None and self._included(path, node):
                        included_dirs.append(path)
                    if self._make_dir(dest):
                        dirs.append((dest, node))
                    continue
                if not (inherited or self._included(path, node)):
                    continue
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if not self._may_replace(dest, node):
                    with self._lock:
                        self.result.skipped += 1
                    continue
                key = node.hardlink_key
                if key is not None and key in first_paths:
                    links.append((first_paths[key], dest, node))
                    continue
                if key is not None:
                    first_paths[key] = dest
                if node.type == FILE:
                    futures.append(pool.submit(self._restore_file, dest, node))
                else:
                    self._restore_other(dest, node)
            for future in futures:
                future.result()
        for source, dest, node in links:
            self._restore_link(source, dest, node)
        if self._include is not None:
            dirs = [(d, n) for d, n in dirs if os.path.isdir(d)]
        for dest, node in reversed(dirs):
            self._apply(dest, node)
        return self.result

    def _make_dir(self, dest: bytes) -> bool:
        if (os.path.lexists(dest) and not os.path.isdir(dest)) or os.path.islink(dest):
            if self.options.overwrite == "never":
                return False
            os.unlink(dest)
        os.makedirs(dest, exist_ok=True)
        return True

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
        if warnings:
            with self._lock:
                self.result.warnings.extend(warnings)

    def _restore_file(self, dest: bytes, node: Node) -> None:
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._error(f"cannot create {os.fsdecode(dest)}: {exc.strerror}")
            return
        try:
            written = 0
            for chunk_id in node.content:
                data = self.repo.load_blob(chunk_id)
                if self.options.sparse:
                    write_sparse(fd, data)
                else:
                    write_all(fd, data)
                written += len(data)
                self.counters.add(nbytes=len(data))
            os.ftruncate(fd, written)
        except IntegrityError as exc:
            os.close(fd)
            os.unlink(dest)
            self._error(f"{os.fsdecode(dest)} not restored: {exc}")
            return
        except OSError as exc:
            os.close(fd)
            self._error(f"cannot write {os.fsdecode(dest)}: {exc.strerror}")
            return
        os.close(fd)
        if self.options.verify and not self._verify(dest, node):
            self._error(f"{os.fsdecode(dest)} failed verification after restore")
        self._apply(dest, node)
        with self._lock:
            self.result.files += 1
            self.result.bytes += written
        self.counters.add(files=1)

    def _verify(self, dest: bytes, node: Node) -> bool:
        keys = self.repo.master_keys
        with open(dest, "rb") as f:
            for chunk_id in node.content:
                location = self.repo.index.lookup(chunk_id)
                if location is None or keys.chunk_id_of(f.read(location.raw_length)) != chunk_id:
                    return False
            return f.read(1) == b""

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
        except OSError:
            self._restore_file(dest, node)  # the first path failed or lives elsewhere: restore a copy
            return
        with self._lock:
            self.result.files += 1
