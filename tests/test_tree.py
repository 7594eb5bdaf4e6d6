from datetime import UTC, datetime

import pytest

from stasisfs.snapshot import Snapshot, resolve
from stasisfs.tree import DIR, FILE, SYMLINK, Node, decode_tree, encode_tree


def test_tree_roundtrip_with_hostile_names() -> None:
    nodes = [
        Node(name=b"\xff\xfe-not-utf8", type=FILE, mode=0o4755, size=3, content=[b"\x01" * 32], links=2, inode=7, device=9),
        Node(name=b"new\nline", type=DIR, mode=0o1777, subtree=b"\x02" * 32, mtime_ns=-1_500_000_000_123),
        Node(name=b"l", type=SYMLINK, target=b"/nowhere/\xe9", xattrs={b"user.k": b"\x00\xff"}),
        Node(name=b"n" * 255, type=FILE, mtime_ns=4_102_444_800_000_000_001),
    ]
    decoded = decode_tree(encode_tree(nodes))
    assert sorted(decoded, key=lambda n: n.name) == sorted(nodes, key=lambda n: n.name)


def test_encoding_is_canonical() -> None:
    a = [Node(name=b"b", type=FILE), Node(name=b"a", type=FILE)]
    assert encode_tree(a) == encode_tree(list(reversed(a)))


def snap(id_hex: str, second: int) -> Snapshot:
    return Snapshot(time=datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC), device="d", paths=[b"/x"], root=b"",
                    id=bytes.fromhex(id_hex))


def test_resolve_latest_and_prefixes() -> None:
    snaps = [snap("aa" * 32, 1), snap("ab" * 32, 2)]
    assert resolve(snaps, "latest").id == bytes.fromhex("ab" * 32)
    assert resolve(snaps, "aaa").id == bytes.fromhex("aa" * 32)
    with pytest.raises(LookupError, match="ambiguous"):
        resolve(snaps, "a")
    with pytest.raises(LookupError, match="no snapshot"):
        resolve(snaps, "ff")


def test_snapshot_encoding_roundtrip() -> None:
    s = snap("aa" * 32, 1)
    s.paths = [b"/\xff/home"]
    back = Snapshot.decode(s.encode(), s.id)
    assert back.paths == s.paths and back.time == s.time
