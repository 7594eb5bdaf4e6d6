#!/usr/bin/env python3
"""A bare read-only pyfuse3 passthrough: the floor `scripts/bench` measures the mount against.

Same kernel caching as stasisfs's mount (long timeouts, readdirplus, keep_cache), no crypto.
Usage: fuse_passthrough.py SOURCE MOUNTPOINT   (runs in the foreground; SIGTERM unmounts)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

TIMEOUT = 3600.0


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: bytes) -> None:
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: source}
        self.inodes: dict[bytes, int] = {source: pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.fds: dict[int, int] = {}

    def _ino(self, path: bytes) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = self.inodes[path] = self.next_ino
            self.paths[ino] = path
            self.next_ino += 1
        return ino

    def _attrs(self, path: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(path)
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_blksize, a.st_blocks = 65536, st.st_blocks
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _stat(self, path: bytes) -> pyfuse3.EntryAttributes:
        try:
            return self._attrs(path, os.lstat(path))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._stat(os.path.join(self.paths[parent_inode], name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._stat(self.paths[inode])

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self.paths[inode])

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        base = self.paths[fh]
        entries = sorted(os.listdir(base))
        for position in range(start_id, len(entries)):
            path = os.path.join(base, entries[position])
            if not pyfuse3.readdir_reply(token, entries[position], self._attrs(path, os.lstat(path)), position + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = os.open(self.paths[inode], os.O_RDONLY)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        os.close(self.fds.pop(fh))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        path = self.paths[inode]
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return []
        return [n.encode() for n in os.listxattr(path)]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.getxattr(self.paths[inode], name)
        except OSError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from stasisfs.mount.lifecycle import widen_readahead

    source, mountpoint = os.fsencode(os.path.abspath(sys.argv[1])), sys.argv[2]
    pyfuse3.init(Passthrough(source), mountpoint, {"fsname=passthrough", "ro", "default_permissions"})

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def stop() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop)

            async def same_readahead_as_stasisfs() -> None:  # the floor gets the same kernel caching
                await trio.sleep(0.5)
                await trio.to_thread.run_sync(widen_readahead, Path(mountpoint).absolute())

            nursery.start_soon(same_readahead_as_stasisfs)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
