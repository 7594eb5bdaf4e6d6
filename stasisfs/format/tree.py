"""The snapshot tree model and its serialisation. Pure: no I/O.

A directory is one *tree blob*: its entries sorted by name bytes, in a canonical
MessagePack encoding. A child directory is referenced by the keyed id of its own
tree blob, so the trees form a Merkle DAG and an unchanged directory serialises
to the same bytes, hence the same id, and costs nothing in the next snapshot.

Names, symlink targets, xattrs and chunk ids are raw bytes on the wire, so any
byte string survives. A mount decodes every directory it shows, so decoding is
done by msgspec straight into `Node` structs, with type checks, in C.

Repositories written before format 2 hold JSON trees; `decode_tree` reads both.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Final, Literal

import msgspec

FILE: Final = "file"
DIR: Final = "dir"
SYMLINK: Final = "symlink"
FIFO: Final = "fifo"
CHARDEV: Final = "chardev"
BLOCKDEV: Final = "blockdev"
SOCKET: Final = "socket"
NodeType = Literal["file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket"]
NODE_TYPES: tuple[NodeType, ...] = (FILE, DIR, SYMLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET)

TREE_FORMAT = 2


# Encoded as a positional array in this field order (docs/format.md). Nodes hold no
# references to other nodes, so they can stay out of the cycle collector (gc=False).
class Node(msgspec.Struct, array_like=True, gc=False):
    name: bytes
    type: NodeType
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    content: list[bytes] = []
    subtree: bytes | None = None
    target: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = {}
    # Hardlink identity, recorded only for files with more than one link.
    links: int = 1
    inode: int = 0
    device: int = 0

    @property
    def hardlink_key(self) -> tuple[int, int] | None:
        return (self.device, self.inode) if self.type == FILE and self.links > 1 else None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[Literal[2], list[Node]])  # 2: TREE_FORMAT (a Literal takes no names)


def encode_tree(nodes: list[Node]) -> bytes:
    return _encoder.encode((TREE_FORMAT, [_canonical(n) for n in sorted(nodes, key=lambda n: n.name)]))


def _canonical(node: Node) -> Node:
    """Maps are written in insertion order: put xattrs in name order so equal trees encode equally."""
    names = list(node.xattrs)
    if len(names) > 1 and names != sorted(names):
        return msgspec.structs.replace(node, xattrs=dict(sorted(node.xattrs.items())))
    return node


def decode_tree(data: bytes) -> list[Node]:
    if data[:1] == b"{":
        return _decode_json_tree(data)
    try:
        return _decoder.decode(data)[1]
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(f"malformed tree blob: {exc}") from None


def _decode_json_tree(data: bytes) -> list[Node]:
    """Format 1: JSON `{"nodes": [...]}` with fsdecoded names and hex ids."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ValueError("malformed tree blob")
    return [_node_from_json(n) for n in doc["nodes"]]


def _node_from_json(d: dict[str, Any]) -> Node:
    try:
        node_type = d["type"]
        if node_type not in NODE_TYPES:
            raise ValueError(f"unknown node type {node_type!r}")
        get = d.get
        content = get("content")
        subtree = get("subtree")
        target = get("target")
        xattrs = get("xattrs")
        node = Node(
            os.fsencode(d["name"]), node_type, d["mode"], d["uid"], d["gid"], d["mtime"], get("size", 0),
            list(map(bytes.fromhex, content)) if content else [],
            bytes.fromhex(subtree) if subtree else None,
            os.fsencode(target) if target else b"",
            get("rdev", 0),
            {os.fsencode(k): base64.b64decode(v) for k, v in xattrs.items()} if xattrs else {},
            get("links", 1), get("inode", 0), get("dev", 0),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed tree node: {exc}") from None
    if not all(type(v) is int for v in (node.mode, node.uid, node.gid, node.mtime_ns, node.size, node.rdev, node.links)):
        raise ValueError("malformed tree node: a numeric field is not an integer")
    return node


def split_path(path: bytes) -> list[bytes]:
    """`/a//b/` -> [b"a", b"b"]; the tree root is the filesystem root."""
    return [part for part in path.split(b"/") if part and part != b"."]
