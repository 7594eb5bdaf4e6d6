"""The one tree walk: order, shared `seen`, skipping and tolerated load errors, over trees in a dict."""

import pytest

from stasisfs.format.tree import DIR, FILE, Node
from stasisfs.format.treewalk import Skipped, Step, Unreadable, walk_nodes


def directory(name: bytes, subtree: bytes) -> Node:
    return Node(name=name, type=DIR, mode=0o755, subtree=subtree)


def file(name: bytes) -> Node:
    return Node(name=name, type=FILE, mode=0o644, content=[name])


TREES = {
    b"root": [directory(b"a", b"ta"), file(b"b"), directory(b"c", b"tc")],
    b"ta": [file(b"x"), directory(b"y", b"ty")],
    b"ty": [file(b"z")],
    b"tc": [directory(b"again", b"ty")],
}


def paths(steps: list[Step]) -> list[bytes]:
    return [s[0] if isinstance(s, tuple) else s.path for s in steps]


def test_depth_first_by_name_with_parents_first() -> None:
    steps = list(walk_nodes(TREES.__getitem__, b"root"))
    assert paths(steps) == [b"/a", b"/a/x", b"/a/y", b"/a/y/z", b"/b", b"/c", b"/c/again", b"/c/again/z"]


def test_a_start_node_is_yielded_first_and_paths_join_once() -> None:
    steps = list(walk_nodes(TREES.__getitem__, directory(b"/", b"tc"), b"/"))
    assert paths(steps) == [b"/", b"/again", b"/again/z"]


def test_seen_trees_are_entered_once_across_walks() -> None:
    seen: set[bytes] = set()
    first = paths(list(walk_nodes(TREES.__getitem__, b"root", seen=seen)))
    assert b"/c/again/z" not in first  # ty was entered under /a/y already
    assert list(walk_nodes(TREES.__getitem__, b"ta", seen=seen)) == []
    assert seen == set(TREES)


def test_skipped_and_unreadable_trees_are_reported_and_the_walk_goes_on() -> None:
    def load(tree_id: bytes) -> list[Node]:
        if tree_id == b"tc":
            raise ValueError("damaged")
        return TREES[tree_id]

    steps = list(walk_nodes(load, b"root", skip={b"ty"}.__contains__, tolerate=(ValueError,)))
    unreadable = steps[-1]
    assert isinstance(unreadable, Unreadable) and str(unreadable.error) == "damaged"
    assert [s for s in steps if not isinstance(s, tuple)] == [Skipped(b"ty", b"/a/y"), unreadable]
    assert paths(steps) == [b"/a", b"/a/x", b"/a/y", b"/a/y", b"/b", b"/c", b"/c"]


def test_an_error_not_tolerated_ends_the_walk() -> None:
    with pytest.raises(KeyError):
        list(walk_nodes(TREES.__getitem__, b"missing"))
