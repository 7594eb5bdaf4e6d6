"""Pushing decrypted files into the kernel's page cache ahead of a sequential reader.

`tar` or `cp -r` through the mount opens and reads the files of a directory in order. The
mount process is single-threaded (trio), and decrypting each small file there, one READ
request at a time, is what made the mount slower than a bare passthrough. So when a reader
goes through a directory in order, the mount names the next files' chunks to a helper
process, which decrypts them on the other core and stores the plaintext straight into
the kernel's page cache for those inodes (FUSE_NOTIFY_STORE on the mount's /dev/fuse
descriptor, which it inherits). The reader's `read` is then answered by the kernel
without a request. Snapshots never change, so what is pushed is never stale.

The helper is an optimisation only: a push that fails (the kernel forgot the inode, the
chunk is not local, the helper died) leaves the ordinary READ path to serve the file.

Wire format on the helper's stdin: `u32 length || repository path`, `32 bytes master key`,
then requests: `u32 length || (u64 inode || u32 chunk count || 32-byte chunk id * count)*`;
a file's chunks are stored one after another from offset 0.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import subprocess
import sys
from pathlib import Path

FUSE_NOTIFY_STORE = 4  # linux/fuse.h: enum fuse_notify_code
OUT_HEADER = struct.Struct("<IiQ")  # struct fuse_out_header: len, error (the notify code), unique (0)
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # struct fuse_notify_store_out: nodeid, offset, size, padding
LENGTH = struct.Struct("<I")
FILE_HEADER = struct.Struct("<QI")
CHUNK_ID_LEN = 32
MAX_PUSH_FILE = 1 << 20  # larger files are read through the kernel's readahead as usual
MAX_BOX = 4 << 20


def store_message(inode: int, data: bytes, offset: int = 0) -> list[bytes]:
    """One FUSE_NOTIFY_STORE message, as the parts of a single writev."""
    header = OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_STORE_OUT.size + len(data), FUSE_NOTIFY_STORE, 0)
    return [header, NOTIFY_STORE_OUT.pack(inode, offset, len(data), 0), data]


def encode_requests(files: list[tuple[int, list[bytes]]]) -> list[bytes]:
    """Frames of whole files, each at most PIPE_BUF bytes: a non-blocking pipe writes those whole or not at all."""
    frames, body = [], b""
    for inode, chunks in files:
        part = FILE_HEADER.pack(inode, len(chunks)) + b"".join(chunks)
        if LENGTH.size + len(part) > select.PIPE_BUF:
            continue  # too many chunks to name in one frame: read as usual
        if LENGTH.size + len(body) + len(part) > select.PIPE_BUF:
            frames.append(LENGTH.pack(len(body)) + body)
            body = b""
        body += part
    if body:
        frames.append(LENGTH.pack(len(body)) + body)
    return frames


def decode_request(body: bytes) -> list[tuple[int, list[bytes]]]:
    files, pos = [], 0
    while pos < len(body):
        inode, count = FILE_HEADER.unpack_from(body, pos)
        pos += FILE_HEADER.size
        files.append((inode, [body[p : p + CHUNK_ID_LEN] for p in range(pos, pos + count * CHUNK_ID_LEN, CHUNK_ID_LEN)]))
        pos += count * CHUNK_ID_LEN
    return files


def fuse_device_fd() -> int | None:
    """This process's /dev/fuse descriptor (the one pyfuse3.init opened)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
    return None


class PagePusher:
    """The mount's side: names chunks to push, never waiting on the helper."""

    def __init__(self, repo_path: Path, master: bytes, fuse_fd: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "stasisfs.mount.pagepush", str(fuse_fd)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(fuse_fd,),
        )
        assert self._proc.stdin is not None
        self._pipe = self._proc.stdin.fileno()
        path = os.fsencode(repo_path)
        os.write(self._pipe, LENGTH.pack(len(path)) + path + master)  # secrets through a pipe, never argv
        os.set_blocking(self._pipe, False)
        self.alive = True

    def push(self, files: list[tuple[int, list[bytes]]]) -> None:
        """Ask for these files (inode, chunk ids) to be pushed; dropped when the helper is busy or gone."""
        if not self.alive or not files:
            return
        try:
            for frame in encode_requests(files):
                os.write(self._pipe, frame)
        except BlockingIOError:
            return  # a full pipe: the helper is behind, and the reader will just read
        except OSError:
            self.alive = False

    def close(self) -> str:
        """Stop the helper; returns its account of what it pushed."""
        self.alive = False
        try:
            report, _ = self._proc.communicate(timeout=5)  # closes its stdin: the helper sees EOF and reports
        except subprocess.TimeoutExpired:
            self._proc.kill()
            report, _ = self._proc.communicate()
        except OSError as exc:
            return f"not stopped cleanly: {exc}"
        return report.decode(errors="replace").strip() or f"exited with {self._proc.returncode}"


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = os.read(fd, left)
        if not part:
            raise EOFError
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def serve_pushes(fuse_fd: int, requests_fd: int = 0) -> None:
    """The helper: decrypt each named chunk from local packs and store it in the kernel's cache."""
    from stasisfs.repo.repository import Repository

    (length,) = LENGTH.unpack(_read_exact(requests_fd, LENGTH.size))
    repo = Repository(Path(os.fsdecode(_read_exact(requests_fd, length))))
    repo.unlock_master(_read_exact(requests_fd, 32))
    files = total = 0
    try:
        while True:
            (length,) = LENGTH.unpack(_read_exact(requests_fd, LENGTH.size))
            for inode, chunk_ids in decode_request(_read_exact(requests_fd, length)):
                offset = 0
                for chunk_id in chunk_ids:
                    try:
                        data = repo.blobs.load_if_cached(chunk_id, MAX_BOX)
                        if data is None:
                            break  # not local, or not in memory: the reader's READ fetches it
                        os.writev(fuse_fd, store_message(inode, data, offset))
                    except Exception:  # a failed push only means the reader's READ is served as usual
                        break
                    offset += len(data)
                else:
                    files, total = files + 1, total + offset
    except EOFError:  # the mount closed the pipe: unmounted, or the mount process died
        with contextlib.suppress(OSError):
            print(f"pushed {files} files ({total} bytes) into the page cache", flush=True)
    finally:
        repo.close()


if __name__ == "__main__":
    serve_pushes(int(sys.argv[1]))
