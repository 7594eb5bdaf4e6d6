"""Reading file metadata into tree nodes, and writing it back on restore."""

from __future__ import annotations

import errno
import os
import stat

from stasisfs.format.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node, NodeType

_TYPES: dict[int, NodeType] = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHARDEV,
    stat.S_IFBLK: BLOCKDEV,
    stat.S_IFSOCK: SOCKET,
}
_IGNORED_XATTR_ERRORS = (errno.ENOTSUP, errno.ENODATA, errno.EPERM, errno.EACCES)


def node_type(st: os.stat_result) -> NodeType:
    return _TYPES[stat.S_IFMT(st.st_mode)]


def read_xattrs(target: bytes | int) -> dict[bytes, bytes]:
    """Extended attributes of a path (not following a symlink) or of an open file descriptor."""
    nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(target, **nofollow)
    except OSError as exc:
        if exc.errno in _IGNORED_XATTR_ERRORS:
            return {}
        raise
    result = {}
    for name in names:
        try:
            result[os.fsencode(name)] = os.getxattr(target, name, **nofollow)
        except OSError as exc:
            if exc.errno not in _IGNORED_XATTR_ERRORS:
                raise
    return result


def node_from_stat(name: bytes, path: bytes, st: os.stat_result, xattrs_later: bool = False) -> Node:
    """`xattrs_later`: the caller reads the xattrs when it knows it needs them (`read_xattrs`)."""
    kind = node_type(st)
    node = Node(
        name=name,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        xattrs={} if xattrs_later else read_xattrs(path),
    )
    if kind == FILE:
        node.size = st.st_size
        if st.st_nlink > 1:
            node.links, node.inode, node.device = st.st_nlink, st.st_ino, st.st_dev
    elif kind == SYMLINK:
        node.target = os.readlink(path)
    elif kind in (CHARDEV, BLOCKDEV):
        node.rdev = st.st_rdev
    return node


def create_special(path: bytes, node: Node) -> None:
    """Create a FIFO, device node or socket placeholder."""
    if node.type == FIFO:
        os.mkfifo(path, 0o600)
    elif node.type in (CHARDEV, BLOCKDEV):
        kind = stat.S_IFCHR if node.type == CHARDEV else stat.S_IFBLK
        os.mknod(path, kind | 0o600, node.rdev)
    elif node.type == SOCKET:
        os.mknod(path, stat.S_IFSOCK | 0o600)


def apply_metadata(path: bytes, node: Node, as_root: bool) -> list[str]:
    """Owner, xattrs, mode, then times (last, since the others touch ctime/mtime). Returns warnings."""
    warnings = []
    if as_root:
        os.lchown(path, node.uid, node.gid)
    for name, value in node.xattrs.items():
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            warnings.append(f"cannot restore xattr {os.fsdecode(name)} on {os.fsdecode(path)}: {exc.strerror}")
    if node.type != SYMLINK:
        os.chmod(path, node.mode)  # after chown, which clears setuid/setgid
    os.utime(path, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
    return warnings
