"""The snapshot filesystem model, without the kernel: an in-memory source stands in for the repository."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stasisfs.format.snapshot import Snapshot
from stasisfs.format.tree import DIR, FILE, SYMLINK, Node
from stasisfs.mount.vfs import ROOT_INODE, NotFound, Vfs, snapshot_names


class MemorySource:
    def __init__(self) -> None:
        self.trees: dict[bytes, list[Node]] = {}
        self.chunks: dict[bytes, bytes] = {}
        self.snaps: list[Snapshot] = []

    def snapshots(self) -> list[Snapshot]:
        return list(self.snaps)

    def tree(self, tree_id: bytes) -> list[Node]:
        return self.trees[tree_id]

    def chunk_sizes(self, chunk_ids: list[bytes]) -> list[int]:
        return [len(self.chunks[c]) for c in chunk_ids]

    def chunk(self, chunk_id: bytes) -> bytes:
        return self.chunks[chunk_id]

    def tree_if_cached(self, tree_id: bytes) -> list[Node]:
        return self.trees[tree_id]

    def advise(self, chunk_ids: list[bytes]) -> None:
        self.advised = getattr(self, "advised", 0) + len(chunk_ids)

    def chunk_if_cached(self, chunk_id: bytes, max_length: int) -> bytes | None:
        data = self.chunks[chunk_id]
        return data if len(data) <= max_length else None

    def file(self, name: bytes, *parts: bytes, **kw: Any) -> Node:
        content = []
        for part in parts:
            chunk_id = os.urandom(32)
            self.chunks[chunk_id] = part
            content.append(chunk_id)
        return Node(name=name, type=FILE, mode=0o644, size=sum(map(len, parts)), content=content, mtime_ns=5, **kw)

    def directory(self, name: bytes, children: list[Node]) -> Node:
        tree_id = os.urandom(32)
        self.trees[tree_id] = children
        return Node(name=name, type=DIR, mode=0o755, subtree=tree_id)

    def snapshot(self, root: Node, minutes: int, device: str = "laptop", tags: list[str] | None = None) -> Snapshot:
        assert root.subtree is not None
        snap = Snapshot(time=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes), device=device,
                        paths=[b"/home"], root=root.subtree, tags=tags or [], id=os.urandom(32))
        self.snaps.append(snap)
        return snap


def walk(vfs: Vfs, path: str) -> int:
    ino = ROOT_INODE
    for part in path.strip("/").split("/"):
        entry = vfs.lookup(ino, part.encode())
        if stat.S_ISLNK(entry.attr.mode):
            raise AssertionError(f"{part} is a symlink")
        ino = entry.ino
    return ino


@pytest.fixture
def source() -> MemorySource:
    src = MemorySource()
    big = src.file(b"big", os.urandom(1000), os.urandom(3000), os.urandom(500))
    same = src.file(b"same", b"unchanged")
    link_a = src.file(b"a", b"shared", links=2, inode=7, device=1)
    link_b = Node(name=b"b", type=FILE, mode=0o644, size=6, content=link_a.content, links=2, inode=7, device=1)
    sym = Node(name=b"s", type=SYMLINK, mode=0o777, target=b"big")
    home = src.directory(b"home", [big, same, link_a, link_b, sym])
    src.snapshot(src.directory(b"", [home]), 0, tags=["daily"])
    changed = src.file(b"big", b"new content")
    home2 = src.directory(b"home", [changed, same])
    src.snapshot(src.directory(b"", [home2]), 1, device="desktop")
    return src


@pytest.mark.parametrize(
    "minutes,expected",
    [([0, 1], ["T0", "T1"]), ([0, 0, 0], ["T0", "T0-1", "T0-2"]), ([1, 0], ["T0", "T1"])],
)
def test_snapshot_names_suffix_clashes(minutes: list[int], expected: list[str]) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    snaps = [Snapshot(time=base + timedelta(minutes=m), device="d", paths=[], root=b"", id=bytes([i]) * 32) for i, m in enumerate(minutes)]
    names = [name for name, _ in snapshot_names(snaps)]
    stamps = {m: (base + timedelta(minutes=m)).astimezone().strftime("%Y-%m-%dT%H:%M:%S") for m in minutes}
    assert names == [e.replace("T0", stamps[0]).replace("T1", stamps.get(1, "")) for e in expected]


def test_views_and_latest(source: MemorySource) -> None:
    vfs = Vfs(source)
    assert [name for _, name, _ in vfs.listing(ROOT_INODE, 0)] == [b"snapshots", b"devices", b"ids", b"tags", b"versions"]
    names = [name for _, name, _ in vfs.listing(walk(vfs, "snapshots"), 0)]
    assert len(names) == 3 and names[-1] == b"latest"
    latest = vfs.lookup(walk(vfs, "snapshots"), b"latest")
    assert vfs.readlink(latest.ino) == names[1]
    devices = [name for _, name, _ in vfs.listing(walk(vfs, "devices"), 0)]
    assert devices == [b"desktop", b"laptop"]
    laptop = [(n, vfs.readlink(e.ino)) for _, n, e in vfs.listing(walk(vfs, "devices/laptop"), 0)]
    assert laptop == [(names[0], b"../../snapshots/" + names[0]), (b"latest", names[0])]
    assert [n for _, n, _ in vfs.listing(walk(vfs, "tags"), 0)] == [b"daily"]
    ids = list(vfs.listing(walk(vfs, "ids"), 0))
    assert len(ids) == 2 and all(vfs.readlink(e.ino).startswith(b"../snapshots/") for _, _, e in ids)


def test_other_devices_only_under_devices(source: MemorySource) -> None:
    vfs = Vfs(source, own_device="laptop")
    own = [name for _, name, _ in vfs.listing(walk(vfs, "snapshots"), 0)]
    assert len(own) == 2 and own[-1] == b"latest"  # the desktop's snapshot is not here
    assert len(list(vfs.listing(walk(vfs, "ids"), 0))) == 1
    assert [n for _, n, _ in vfs.listing(walk(vfs, "devices"), 0)] == [b"desktop", b"laptop"]
    desktop = list(vfs.listing(walk(vfs, "devices/desktop"), 0))
    assert [n for _, n, _ in desktop][-1] == b"latest"
    name, entry = desktop[0][1], desktop[0][2]
    assert stat.S_ISDIR(entry.attr.mode)  # a directory of its own, not a link into snapshots/
    assert vfs.readlink(desktop[1][2].ino) == name
    home = walk(vfs, f"devices/desktop/{name.decode()}/home")
    big = vfs.lookup(home, b"big")
    vfs.load_offsets(big.ino)
    assert vfs.assemble(big.ino, 0, 100, {i: source.chunk(c) for i, c in vfs.read_plan(big.ino, 0, 100)}) == b"new content"
    versions = [n for _, n, _ in vfs.listing(walk(vfs, "versions/home/big"), 0)]
    assert len(versions) == 1  # only this device's versions


def test_hardlinks_share_an_inode(source: MemorySource) -> None:
    vfs = Vfs(source)
    first = source.snaps[0]
    home = walk(vfs, f"snapshots/{snapshot_names([first])[0][0]}/home")
    a, b = vfs.lookup(home, b"a"), vfs.lookup(home, b"b")
    assert a.ino == b.ino and a.attr.nlink == 2


def test_reads_across_chunks(source: MemorySource) -> None:
    vfs = Vfs(source)
    name = snapshot_names(source.snaps)[0][0]
    ino = walk(vfs, f"snapshots/{name}/home/big")
    node = vfs.entry(ino).node
    assert node is not None
    whole = b"".join(source.chunks[c] for c in node.content)
    assert vfs.file_offsets(ino) is None  # several chunks: sizes come from the index
    vfs.load_offsets(ino)
    for offset, size in [(0, 4500), (999, 2), (1000, 3000), (3999, 10), (4400, 500), (4499, 100), (4500, 10)]:
        plan = vfs.read_plan(ino, offset, size)
        data = vfs.assemble(ino, offset, size, {pos: source.chunk(cid) for pos, cid in plan})
        assert data == whole[offset : offset + size]


def test_readdir_cursors_are_stable(source: MemorySource) -> None:
    vfs = Vfs(source)
    name = snapshot_names(source.snaps)[0][0]
    home = walk(vfs, f"snapshots/{name}/home")
    full = [(c, n) for c, n, _ in vfs.listing(home, 0)]
    cursor = full[1][0]
    assert [(c, n) for c, n, _ in vfs.listing(home, cursor)] == full[2:]


def test_versions_skip_unchanged_files(source: MemorySource) -> None:
    vfs = Vfs(source)
    home = walk(vfs, "versions/home")
    assert {n for _, n, _ in vfs.listing(home, 0)} >= {b"big", b"same", b"a"}
    assert len(list(vfs.listing(vfs.lookup(home, b"big").ino, 0))) == 2
    assert len(list(vfs.listing(vfs.lookup(home, b"same").ino, 0))) == 1


def test_new_snapshot_appears_and_inodes_stay(source: MemorySource) -> None:
    vfs = Vfs(source)
    snapshots_ino = walk(vfs, "snapshots")
    before = {n: e.ino for _, n, e in vfs.listing(snapshots_ino, 0) if n != b"latest"}
    source.snapshot(source.directory(b"", []), 5)
    assert vfs.refresh()
    after = {n: e.ino for _, n, e in vfs.listing(snapshots_ino, 0) if n != b"latest"}
    assert len(after) == 3 and all(after[n] == ino for n, ino in before.items())


def test_forget_releases_listing_and_keeps_inode_numbers(source: MemorySource) -> None:
    vfs = Vfs(source)
    name = snapshot_names(source.snaps)[0][0]
    home = walk(vfs, f"snapshots/{name}/home")
    big = vfs.lookup(home, b"big").ino
    vfs.forget(big, 1)
    vfs.forget(home, 1)
    assert vfs.entry(home).children is None
    assert vfs.lookup(home, b"big").ino == big


def test_missing_names(source: MemorySource) -> None:
    vfs = Vfs(source)
    with pytest.raises(NotFound):
        vfs.lookup(ROOT_INODE, b"nope")


def test_order_of_a_sequential_reader() -> None:
    """`entries_after` is what a reader going through a directory opens next; subdirectories between files do not break the order."""
    src = MemorySource()
    children = [src.directory(b"a-dir", []), src.file(b"b", b"1"), src.directory(b"c-dir", []), src.file(b"d", b"2"), src.file(b"e", b"3")]
    src.snapshot(src.directory(b"", [src.directory(b"home", children)]), 0)
    vfs = Vfs(src)
    snap_dir = next(e for _, _, e in vfs.listing(walk(vfs, "snapshots"), 0) if not stat.S_ISLNK(e.attr.mode))
    home = vfs.lookup(snap_dir.ino, b"home").ino
    vfs.load(home)
    ino = {name: e.ino for _, name, e in vfs.listing(home, 0)}
    assert [e.ino for e in vfs.entries_after(home, -1, 2)] == [ino[b"a-dir"], ino[b"b"]]
    assert [e.ino for e in vfs.entries_after(home, 1, 10)] == [ino[b"c-dir"], ino[b"d"], ino[b"e"]]
    assert vfs.next_file_after(ino[b"b"], -1)  # the first file, after a directory
    assert vfs.next_file_after(ino[b"d"], 1)  # after b, skipping c-dir
    assert not vfs.next_file_after(ino[b"e"], 1)  # d was skipped: not in order
    assert not vfs.next_file_after(ino[b"d"], -1)
    assert not vfs.next_file_after(ino[b"b"], 3)  # backwards


class SlowStorageSource(MemorySource):
    """Trees listed in `on_disk` are not at hand: reading them would wait on storage."""

    def __init__(self) -> None:
        super().__init__()
        self.on_disk: set[bytes] = set()

    def tree_if_cached(self, tree_id: bytes) -> list[Node] | None:  # type: ignore[override]
        return None if tree_id in self.on_disk else self.trees[tree_id]


def deep_tree(src: MemorySource, width: int, depth: int, name: bytes = b"top") -> Node:
    children = [deep_tree(src, width, depth - 1, b"d%d" % i) for i in range(width)] if depth > 1 else []
    return src.directory(name, [*children, src.file(b"f", b"x")])


def test_read_ahead_loads_trees_below_breadth_first_within_its_budget() -> None:
    src = SlowStorageSource()
    top = deep_tree(src, width=3, depth=4)  # 3 + 9 + 27 directories below top
    src.snapshot(src.directory(b"", [top]), 0)
    vfs = Vfs(src)
    name = snapshot_names(src.snaps)[0][0]
    top_ino = walk(vfs, f"snapshots/{name}/top")
    vfs.load(top_ino)
    level1 = [e for _, n, e in vfs.listing(top_ino, 0) if n != b"f"]
    unread = level1[2].node
    assert unread is not None and unread.subtree is not None
    src.on_disk.add(unread.subtree)

    waiting = vfs.read_ahead_trees(top_ino, max_trees=5)

    assert waiting == [level1[2].ino]  # left to storage's read-ahead, and not descended into
    assert level1[0].children is not None and level1[1].children is not None and level1[2].children is None
    loaded_below = [sub for e in level1[:2] for _, _, sub in vfs.listing(e.ino, 0) if sub.children is not None]
    assert len(loaded_below) == 3  # the budget: 2 at the first level, 3 more at the next, in order
    assert [sub.children is not None for _, n, sub in vfs.listing(level1[0].ino, 0) if n != b"f"] == [True, True, True]

    # Once a directory's subdirectories are in, asking again from it walks no further and loads nothing.
    assert vfs.read_ahead_trees(level1[0].ino, max_trees=5) == []
    assert vfs.entry(level1[0].ino).subdirs_read


def test_forgetting_a_directory_releases_what_was_read_ahead_below_it() -> None:
    src = MemorySource()
    top = deep_tree(src, width=2, depth=4)
    src.snapshot(src.directory(b"", [top]), 0)
    vfs = Vfs(src)
    name = snapshot_names(src.snaps)[0][0]
    top_ino = walk(vfs, f"snapshots/{name}/top")
    vfs.load(top_ino)
    with_listing = vfs.entry_count  # top's own children are in
    vfs.read_ahead_trees(top_ino, max_trees=100)
    child = vfs.lookup(top_ino, b"d0")  # a walker went one level down, then back up
    grandchild = vfs.lookup(child.ino, b"d1")
    assert vfs.entry_count == with_listing + 2 * 3 + 4 * 3 + 8 * 1  # every level below, read ahead
    vfs.forget(grandchild.ino, 1)
    vfs.forget(child.ino, 1)

    vfs.forget(top_ino, 1)  # the kernel lets the directory go: nothing below it is referenced any more

    assert vfs.entry(top_ino).children is None
    assert vfs.entry_count == with_listing - 3  # everything below top went, read ahead or listed
    again = vfs.lookup(top_ino, b"d0")
    assert again.ino == child.ino and vfs.lookup(again.ino, b"d1").ino == grandchild.ino  # same numbers after a reload


def test_a_directory_without_a_tree_lists_empty_and_counts_as_read_ahead() -> None:
    src = MemorySource()
    treeless = Node(name=b"treeless", type=DIR, mode=0o755)  # the format allows a directory with no tree: it lists empty
    src.snapshot(src.directory(b"", [src.directory(b"top", [treeless])]), 0)
    vfs = Vfs(src)
    top = walk(vfs, f"snapshots/{snapshot_names(src.snaps)[0][0]}/top")
    vfs.load(top)
    assert vfs.read_ahead_trees(top, max_trees=8) == []
    assert vfs.entry(top).subdirs_read
    assert list(vfs.listing(vfs.lookup(top, b"treeless").ino, 0)) == []


def test_entries_stay_bounded_and_every_inode_comes_back_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk over many files (find -ls): the kernel keeps every inode, the model keeps a bounded number of entries."""
    import stasisfs.mount.vfs as vfs_module

    monkeypatch.setattr(vfs_module, "LIVE_ENTRIES", 50)
    src = MemorySource()
    directories = [src.directory(f"d{d:02}".encode(), [src.file(f"f{n:03}".encode(), b"x" * (d * 1000 + n)) for n in range(40)])
                   for d in range(20)]
    src.snapshot(src.directory(b"", directories), 0)
    vfs = Vfs(src)
    root = walk(vfs, f"snapshots/{snapshot_names(src.snaps)[0][0]}")
    seen: dict[int, tuple[bytes, int]] = {}
    for _, name, directory in list(vfs.listing(root, 0)):
        for _, file_name, entry in vfs.listing(directory.ino, 0):
            seen[entry.ino] = (name + b"/" + file_name, entry.attr.size)
        assert vfs.entry_count <= 50 + 20 + 10  # LIVE_ENTRIES files, the listed directories, the kept views and root
    assert len(seen) == 800
    # Long evicted, each inode still answers with its own file, under the same number; a reload renumbers nothing.
    for ino, (path, size) in seen.items():
        entry = vfs.entry(ino)
        assert entry.attr.size == size and entry.path.endswith(b"/" + path) and entry.ino == ino
    first = next(iter(seen))
    assert vfs.lookup(vfs.entry(first).parent, seen[first][0].split(b"/")[1]).ino == first


