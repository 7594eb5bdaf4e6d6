"""The pyfuse3 adapter: a protocol adapter only. The model is `vfs.Vfs`.

Every handler maps model errors to errno here, and nothing but `FUSEError` ever
leaves a handler (anything else would kill pyfuse3's main loop and leave a dead
mount). Blocking work (tree loads, index lookups, decryption) runs in worker
threads behind a limiter, so one slow file never stalls the others.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from stasisfs.errors import IntegrityError
from stasisfs.mount.pagepush import MAX_PUSH_FILE, PagePusher
from stasisfs.mount.vfs import Attr, Entry, NoSuchAttribute, NotADirectory, NotFound, Vfs

log = logging.getLogger("stasisfs.mount.lifecycle")

# Snapshots never change: let the kernel cache what it has seen for a long time.
CONTENT_TIMEOUT = 3600.0
# The top-level views change when a backup adds a snapshot.
VIEW_TIMEOUT = 1.0
REFRESH_EVERY = 2.0
READ_AHEAD_CHUNKS = 2
PREFETCH_FILES = 32  # files after the one opened, for readers that go through a directory in order
PREFETCH_BYTES = 16 << 20
READ_AHEAD_TREES = 64  # trees below a directory read as soon as it is opened
PUSH_AHEAD_FILES = 16
STREAMING_SECONDS = 1.0  # how long a reader that opened files in order counts as streaming through the tree
# Boxes up to this size are read inline when their bytes are in the page cache (RWF_NOWAIT):
# decrypting them costs less than the ~100 us of a thread hop. Anything that could block goes to a thread.
INLINE_CHUNK_LIMIT = 256 * 1024

T = TypeVar("T")
P = ParamSpec("P")


def errors_mapped(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectory:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except NoSuchAttribute:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
        except IntegrityError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def pushable_content(entry: Entry) -> list[bytes] | None:
    """The chunks of a regular file of modest size that the kernel knows (it listed it); None for anything else."""
    node = entry.node
    if node is None or not stat.S_ISREG(entry.attr.mode) or not 0 < node.size <= MAX_PUSH_FILE or entry.lookups == 0:
        return None
    return node.content


class SnapshotFs(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, vfs: Vfs, total_bytes: int = 0, threads: int = 4, hole_chunks: dict[bytes, int] | None = None,
                 storage: str | None = None) -> None:
        """`hole_chunks`: ids (and lengths) of the all-zero chunks, reported as unallocated blocks so that du and
        `cp --sparse=auto` see holes; `storage`: the repository's directory, whose free space statfs reports."""
        super().__init__()
        self.vfs = vfs
        self.total_bytes = total_bytes
        self.hole_chunks = hole_chunks or {}
        self.storage = storage
        self.limiter = trio.CapacityLimiter(threads)
        self._prefetch_from: dict[int, int] = {}  # directory -> position advised up to
        self._last_opened: dict[int, int] = {}  # directory -> position of the file opened last in it
        self._pushed_to: dict[int, int] = {}  # directory -> position pushed up to
        self._streaming_until = 0.0  # a reader opened files in order recently
        self.pusher: PagePusher | None = None
        self._inflight: dict[bytes, trio.Event] = {}
        self._last_refresh = time.monotonic()
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Read-ahead runs as background tasks in this nursery."""
        self._nursery = nursery

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        a: Attr = entry.attr
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = a.ino
        attrs.st_mode = a.mode
        attrs.st_nlink = a.nlink
        attrs.st_uid = a.uid
        attrs.st_gid = a.gid
        attrs.st_size = a.size
        attrs.st_rdev = a.rdev
        attrs.st_blksize = 65536
        attrs.st_blocks = (self._allocated(entry) + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = a.mtime_ns
        timeout = VIEW_TIMEOUT if entry.dynamic else CONTENT_TIMEOUT
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        return attrs

    def _allocated(self, entry: Entry) -> int:
        """Bytes a file really stores: its size less the all-zero chunks (holes)."""
        size = entry.attr.size
        holes = self.hole_chunks
        if holes and entry.node is not None and entry.node.content:
            size -= sum(holes.get(chunk_id, 0) for chunk_id in entry.node.content)
        return max(size, 0)

    async def _entry(self, ino: int) -> Entry:
        """The inode's entry; rebuilt in a worker thread when its directory's tree is not at hand."""
        entry = self.vfs.entry_at_hand(ino)
        return entry if entry is not None else await self._blocking(self.vfs.entry, ino)

    async def _loaded(self, ino: int) -> Entry:
        # Runs for every directory request: the checks are inline, with no awaits unless there is work.
        entry = await self._entry(ino)
        if entry.dynamic and time.monotonic() - self._last_refresh > REFRESH_EVERY:
            self._last_refresh = time.monotonic()
            await self._blocking(self.vfs.refresh)
        if entry.children is None and entry.loader is not None and not self.vfs.try_load(ino):
            try:
                await self._blocking(self.vfs.load, ino)
            except IntegrityError as exc:
                log.error("%s: %s", self.vfs.describe(ino), exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        return entry

    @errors_mapped
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._loaded(parent_inode)
        return self._attributes(self.vfs.lookup(parent_inode, name))

    @errors_mapped
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(await self._entry(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, count in inode_list:
                self.vfs.forget(inode, count)
        except Exception:
            log.exception("forget failed")

    @errors_mapped
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entry = await self._loaded(inode)
        if entry.loader is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not (entry.dynamic or entry.subdirs_read):
            # A walker opens the subdirectories next: read their trees now, and have storage start on those that would wait.
            self.vfs.advise_trees(self.vfs.read_ahead_trees(inode, READ_AHEAD_TREES))
        return inode

    @errors_mapped
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._loaded(fh)
        for cursor, name, entry in self.vfs.listing(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attributes(entry), cursor):
                break
            entry.lookups += 1  # readdirplus: the kernel now holds a reference
        else:  # the listing is complete
            if fh not in self._pushed_to and self.pusher is not None and self._nursery is not None and time.monotonic() < self._streaming_until:
                # A reader going through the tree in order (tar) opens this directory's files next. Pushed
                # from a task of its own, which runs after this reply is out: the kernel ignores a push
                # for an inode it has not been told of yet.
                self._nursery.start_soon(self._push_listing, fh)

    async def _push_listing(self, directory: int) -> None:
        self._push_files(directory, -1)

    async def releasedir(self, fh: int) -> None:
        return None

    @errors_mapped
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        await self._entry(inode)
        return self.vfs.readlink(inode)

    @errors_mapped
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        entry = await self._entry(inode)
        if not stat.S_ISREG(entry.attr.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self._prefetch_from.get(entry.parent, -1) <= entry.position:
            # A sequential reader opens the next files in this directory next: start reading them from storage.
            self._prefetch_from[entry.parent] = entry.position + PREFETCH_FILES
            self.vfs.advise_files(self.vfs.entries_after(entry.parent, entry.position, PREFETCH_FILES), PREFETCH_BYTES)
        self._push_ahead(entry)
        self.vfs.hold(entry)  # an open file's entry (its chunk offsets) stays built until release
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # immutable content: keep the page cache

    def _push_ahead(self, entry: Entry) -> None:
        """For a reader going through a directory in order (tar, cp -r): have the next small files pushed into the page cache.

        Their reads are then answered by the kernel, without a request or decryption here.
        """
        previous = self._last_opened.get(entry.parent, -1)
        self._last_opened[entry.parent] = entry.position
        if self.pusher is None or not self.vfs.next_file_after(entry.ino, previous):
            return
        if previous >= 0:  # a second file in order: a streaming reader, whose next directories get pushed as listed
            self._streaming_until = time.monotonic() + STREAMING_SECONDS
        horizon = self._pushed_to.get(entry.parent, entry.position)
        if horizon - entry.position > PUSH_AHEAD_FILES // 2:
            return  # the files up to the horizon are on their way already
        self._push_files(entry.parent, max(horizon, entry.position))

    def _push_files(self, directory: int, after: int) -> None:
        """Push the files listed after position `after` in this directory, up to PUSH_AHEAD_FILES entries on."""
        assert self.pusher is not None
        ahead = self.vfs.entries_after(directory, after, PUSH_AHEAD_FILES)
        if ahead:
            self._pushed_to[directory] = ahead[-1].position
        self.pusher.push([(e.ino, content) for e in ahead if (content := pushable_content(e)) is not None])

    async def flush(self, fh: int) -> None:
        # ENOSYS once makes the kernel stop sending flush for this mount: one request less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        self.vfs.release(fh)

    @errors_mapped
    async def read(self, fh: int, off: int, size: int) -> bytes:
        offsets = self.vfs.file_offsets(fh)
        if offsets is not None and len(offsets) == 2 and off == 0 and size >= offsets[1]:
            # The common case: a whole one-chunk file in one request. No plan, no copy, no caching.
            node = self.vfs.entry(fh).node
            assert node is not None
            chunk_id = node.content[0]
            data = self.vfs.cache.get(chunk_id)
            return data if data is not None else await self._chunk(fh, chunk_id, keep=False)
        if offsets is None:
            await self._blocking(self.vfs.load_offsets, fh)
        plan = self.vfs.read_plan(fh, off, size)
        chunks: dict[int, bytes] = {}
        missing = []
        for position, chunk_id in plan:
            data = self.vfs.cache.get(chunk_id)
            if data is None:
                missing.append((position, chunk_id))
            else:
                chunks[position] = data
        if len(missing) == 1:
            chunks[missing[0][0]] = await self._chunk(fh, missing[0][1])
        elif missing:
            async with trio.open_nursery() as nursery:
                for position, chunk_id in missing:
                    nursery.start_soon(self._fetch_into, fh, position, chunk_id, chunks)
        if plan:
            self._read_ahead(fh, plan[-1][0])
        return self.vfs.assemble(fh, off, size, chunks)

    async def _fetch_into(self, fh: int, position: int, chunk_id: bytes, out: dict[int, bytes]) -> None:
        out[position] = await self._chunk(fh, chunk_id)

    async def _chunk(self, fh: int, chunk_id: bytes, keep: bool = True) -> bytes:
        """A decrypted chunk, fetched once even when several readers want it at the same time."""
        while True:
            data = self.vfs.cache.get(chunk_id)
            if data is not None:
                return data
            pending = self._inflight.get(chunk_id)
            if pending is None:
                break
            await pending.wait()
        try:
            small = self.vfs.source.chunk_if_cached(chunk_id, INLINE_CHUNK_LIMIT)  # no thread hop when it cannot block
        except IntegrityError as exc:
            log.error("%s: %s", self.vfs.describe(fh), exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if small is not None:
            if keep:
                self.vfs.cache.put(chunk_id, small)
            return small
        done = self._inflight[chunk_id] = trio.Event()
        try:
            data = await self._blocking(self.vfs.source.chunk, chunk_id)
        except IntegrityError as exc:
            log.error("%s: %s", self.vfs.describe(fh), exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            del self._inflight[chunk_id]
            done.set()
        self.vfs.cache.put(chunk_id, data)
        return data

    def _read_ahead(self, fh: int, position: int) -> None:
        """Decrypt the next chunks in the background while the kernel consumes this one."""
        entry = self.vfs.entry(fh)
        if self._nursery is None or entry.node is None:
            return
        content = entry.node.content
        for ahead in content[position + 1 : position + 1 + READ_AHEAD_CHUNKS]:
            if self.vfs.cache.get(ahead) is None and ahead not in self._inflight:
                self._nursery.start_soon(self._prefetch, fh, ahead)

    async def _prefetch(self, fh: int, chunk_id: bytes) -> None:
        with contextlib.suppress(Exception):  # a failed prefetch is reported by the read that needs it
            await self._chunk(fh, chunk_id)

    @errors_mapped
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        await self._entry(inode)
        return self.vfs.getxattr(inode, name)

    @errors_mapped
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        await self._entry(inode)
        return list(self.vfs.xattrs(inode))

    @errors_mapped
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        free = 0
        if self.storage is not None:
            with contextlib.suppress(OSError):
                where = os.statvfs(self.storage)
                free = where.f_bavail * where.f_frsize
        # df shows the repository's size as used and the free space of the disk it lives on.
        data.f_blocks = max(1, (self.total_bytes + free) // 4096)
        data.f_bfree = data.f_bavail = free // 4096
        data.f_files = self.vfs.entry_count
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data
