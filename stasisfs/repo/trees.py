"""Reading snapshot trees back: lookups by path and depth-first walks."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

import msgspec

from stasisfs.errors import IntegrityError, UsageError
from stasisfs.format.tree import DIR, Node, decode_tree, split_path
from stasisfs.format.treewalk import walk_nodes
from stasisfs.repo.repository import Repository


class TreeReader:
    def __init__(self, repo: Repository, cache_size: int = 4096) -> None:
        self.repo = repo
        self._cache: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _cached(self, tree_id: bytes) -> list[Node] | None:
        with self._lock:
            nodes = self._cache.get(tree_id)
            if nodes is not None:
                self._cache.move_to_end(tree_id)
            return nodes

    def _keep(self, tree_id: bytes, data: bytes) -> list[Node]:
        try:
            nodes = decode_tree(data)
        except ValueError as exc:
            raise IntegrityError(f"tree {tree_id.hex()[:16]} is malformed: {exc}") from None
        with self._lock:
            self._cache[tree_id] = nodes
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return nodes

    def tree(self, tree_id: bytes) -> list[Node]:
        nodes = self._cached(tree_id)
        return nodes if nodes is not None else self._keep(tree_id, self.repo.blobs.load(tree_id))

    def tree_if_cached(self, tree_id: bytes, max_length: int = 1 << 20) -> list[Node] | None:
        """The tree without waiting on storage, or None (see `Repository.load_blob_if_cached`).

        A malformed tree is None too: `tree`, on the blocking path, reports it.
        """
        nodes = self._cached(tree_id)
        if nodes is not None:
            return nodes
        data = self.repo.blobs.load_if_cached(tree_id, max_length)
        if data is None:
            return None
        try:
            return self._keep(tree_id, data)
        except IntegrityError:
            return None

    def root_node(self, root: bytes) -> Node:
        return Node(name=b"/", type=DIR, mode=0o755, subtree=root)

    def node_at(self, root: bytes, path: bytes) -> Node:
        node = self.root_node(root)
        for part in split_path(path):
            if node.type != DIR or node.subtree is None:
                raise UsageError(f"{path.decode(errors='replace')} is not in the snapshot")
            match = next((n for n in self.tree(node.subtree) if n.name == part), None)
            if match is None:
                raise UsageError(f"{path.decode(errors='replace')} is not in the snapshot")
            node = match
        return node

    def walk(self, node: Node, path: bytes) -> Iterator[tuple[bytes, Node]]:
        """(path, node) for `node` and everything below it, parents before children."""
        for step in walk_nodes(self.tree, node, path):
            assert isinstance(step, tuple)  # no `tolerate` and no `skip`: every step is a node
            yield step


# (code, path): + added, - removed, M content changed, U metadata changed, T type changed.
Change = tuple[str, bytes]


def diff_trees(reader: TreeReader, a: bytes | None, b: bytes | None, path: bytes, out: list[Change]) -> None:
    """Compare two trees; identical subtree ids are skipped without being read."""
    if a == b:
        return
    left = {n.name: n for n in reader.tree(a)} if a else {}
    right = {n.name: n for n in reader.tree(b)} if b else {}
    for name in sorted(left.keys() | right.keys()):
        child = path.rstrip(b"/") + b"/" + name
        old, new = left.get(name), right.get(name)
        if new is None:
            out.append(("-", child + (b"/" if old and old.type == DIR else b"")))
            if old and old.type == DIR:
                diff_trees(reader, old.subtree, None, child, out)
        elif old is None:
            out.append(("+", child + (b"/" if new.type == DIR else b"")))
            if new.type == DIR:
                diff_trees(reader, None, new.subtree, child, out)
        elif old.type != new.type:
            out.append(("T", child))
        elif new.type == DIR:
            if msgspec.structs.replace(old, subtree=None) != msgspec.structs.replace(new, subtree=None):
                out.append(("U", child + b"/"))
            diff_trees(reader, old.subtree, new.subtree, child, out)
        elif old.content != new.content or old.target != new.target:
            out.append(("M", child))
        elif old != new:
            out.append(("U", child))