def test_an_open_files_entry_is_not_evicted(monkeypatch: pytest.MonkeyPatch) -> None:
    import stasisfs.mount.vfs as vfs_module

    monkeypatch.setattr(vfs_module, "LIVE_ENTRIES", 5)
    src = MemorySource()
    src.snapshot(src.directory(b"", [src.file(f"f{n}".encode(), b"a" * 10, b"b" * 10) for n in range(30)]), 0)
    vfs = Vfs(src)
    root = walk(vfs, f"snapshots/{snapshot_names(src.snaps)[0][0]}")
    opened = vfs.lookup(root, b"f0")
    vfs.hold(opened)
    vfs.load_offsets(opened.ino)
    assert len(list(vfs.listing(root, 0))) == 30  # every other file passes through the cache
    assert vfs.entry(opened.ino) is opened and opened.offsets == [0, 10, 20]
    vfs.release(opened.ino)
    assert len(list(vfs.listing(root, 0))) == 30
    assert vfs.entry(opened.ino) is not opened  # released: rebuilt on demand like any other


def test_a_directory_larger_than_the_cache_is_listed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own children must not push a listed directory out: every lookup in it would list it again."""
    import stasisfs.mount.vfs as vfs_module

    monkeypatch.setattr(vfs_module, "LIVE_ENTRIES", 50)
    src = MemorySource()
    src.snapshot(src.directory(b"", [src.directory(b"big", [src.file(f"f{n:04}".encode(), b"x") for n in range(1000)])]), 0)
    vfs = Vfs(src)
    big = walk(vfs, f"snapshots/{snapshot_names(src.snaps)[0][0]}/big")
    names = [name for _, name, _ in vfs.listing(big, 0)]
    listed = vfs.entry(big)
    children = listed.children
    for name in names:
        assert vfs.lookup(big, name).attr.size == 1
    assert vfs.entry(big) is listed and listed.children is children  # the same listing throughout
    assert sum(1 for _ in vfs.listing(big, 0)) == 1000
