"""The snapshot tree model and its serialisation. Pure: no I/O.

A directory is one *tree blob*: canonical JSON listing its entries sorted by
name bytes. A child directory is referenced by the keyed id of its own tree
blob, so the trees form a Merkle DAG and an unchanged directory serialises to
the same bytes, hence the same id, and costs nothing in the next snapshot.

Names, symlink targets and xattr names are bytes on disk; they travel through
JSON as `os.fsdecode` strings (surrogateescape) with `ensure_ascii`, which is
lossless for any byte string.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
FIFO = "fifo"
CHARDEV = "chardev"
BLOCKDEV = "blockdev"
SOCKET = "socket"
NODE_TYPES = (FILE, DIR, SYMLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET)


@dataclass(slots=True)
class Node:
    name: bytes
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    content: list[bytes] = field(default_factory=list)
    subtree: bytes | None = None
    target: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    # Hardlink identity, recorded only for files with more than one link.
    links: int = 1
    inode: int = 0
    device: int = 0

    @property
    def hardlink_key(self) -> tuple[int, int] | None:
        return (self.device, self.inode) if self.type == FILE and self.links > 1 else None

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": os.fsdecode(self.name),
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime": self.mtime_ns,
        }
        if self.type == FILE:
            d["size"] = self.size
            d["content"] = [c.hex() for c in self.content]
            if self.links > 1:
                d["links"], d["inode"], d["dev"] = self.links, self.inode, self.device
        elif self.type == DIR:
            d["subtree"] = self.subtree.hex() if self.subtree else ""
        elif self.type == SYMLINK:
            d["target"] = os.fsdecode(self.target)
        elif self.type in (CHARDEV, BLOCKDEV):
            d["rdev"] = self.rdev
        if self.xattrs:
            d["xattrs"] = {os.fsdecode(k): base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        """Decode one node. Hot: a mount decodes every entry it lists, so this stays flat."""
        try:
            node_type = d["type"]
            if node_type not in NODE_TYPES:
                raise ValueError(f"unknown node type {node_type!r}")
            get = d.get
            content = get("content")
            subtree = get("subtree")
            target = get("target")
            xattrs = get("xattrs")
            node = cls(
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
        if not (type(node.mode) is int and type(node.uid) is int and type(node.gid) is int and type(node.mtime_ns) is int
                and type(node.size) is int and type(node.rdev) is int and type(node.links) is int):
            raise ValueError("malformed tree node: a numeric field is not an integer")
        return node


def encode_tree(nodes: list[Node]) -> bytes:
    ordered = sorted(nodes, key=lambda n: n.name)
    return json.dumps({"nodes": [n.to_dict() for n in ordered]}, separators=(",", ":"), ensure_ascii=True).encode()


def decode_tree(data: bytes) -> list[Node]:
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ValueError("malformed tree blob")
    return [Node.from_dict(n) for n in doc["nodes"]]


def split_path(path: bytes) -> list[bytes]:
    """`/a//b/` -> [b"a", b"b"]; the tree root is the filesystem root."""
    return [part for part in path.split(b"/") if part and part != b"."]
