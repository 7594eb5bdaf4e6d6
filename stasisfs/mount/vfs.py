"""The snapshot filesystem model: inodes, lazy directories, views. No pyfuse3, no I/O of its own.

Everything that touches storage goes through a `SnapshotSource` (trees, chunk sizes and
chunks); the FUSE adapter calls the blocking parts of this model from worker threads.

Layout of the mount:

    /snapshots/<time>/<backed-up absolute paths>     one directory per snapshot (clashes: -1, -2)
    /snapshots/latest -> <time>
    /devices/<device>/<time> -> ../../snapshots/<time>, and a per-device latest
    /ids/<short id> -> ../snapshots/<time>
    /tags/<tag>/<time> -> ../../snapshots/<time>
    /versions/<absolute path>/<time>                 each distinct version of a file, named by snapshot

Inode numbers are stable for as long as the model lives. Views, snapshot roots, hard-linked files and
/versions entries get theirs per key, on first sight. Everything else inside a snapshot is numbered in
blocks: a directory's children get one consecutive block when it is first listed, so an inode number
alone says which directory and which position it is (`InodeBlocks`). Their `Entry` objects are only a
bounded cache (`LIVE_ENTRIES`), rebuilt from the parent's tree when needed: memory does not grow with
the number of files the kernel has seen.
"""

from __future__ import annotations

import bisect
import stat
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Protocol

from stasisfs.format.snapshot import Snapshot
from stasisfs.format.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node

ROOT_INODE = 1
# Snapshot entries kept built at once; the rest are rebuilt from their directory's tree on demand.
LIVE_ENTRIES = 16384
# Listed directories are cached apart, bounded by the entries their listings hold: a directory with more
# children than LIVE_ENTRIES must not be pushed out by its own children (every lookup would list it again).
LISTED_CHILDREN = 65536
_TYPE_BITS = {
    FILE: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    FIFO: stat.S_IFIFO,
    CHARDEV: stat.S_IFCHR,
    BLOCKDEV: stat.S_IFBLK,
    SOCKET: stat.S_IFSOCK,
}


class VfsError(Exception):
    """Mapped to an errno by the adapter."""


class NotFound(VfsError):
    """No such entry (ENOENT)."""


class NotADirectory(VfsError):
    """A directory operation on something else (ENOTDIR)."""


class NoSuchAttribute(VfsError):
    """No such extended attribute (ENOATTR)."""


class SnapshotSource(Protocol):
    def snapshots(self) -> list[Snapshot]: ...
    def tree(self, tree_id: bytes) -> list[Node]: ...
    def chunk_sizes(self, chunk_ids: list[bytes]) -> list[int]: ...
    def chunk(self, chunk_id: bytes) -> bytes: ...
    def tree_if_cached(self, tree_id: bytes) -> list[Node] | None: ...
    def chunk_if_cached(self, chunk_id: bytes, max_length: int) -> bytes | None: ...
    def advise(self, chunk_ids: list[bytes]) -> None: ...


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0


@dataclass(slots=True)
class Entry:
    """One inode. `children` is None until the directory is loaded."""

    ino: int
    attr: Attr
    node: Node | None = None  # the tree node, for snapshot content
    target: bytes = b""  # symlinks
    loader: Callable[[Entry], list[tuple[bytes, Entry]]] | None = None
    children: list[tuple[bytes, int]] | None = None
    index: dict[bytes, int] | None = None
    offsets: list[int] | None = None  # cumulative chunk offsets of a file, once known
    lookups: int = 0
    pinned: bool = False  # virtual entries are never dropped
    path: bytes = b""  # inside the snapshot (or the versions path), for messages
    snapshot: Snapshot | None = None
    dynamic: bool = False  # its listing can change while mounted
    shared: bool = False  # a hard-linked file, listed by several directories
    parent: int = 0  # the directory it was last listed in
    position: int = 0  # its place in that listing
    subdirs_read: bool = False  # every subdirectory's tree is loaded (see `read_ahead_trees`)


