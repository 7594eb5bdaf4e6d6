"""`SnapshotFs`, the FUSE adapter, driven through trio without the kernel (in the style of S3QL's t3_fs_api)."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest
import trio
from test_vfs import MemorySource, walk

from stasisfs.mount.fuse import SnapshotFs
from stasisfs.mount.vfs import Vfs

CTX = pyfuse3.RequestContext()


def fs_with_a_sparse_file() -> tuple[SnapshotFs, Vfs, bytes]:
    source = MemorySource()
    hole = bytes(4096)
    sparse = source.file(b"disk.img", b"head", hole, hole, hole, b"tail")
    source.snapshot(source.directory(b"", [source.directory(b"home", [sparse])]), 0)
    hole_ids = {c: len(source.chunks[c]) for c in sparse.content if source.chunks[c] == hole}
    vfs = Vfs(source)
    return SnapshotFs(vfs, total_bytes=10_000, hole_chunks=hole_ids, storage="/"), vfs, b"head" + hole * 3 + b"tail"


def test_attributes_reads_and_refusals_through_the_adapter() -> None:
    ops, vfs, content = fs_with_a_sparse_file()
    snapshots = walk(vfs, "snapshots")  # `latest` is a symlink: the named snapshot is looked up instead
    first = next(name for _, name, _ in vfs.listing(snapshots, 0) if name != b"latest")

    async def scenario() -> None:
        snap = await ops.lookup(snapshots, first, CTX)
        home_attrs = await ops.lookup(snap.st_ino, b"home", CTX)
        image = await ops.lookup(home_attrs.st_ino, b"disk.img", CTX)
        assert image.st_size == len(content)
        assert image.st_blocks * 512 < len(content) - 3 * 4096 + 512  # the three zero chunks are holes
        again = await ops.getattr(image.st_ino, CTX)
        assert again.st_blocks == image.st_blocks
        handle = await ops.open(image.st_ino, os.O_RDONLY, CTX)
        assert await ops.read(handle.fh, 0, len(content)) == content
        assert await ops.read(handle.fh, 4, 8) == bytes(8)
        await ops.release(handle.fh)
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.open(image.st_ino, os.O_WRONLY, CTX)
        assert refused.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as missing:
            await ops.lookup(home_attrs.st_ino, b"nope", CTX)
        assert missing.value.errno == errno.ENOENT
        stats = await ops.statfs(CTX)
        assert stats.f_bavail > 0 and stats.f_blocks > stats.f_bavail

    trio.run(scenario)
