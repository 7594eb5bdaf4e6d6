from datetime import UTC, datetime

import pytest

from stasisfs.format.snapshot import Snapshot, resolve
from stasisfs.format.tree import DIR, FILE, SYMLINK, Node, decode_tree, encode_tree


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


def test_xattr_order_does_not_change_the_encoding() -> None:
    one = Node(name=b"f", type=FILE, xattrs={b"user.a": b"1", b"user.b": b"2"})
    other = Node(name=b"f", type=FILE, xattrs={b"user.b": b"2", b"user.a": b"1"})
    assert encode_tree([one]) == encode_tree([other])
    assert list(other.xattrs) == [b"user.b", b"user.a"]  # the caller's node is left alone


def test_format_1_json_trees_still_decode() -> None:
    """Repositories written before tree format 2 hold JSON trees; they must stay readable."""
    legacy = (
        b'{"nodes":[{"name":"\\udcff-x","type":"file","mode":420,"uid":1,"gid":2,"mtime":-5,"size":3,'
        b'"content":["' + b"01" * 32 + b'"],"links":2,"inode":7,"dev":9,"xattrs":{"user.k":"AP8="}},'
        b'{"name":"d","type":"dir","mode":493,"uid":0,"gid":0,"mtime":1,"subtree":"' + b"02" * 32 + b'"},'
        b'{"name":"l","type":"symlink","mode":511,"uid":0,"gid":0,"mtime":1,"target":"/t"}]}'
    )
    nodes = decode_tree(legacy)
    assert nodes == [
        Node(name=b"\xff-x", type=FILE, mode=0o644, uid=1, gid=2, mtime_ns=-5, size=3, content=[b"\x01" * 32],
             links=2, inode=7, device=9, xattrs={b"user.k": b"\x00\xff"}),
        Node(name=b"d", type=DIR, mode=0o755, mtime_ns=1, subtree=b"\x02" * 32),
        Node(name=b"l", type=SYMLINK, mode=0o777, mtime_ns=1, target=b"/t"),
    ]


@pytest.mark.parametrize("blob", [
    b"",
    b"\x92\x03\x90",  # an unknown format version
    b"\x92\x02\x91\x92\xa1a\xa4file",  # a node cut short
    b"\x92\x02\x91\x93\xc4\x01a\xa4disk\x00",  # an unknown node type
    b"\x92\x02\x91\x93\xc4\x01a\xa4file\xa1x",  # a mode that is not an integer
    b'{"nodes": 1}',
    b'{"nodes": [{"name": "a", "type": "file", "mode": "x", "uid": 0, "gid": 0, "mtime": 0}]}',
])
def test_malformed_trees_are_refused_with_value_error(blob: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        decode_tree(blob)


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