def time_name(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%dT%H:%M:%S")


def snapshot_names(snapshots: list[Snapshot]) -> list[tuple[str, Snapshot]]:
    """Directory names for snapshots, oldest first; equal times get -1, -2 suffixes."""
    result: list[tuple[str, Snapshot]] = []
    seen: dict[str, int] = {}
    for snap in sorted(snapshots, key=lambda s: (s.time, s.id)):
        base = time_name(snap.time)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.append((base if count == 0 else f"{base}-{count}", snap))
    return result


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}-{count}")
    return result


class ChunkCache:
    """A byte-bounded LRU of decrypted chunks, shared by every open file."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(chunk_id)
            if data is not None:
                self._items.move_to_end(chunk_id)
            return data

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if chunk_id in self._items:
                return
            self._items[chunk_id] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)


class InodeBlocks:
    """Consecutive inode numbers per directory listing: inode -> (directory, position) with no per-inode memory."""

    def __init__(self) -> None:
        self._starts = array("q")  # increasing: blocks are handed out in order
        self._lengths = array("q")
        self._owners = array("q")
        self._start_of: dict[int, int] = {}

    def start_of(self, directory: int) -> int | None:
        return self._start_of.get(directory)

    def add(self, directory: int, start: int, length: int) -> None:
        self._start_of[directory] = start
        if length == 0:
            return
        assert not self._starts or start >= self._starts[-1] + self._lengths[-1]
        self._starts.append(start)
        self._lengths.append(length)
        self._owners.append(directory)

    def locate(self, ino: int) -> tuple[int, int] | None:
        """(directory, position) of an inode handed out in a block, else None."""
        i = bisect.bisect_right(self._starts, ino) - 1
        if i < 0 or ino >= self._starts[i] + self._lengths[i]:
            return None
        return self._owners[i], ino - self._starts[i]


class Vfs:
    def __init__(self, source: SnapshotSource, uid: int = 0, gid: int = 0, cache_bytes: int = 128 << 20,
                 own_device: str | None = None) -> None:
        self.source = source
        # With other devices in the source (from a server), only this device's snapshots fill
        # snapshots/, ids/, tags/ and versions/; the others appear under devices/<name>/.
        self.own_device = own_device
        self.uid, self.gid = uid, gid
        self.cache = ChunkCache(cache_bytes)
        self._entries: dict[int, Entry] = {}  # views, snapshot roots, hard links, /versions: kept
        self._live: OrderedDict[int, Entry] = OrderedDict()  # the rest of the snapshots' content: a bounded cache
        self._listed: OrderedDict[int, Entry] = OrderedDict()  # of which directories with their listing loaded
        self._listed_children = 0
        self._held: dict[int, tuple[Entry, int]] = {}  # open files: their entries stay built (entry, open count)
        self._blocks = InodeBlocks()
        self._inodes: dict[object, int] = {}
        self._next_ino = ROOT_INODE
        self._lock = threading.RLock()
        self._snapshots: list[Snapshot] = []
        self._all_snapshots: list[Snapshot] = []
        self._mtime_ns = 0
        root = self._virtual(("root",), b"", self._load_root)
        assert root.ino == ROOT_INODE
        self.refresh()

    # --- inode bookkeeping ---
    def _ino(self, key: object) -> int:
        ino = self._inodes.get(key)
        if ino is None:
            ino = self._inodes[key] = self._next_ino
            self._next_ino += 1
        return ino

    def _dir_attr(self, ino: int) -> Attr:
        return Attr(ino, stat.S_IFDIR | 0o555, 2, self.uid, self.gid, 0, self._mtime_ns)

    def _virtual(self, key: object, path: bytes, loader: Callable[[Entry], list[tuple[bytes, Entry]]], dynamic: bool = True) -> Entry:
        ino = self._ino(key)
        entry = self._entries.get(ino)
        if entry is None:
            entry = Entry(ino, self._dir_attr(ino), loader=loader, pinned=True, path=path, dynamic=dynamic)
            self._entries[ino] = entry
        return entry

    def _symlink(self, key: object, target: str) -> Entry:
        ino = self._ino(key)
        entry = self._entries.get(ino)
        raw = target.encode()
        if entry is None or entry.target != raw:
            entry = Entry(ino, Attr(ino, stat.S_IFLNK | 0o777, 1, self.uid, self.gid, len(raw), self._mtime_ns), target=raw, pinned=True)
            self._entries[ino] = entry
        return entry

    def _node_entry(self, key: object, snapshot: Snapshot, path: bytes, node: Node) -> Entry:
        """A kept entry, numbered by key: a snapshot root, a hard-linked file, a /versions file."""
        ino = self._ino(key)
        entry = self._entries.get(ino)
        if entry is None:
            entry = self._build(ino, snapshot, path, node)
            self._entries[ino] = entry
        return entry

    def _build(self, ino: int, snapshot: Snapshot, path: bytes, node: Node) -> Entry:
        node_type = node.type
        if node_type == FILE:
            nlink, size, loader = node.links, node.size, None
        elif node_type == DIR:
            nlink, size, loader = 2, 0, self._load_tree_dir
        else:
            nlink, size, loader = 1, len(node.target) if node_type == SYMLINK else 0, None
        attr = Attr(ino, _TYPE_BITS[node_type] | node.mode, nlink, node.uid, node.gid, size, node.mtime_ns, node.rdev)
        return Entry(ino, attr, node, node.target, loader, path=path, snapshot=snapshot, shared=node.hardlink_key is not None)

    def _cached(self, ino: int) -> Entry | None:
        """A block-numbered entry from the caches, marked recently used. Under `_lock`."""
        for cache in (self._listed, self._live):
            entry = cache.get(ino)
            if entry is not None:
                cache.move_to_end(ino)
                return entry
        return None

    def _uncache(self, ino: int) -> None:
        """Under `_lock`."""
        self._live.pop(ino, None)
        listed = self._listed.pop(ino, None)
        if listed is not None:
            self._listed_children -= len(listed.children or ())

    def _keep_listed(self, entry: Entry) -> None:
        """A block-numbered directory whose listing was just loaded moves to the cache of listed directories. Under `_lock`."""
        if entry.ino in self._entries:
            return  # a kept entry (view, snapshot root, /versions): never dropped anyway
        self._live.pop(entry.ino, None)
        self._listed[entry.ino] = entry
        self._listed_children += len(entry.children or ())
        while self._listed_children > LISTED_CHILDREN and len(self._listed) > 1:
            _, old = self._listed.popitem(last=False)
            self._listed_children -= len(old.children or ())

    def _keep_live(self, entry: Entry) -> Entry:
        """Cache a block-numbered entry, dropping the least recently used beyond LIVE_ENTRIES. Under `_lock`."""
        self._live[entry.ino] = entry
        self._live.move_to_end(entry.ino)
        while len(self._live) > LIVE_ENTRIES:
            self._live.popitem(last=False)
        return entry

    # --- snapshots and views ---
    def refresh(self) -> bool:
        """Pick up snapshots added since; True when the list changed."""
        snapshots = self.source.snapshots()
        with self._lock:
            if [s.id for s in snapshots] == [s.id for s in self._all_snapshots]:
                return False
            self._all_snapshots = snapshots
            self._snapshots = [s for s in snapshots if self.own_device is None or s.device == self.own_device]
            self._mtime_ns = max((int(s.time.timestamp() * 1e9) for s in snapshots), default=0)
            for entry in self._entries.values():
                if entry.dynamic:
                    entry.children = entry.index = None  # reloaded on next access, same inode numbers
                    entry.attr.mtime_ns = self._mtime_ns
            return True

    def _load_root(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        return [
            (b"snapshots", self._virtual(("view", b"snapshots"), b"", self._load_snapshots)),
            (b"devices", self._virtual(("view", b"devices"), b"", self._load_devices)),
            (b"ids", self._virtual(("view", b"ids"), b"", self._load_ids)),
            (b"tags", self._virtual(("view", b"tags"), b"", self._load_tags)),
            (b"versions", self._virtual(("versions", b""), b"", self._load_versions)),
        ]

    def _snapshot_root(self, snapshot: Snapshot) -> Entry:
        node = Node(name=b"", type=DIR, mode=0o555, uid=self.uid, gid=self.gid,
                    mtime_ns=int(snapshot.time.timestamp() * 1e9), subtree=snapshot.root)
        return self._node_entry(("s", snapshot.id, b""), snapshot, b"", node)

    def _load_snapshots(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        named = snapshot_names(self._snapshots)
        result = [(name.encode(), self._snapshot_root(snap)) for name, snap in named]
        if named:
            result.append((b"latest", self._symlink(("latest",), named[-1][0])))
        return result

    def _names_by_id(self) -> dict[bytes, str]:
        return {snap.id: name for name, snap in snapshot_names(self._snapshots)}

    def _load_devices(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        own = {s.device for s in self._snapshots}
        result = []
        for device in sorted({s.device for s in self._all_snapshots}):
            loader = partial(self._load_group, device=device) if device in own else partial(self._load_other_device, device=device)
            result.append((device.encode(), self._virtual(("device", device), b"", loader)))
        return result

    def _load_other_device(self, entry: Entry, device: str) -> list[tuple[bytes, Entry]]:
        """Another device's snapshots, as directories of their own (they are not under snapshots/)."""
        named = snapshot_names([s for s in self._all_snapshots if s.device == device])
        result = [(name.encode(), self._snapshot_root(snap)) for name, snap in named]
        if named:
            result.append((b"latest", self._symlink(("group-latest", entry.ino), named[-1][0])))
        return result

    def _load_tags(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        tags = sorted({t for s in self._snapshots for t in s.tags})
        return [(t.encode(), self._virtual(("tag", t), b"", partial(self._load_group, tag=t))) for t in tags]

    def _load_group(self, entry: Entry, device: str | None = None, tag: str | None = None) -> list[tuple[bytes, Entry]]:
        names = self._names_by_id()
        chosen = [s for s in sorted(self._snapshots, key=lambda s: (s.time, s.id))
                  if (device is None or s.device == device) and (tag is None or tag in s.tags)]
        result = [(names[s.id].encode(), self._symlink(("group-link", entry.ino, s.id), f"../../snapshots/{names[s.id]}")) for s in chosen]
        if chosen:
            result.append((b"latest", self._symlink(("group-latest", entry.ino), names[chosen[-1].id])))
        return result

    def _load_ids(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        names = self._names_by_id()
        ordered = sorted(self._snapshots, key=lambda s: s.id)
        short = unique_names([s.short_id for s in ordered])
        return [(n.encode(), self._symlink(("id-link", s.id), f"../snapshots/{names[s.id]}")) for n, s in zip(short, ordered, strict=True)]

    # --- snapshot content ---
    def _load_tree_dir(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        assert entry.node is not None
        return self._tree_listing(entry, self.source.tree(entry.node.subtree)) if entry.node.subtree is not None else []

    def _tree_listing(self, entry: Entry, nodes: list[Node]) -> list[tuple[bytes, Entry]]:
        """The directory's entries; numbered in its block (handed out now on its first listing), hard links by key."""
        snapshot = entry.snapshot
        assert snapshot is not None
        base = entry.path + b"/"
        listing = []
        with self._lock:
            start = self._blocks.start_of(entry.ino)
            if start is None:
                start = self._next_ino
                self._next_ino += len(nodes)
                self._blocks.add(entry.ino, start, len(nodes))
            for position, node in enumerate(nodes):
                path = base + node.name
                hardlink = node.hardlink_key
                if hardlink:
                    child = self._node_entry(("h", snapshot.id, *hardlink), snapshot, path, node)
                else:
                    ino = start + position
                    child = self._peek(ino) or self._keep_live(self._build(ino, snapshot, path, node))
                listing.append((node.name, child))
        return listing

    def _node_at(self, snapshot: Snapshot, path: bytes) -> Node | None:
        node = Node(name=b"", type=DIR, subtree=snapshot.root)
        for part in [p for p in path.split(b"/") if p]:
            if node.type != DIR or node.subtree is None:
                return None
            node = next((n for n in self.source.tree(node.subtree) if n.name == part), None)  # type: ignore[assignment]
            if node is None:
                return None
        return node

    def _load_versions(self, entry: Entry) -> list[tuple[bytes, Entry]]:
        """Subdirectories for every name found at this path in any snapshot; a version per distinct file state."""
        names = self._names_by_id()
        subdirs: dict[bytes, None] = {}
        versions: list[tuple[bytes, Entry]] = []
        seen_states: set[object] = set()
        for snap in sorted(self._snapshots, key=lambda s: (s.time, s.id)):
            node = self._node_at(snap, entry.path)
            if node is None:
                continue
            if node.type == DIR and node.subtree is not None:
                for child in self.source.tree(node.subtree):
                    subdirs.setdefault(child.name)
            elif node.type != DIR and entry.path:
                state = (node.type, tuple(node.content), node.size, node.target)
                if state in seen_states:
                    continue  # unchanged since the previous version
                seen_states.add(state)
                versions.append((names[snap.id].encode(), self._node_entry(("vf", snap.id, entry.path), snap, entry.path, node)))
        result = [(name, self._virtual(("versions", entry.path + b"/" + name), entry.path + b"/" + name, self._load_versions))
                  for name in subdirs]
        taken = {name for name, _ in result}
        return result + [(name if name not in taken else name + b"@", e) for name, e in versions]

    # --- operations ---
    def entry(self, ino: int) -> Entry:
        """The entry of an inode the kernel knows; may block, to rebuild it from its directory's tree."""
        entry = self._materialize(ino, wait=True)
        assert entry is not None
        return entry

    def entry_at_hand(self, ino: int) -> Entry | None:
        """The entry, or None when rebuilding it would wait on storage (then call `entry` from a thread)."""
        return self._materialize(ino, wait=False)

    def _peek(self, ino: int) -> Entry | None:
        """The entry if it is built now; never rebuilds."""
        entry = self._entries.get(ino) or self._live.get(ino) or self._listed.get(ino)
        if entry is None and ino in self._held:
            entry = self._held[ino][0]
        return entry

    def hold(self, entry: Entry) -> None:
        """Keep this entry built while its file is open: one `release` per `hold`."""
        with self._lock:
            held, count = self._held.get(entry.ino) or (entry, 0)
            self._held[entry.ino] = (held, count + 1)

    def release(self, ino: int) -> None:
        with self._lock:
            held = self._held.get(ino)
            if held is not None:
                if held[1] <= 1:
                    del self._held[ino]
                else:
                    self._held[ino] = (held[0], held[1] - 1)

    def _materialize(self, ino: int, wait: bool) -> Entry | None:
        entry = self._entries.get(ino)
        if entry is not None:
            return entry
        held = self._held.get(ino)
        if held is not None:
            return held[0]
        with self._lock:
            entry = self._cached(ino)
            if entry is not None:
                return entry
            place = self._blocks.locate(ino)
        if place is None:
            raise NotFound(f"inode {ino} is not known")
        directory_ino, position = place
        directory = self._materialize(directory_ino, wait)
        if directory is None:
            return None
        assert directory.node is not None and directory.node.subtree is not None
        subtree = directory.node.subtree
        nodes = self.source.tree(subtree) if wait else self.source.tree_if_cached(subtree)
        if nodes is None:
            return None
        node = nodes[position]
        assert directory.snapshot is not None
        with self._lock:
            entry = self._cached(ino)
            if entry is None:
                entry = self._keep_live(self._build(ino, directory.snapshot, directory.path + b"/" + node.name, node))
            entry.parent, entry.position = directory_ino, position
            return entry

    def load(self, ino: int) -> None:
        """Blocking: read the directory's tree. Safe to call from several threads."""
        entry = self.entry(ino)
        if entry.loader is None:
            raise NotADirectory(f"inode {ino} is not a directory")
        if entry.children is None:
            self._install(entry, entry.loader(entry))

    def _install(self, entry: Entry, listing: list[tuple[bytes, Entry]]) -> None:
        ino = entry.ino
        with self._lock:
            if entry.children is not None:
                return
            children = []
            index = {}
            for position, (name, child) in enumerate(listing):
                child.parent = ino
                child.position = position
                children.append((name, child.ino))
                index[name] = child.ino
            entry.children, entry.index = children, index
            self._keep_listed(entry)

    def try_load(self, ino: int) -> bool:
        """Load a snapshot directory only if its tree is at hand without waiting on storage."""
        entry = self.entry(ino)
        if entry.children is not None:
            return True
        if entry.loader != self._load_tree_dir or entry.node is None:
            return False
        subtree = entry.node.subtree
        nodes = self.source.tree_if_cached(subtree) if subtree is not None else []  # no tree: it lists empty
        if nodes is None:
            return False
        self._install(entry, self._tree_listing(entry, nodes))
        return True

    def lookup(self, parent: int, name: bytes) -> Entry:
        """Non-blocking once `load(parent)` ran. Counts a lookup."""
        entry = self.entry(parent)
        if entry.loader is None:
            raise NotADirectory("not a directory")
        if entry.index is None:
            self.load(parent)
        assert entry.index is not None
        ino = entry.index.get(name)
        if ino is None:
            raise NotFound(name.decode(errors="replace"))
        child = self.entry(ino)
        child.lookups += 1
        return child

    def listing(self, ino: int, start: int) -> Iterator[tuple[int, bytes, Entry]]:
        """(cursor of the next entry, name, entry) from position `start`; cursors are stable."""
        entry = self.entry(ino)
        if entry.children is None:
            self.load(ino)
        children = entry.children
        assert children is not None
        for position in range(start, len(children)):
            name, child_ino = children[position]
            yield position + 1, name, self.entry(child_ino)

    def entries_after(self, directory: int, position: int, count: int) -> list[Entry]:
        """The entries listed after `position` (-1: from the start) in a loaded directory: what a sequential reader opens next."""
        parent = self._peek(directory)
        if parent is None or parent.children is None:
            return []
        result = []
        for _, child_ino in parent.children[position + 1 : position + 1 + count]:
            child = self._peek(child_ino)
            if child is not None:
                result.append(child)
        return result

    def next_file_after(self, ino: int, previous: int, max_gap: int = 64) -> bool:
        """Whether this file is the first regular file listed after position `previous` (-1: the directory's first).

        A reader that opens it next goes through the directory in order; other entries between (a tar
        recursing into subdirectories) do not break that. Far gaps are not looked at.
        """
        entry = self._peek(ino)
        parent = self._peek(entry.parent) if entry is not None else None
        if entry is None or parent is None or parent.children is None or not 0 <= entry.position - previous - 1 <= max_gap:
            return False
        gap = entry.position - previous - 1
        between = self.entries_after(entry.parent, previous, gap)
        return len(between) == gap and not any(stat.S_ISREG(e.attr.mode) for e in between)

    def read_ahead_trees(self, ino: int, max_trees: int) -> list[int]:
        """Load, breadth first, the trees of unloaded directories below this loaded one, up to `max_trees`.

        A walker (find, a file manager) opens them next. Loaded here in one run, they cost less than
        loaded one per opened directory (docs/architecture.md has the figures), and a directory
        marked `subdirs_read` costs nothing more when opened. Only trees at hand without
        waiting on storage are loaded; the directories whose trees would wait are returned (for
        `advise_trees`), and what lies below them is left for later.
        """
        waiting: list[int] = []
        queue = deque([ino])
        loaded = 0
        while queue:
            directory = self._peek(queue.popleft())
            if directory is None or directory.children is None or directory.subdirs_read:
                continue  # a directory whose subdirectories are in was read ahead from already: its depths are its own to start
            complete = True
            for _, child_ino in directory.children:
                child = self._peek(child_ino)
                if child is None or child.loader != self._load_tree_dir:
                    continue
                if child.children is None:
                    if loaded >= max_trees:
                        complete = False
                        break
                    if not self.try_load(child_ino):
                        waiting.append(child_ino)
                        complete = False
                        continue
                    loaded += 1
                queue.append(child_ino)
            directory.subdirs_read = complete
            if loaded >= max_trees:
                break
        return waiting

    def advise_trees(self, inos: list[int]) -> None:
        """Hint that these directories' trees will be read soon."""
        ids = [e.node.subtree for e in (self._peek(i) for i in inos) if e is not None and e.node is not None and e.node.subtree]
        if ids:
            self.source.advise(ids)

    def advise_files(self, entries: list[Entry], max_bytes: int) -> None:
        """Hint that these files' first chunks will be read soon."""
        ids = []
        for entry in entries:
            if entry.node is not None and entry.node.content and stat.S_ISREG(entry.attr.mode):
                ids.append(entry.node.content[0])
                max_bytes -= min(entry.node.size, 1 << 20)
                if max_bytes <= 0:
                    break
        if ids:
            self.source.advise(ids)

    def forget(self, ino: int, count: int) -> None:
        entry = self._peek(ino)
        if entry is None:
            return
        entry.lookups = max(0, entry.lookups - count)
        if entry.lookups == 0 and not entry.pinned and entry.children is not None:
            with self._lock:
                self._release(entry)

    def _release(self, directory: Entry) -> None:
        """The kernel dropped this directory: let its listing go, with every entry below it the kernel no longer references.

        That includes trees read ahead but never listed to the kernel. The kernel cannot reference an
        entry whose directory it dropped (a child's dentry pins its parent), so an unreferenced
        subdirectory goes with all it holds. Inode numbers stay reserved: a reload gives the same numbers.
        """
        stack = [directory]
        while stack:
            current = stack.pop()
            for _, child_ino in current.children or ():
                child = self._peek(child_ino)
                if child is None or child.lookups or child.pinned or child.shared:
                    continue
                if child.children is not None:
                    stack.append(child)
                if self._entries.pop(child_ino, None) is None:
                    self._uncache(child_ino)
            if self._listed.get(current.ino) is current:  # still referenced: back among the unlisted
                self._uncache(current.ino)
                self._keep_live(current)
            current.children = current.index = None
            current.subdirs_read = False

    def readlink(self, ino: int) -> bytes:
        entry = self.entry(ino)
        if not stat.S_ISLNK(entry.attr.mode):
            raise NotFound("not a symlink")
        return entry.target

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        node = self.entry(ino).node
        return node.xattrs if node is not None else {}

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.xattrs(ino).get(name)
        if value is None:
            raise NoSuchAttribute(name.decode(errors="replace"))
        return value

    # --- reading ---
    def file_offsets(self, ino: int) -> list[int] | None:
        """Cumulative chunk offsets if known without I/O (single-chunk files always are)."""
        entry = self.entry(ino)
        if entry.offsets is None and entry.node is not None and len(entry.node.content) <= 1:
            entry.offsets = [0, entry.node.size] if entry.node.content else [0]
        return entry.offsets

    def load_offsets(self, ino: int) -> list[int]:
        """Blocking: the plaintext size of every chunk, from the index."""
        entry = self.entry(ino)
        offsets = self.file_offsets(ino)
        if offsets is None:
            assert entry.node is not None
            offsets = [0]
            for size in self.source.chunk_sizes(entry.node.content):
                offsets.append(offsets[-1] + size)
            entry.offsets = offsets
        return offsets

    def read_plan(self, ino: int, offset: int, size: int) -> list[tuple[int, bytes]]:
        """(chunk position, chunk id) covering [offset, offset+size); needs `load_offsets` first."""
        entry = self.entry(ino)
        offsets = entry.offsets
        assert offsets is not None and entry.node is not None
        end = min(offset + size, offsets[-1])
        if offset >= end:
            return []
        first = bisect.bisect_right(offsets, offset) - 1
        last = bisect.bisect_left(offsets, end) - 1
        return [(i, entry.node.content[i]) for i in range(first, last + 1)]

    def assemble(self, ino: int, offset: int, size: int, chunks: dict[int, bytes]) -> bytes:
        offsets = self.entry(ino).offsets
        assert offsets is not None
        end = min(offset + size, offsets[-1])
        parts = []
        for position in sorted(chunks):
            start = offsets[position]
            data = chunks[position]
            parts.append(data[max(0, offset - start) : max(0, end - start)])
        return b"".join(parts)

    def describe(self, ino: int) -> str:
        entry = self._peek(ino)
        if entry is None or entry.snapshot is None:
            return f"inode {ino}"
        return f"{entry.path.decode(errors='replace') or '/'} in snapshot {entry.snapshot.short_id}"

    @property
    def entry_count(self) -> int:
        """Entries built now (kept and cached), not every inode handed out."""
        return len(self._entries) + len(self._live) + len(self._listed)

