"""The one walk over snapshot trees, shared by check, prune, repair and the tree reader.

Pure: the caller hands in how a tree is loaded. Depth-first, children by name, every
directory's node before what is inside it, the same order `ls -R` and restore use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stasisfs.format.tree import DIR, Node


@dataclass(frozen=True)
class Unreadable:
    """A tree that could not be loaded (one of the `tolerate` errors); the walk goes on without it."""

    tree_id: bytes
    path: bytes
    error: Exception


@dataclass(frozen=True)
class Skipped:
    """A tree the caller's `skip` asked not to enter."""

    tree_id: bytes
    path: bytes


Step = tuple[bytes, Node] | Unreadable | Skipped


def child_path(parent: bytes, name: bytes) -> bytes:
    return parent.rstrip(b"/") + b"/" + name


def walk_nodes(load: Callable[[bytes], list[Node]], start: bytes | Node, path: bytes = b"", *, seen: set[bytes] | None = None,
               skip: Callable[[bytes], bool] | None = None, tolerate: tuple[type[Exception], ...] = ()) -> Iterator[Step]:
    """(path, node) for every node under `start` (a tree id, or a node yielded first itself).

    A tree id already in `seen` is not entered again, and is added to it when entered, so one
    set can span several snapshots. Load errors of the `tolerate` kinds become `Unreadable`;
    any other error ends the walk.
    """
    stack: list[tuple[bytes, bytes | Node]] = [(path, start)]
    while stack:
        current_path, item = stack.pop()
        if isinstance(item, Node):
            yield current_path, item
            if item.type == DIR and item.subtree is not None:
                stack.append((current_path, item.subtree))
            continue
        if seen is not None:
            if item in seen:
                continue
            seen.add(item)
        if skip is not None and skip(item):
            yield Skipped(item, current_path)
            continue
        try:
            nodes = load(item)
        except tolerate as exc:
            yield Unreadable(item, current_path, exc)
            continue
        stack.extend((child_path(current_path, node.name), node) for node in reversed(nodes))
