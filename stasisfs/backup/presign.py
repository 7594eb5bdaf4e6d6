"""Signing directories from the far end of the walk, in a second process.

An unchanged re-backup is all walk: stat every entry, hash each directory's stats into its
signature, and reuse the tree recorded under the same signature. One Python thread does that at
about 5 µs an entry, and a second thread cannot help (the GIL). So a helper process walks the same
roots from the other end, last subdirectory first, and streams each directory's signature, file
count and byte count as it finishes it. The walk, reaching a directory the helper has finished,
looks that signature up in the index instead of listing the directory; the two meet near the
middle, and an unchanged walk takes about half as long.

The helper holds no key and writes nothing. It only reads the tree, and the walk looks each of
its signatures up as it would its own: one made under other rules finds no tree and costs the
walk a listing. A directory it reports stands as the helper read it, moments before the walk would
have (a helper older than `FRESH_FOR` is replaced). A directory the helper could not read entirely
is not reported: the walk lists it itself and reports what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import blake3

from stasisfs.backup.walk import WalkRules, holds_cachedir_tag, options_fingerprint, signed_stat

MARK = "stasisfs-presign"  # in the helper's command line, for `ps`
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_CHILD = f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from stasisfs.backup.presign import serve; serve()"
RECORD = struct.Struct("<32sQQI")  # signature, regular files and their bytes in the whole subtree, path length; then the path
FLUSH_EVERY = 0.004  # seconds: how stale the walk's view of the helper's progress may be
FRESH_FOR = 5.0  # seconds: a helper started longer ago than this before the walk (a wait for the lock, a typed password) is started again
MOUNT_POINT = b"mount point"  # what a directory on another filesystem signs as, with --one-file-system


class Signed(NamedTuple):
    signature: bytes
    files: int
    nbytes: int


class WalkParams(NamedTuple):
    roots: list[bytes]
    excludes: list[str]
    exclude_caches: bool
    one_file_system: bool
    repo_path: str


class ReverseSigner:
    """The parent's side: starts the helper, and hands over the signatures it has streamed so far."""

    def __init__(self, params: WalkParams) -> None:
        self.params = params
        self.started = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-c", _CHILD, MARK, str(write_fd)], pass_fds=(write_fd,), stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.pid = self._process.pid
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError), self._process.stdin as params_in:  # died starting: reports nothing
            params_in.write(pickle.dumps(params))
        os.set_blocking(read_fd, False)
        self._fd: int | None = read_fd
        self._pending = b""
        self._signed: dict[bytes, Signed] = {}

    def __enter__(self) -> ReverseSigner:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def fresh(self) -> ReverseSigner:
        """This helper if it started moments ago; else a new one, so no signature is older than the walk by much."""
        if time.monotonic() - self.started <= FRESH_FOR:
            return self
        self.stop()
        return ReverseSigner(self.params)

    def take(self, path: bytes) -> Signed | None:
        """The helper's signature of this directory, if it finished it; each is handed over once."""
        if self._fd is not None:
            self._receive()
        return self._signed.pop(path, None)

    def wait(self) -> None:
        """Until the helper has finished and everything it sent is received (tests use this to be deterministic)."""
        if self._fd is not None:
            os.set_blocking(self._fd, True)
            while self._fd is not None:
                self._receive()

    def _receive(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 64 * 1024)  # under malloc's mmap threshold: an empty poll costs no mapping
        except BlockingIOError:
            return
        if not data:  # finished (or died): what it sent stands
            self._close()
            return
        buffer, offset = self._pending + data, 0
        while len(buffer) - offset >= RECORD.size:
            signature, files, nbytes, length = RECORD.unpack_from(buffer, offset)
            end = offset + RECORD.size + length
            if end > len(buffer):
                break
            self._signed[buffer[offset + RECORD.size:end]] = Signed(signature, files, nbytes)
            offset = end
        self._pending = buffer[offset:]

    def stop(self) -> None:
        """Stop the helper (the walk is done, or found nothing it could reuse) and drop what it sent."""
        self._signed.clear()
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Outbox:
    """The helper's side of the pipe: records batched, sent every few milliseconds."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._parts: list[bytes] = []
        self._sent_at = time.monotonic()

    def add(self, path: bytes, signed: Signed) -> None:
        self._parts.append(RECORD.pack(signed.signature, signed.files, signed.nbytes, len(path)))
        self._parts.append(path)
        if time.monotonic() - self._sent_at >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        data = b"".join(self._parts)
        self._parts.clear()
        self._sent_at = time.monotonic()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


class _Signer:
    """Signs directories exactly as the walk does (`Backup._save_dir`), subdirectories last first."""

    def __init__(self, params: WalkParams, outbox: _Outbox) -> None:
        self.rules = WalkRules(params.excludes, params.one_file_system, Path(params.repo_path))
        self.exclude_caches = params.exclude_caches
        self.fingerprint = options_fingerprint(params.excludes, params.exclude_caches, params.one_file_system)
        self.outbox = outbox

    def sign_root(self, root: bytes) -> None:
        try:
            st = os.lstat(root)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(_Unreadable):
                self._subdir(root, st, root_dev=st.st_dev)

    def _subdir(self, path: bytes, st: os.stat_result, root_dev: int) -> Signed | None:
        """What `Backup._subdir` signs this directory as: None when it is left out of the snapshot."""
        if self.rules.skipped(path, st) or (self.exclude_caches and holds_cachedir_tag(path)):
            return None
        if self.rules.one_file_system and st.st_dev != root_dev:
            return Signed(MOUNT_POINT, 0, 0)  # the mount point is kept empty: none of its files count
        return self._sign(path, root_dev)

    def _sign(self, path: bytes, root_dev: int) -> Signed:
        """Sign and report this directory; raises `_Unreadable` when some of it could not be read."""
        try:
            entries = [(entry, entry.stat(follow_symlinks=False)) for entry in os.scandir(path)]
        except OSError:
            raise _Unreadable from None  # the walk lists it itself, and warns
        if self.rules.spec is not None:
            entries = [(e, st) for e, st in entries if not self.rules.excluded(e.path, stat.S_ISDIR(st.st_mode))]
        complete, files, nbytes = True, 0, 0
        subdirs: dict[bytes, Signed | None] = {}
        for entry, st in reversed(entries):  # the far end first: the walk comes from the near one
            if stat.S_ISDIR(st.st_mode):
                try:
                    signed = subdirs[entry.name] = self._subdir(entry.path, st, root_dev)
                except _Unreadable:
                    complete = False  # its siblings are still worth signing
                    continue
                if signed is not None:
                    files += signed.files
                    nbytes += signed.nbytes
            elif stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
        if not complete:
            raise _Unreadable
        parts = [self.fingerprint]
        for entry, st in entries:
            parts += (signed_stat(entry.name, st), entry.name)
            subdir = subdirs.get(entry.name)
            if subdir is not None:
                parts.append(subdir.signature)
        result = Signed(blake3.blake3(b"".join(parts)).digest(), files, nbytes)
        self.outbox.add(path, result)
        return result


class _Unreadable(Exception):
    """Some of a directory could not be read: the walk lists it, and the directories above it, itself."""


def serve() -> None:
    """The helper's main: sign every root, last first, then exit."""
    from stasisfs.system.kernel import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    os.nice(5)  # behind the backup's own workers when files did change
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    params: WalkParams = pickle.load(sys.stdin.buffer)
    outbox = _Outbox(int(sys.argv[2]))
    signer = _Signer(params, outbox)
    try:
        for root in reversed(params.roots):
            signer.sign_root(root)
        outbox.flush()
    except BrokenPipeError:
        pass  # the walk is done and stopped listening
    os._exit(0)
