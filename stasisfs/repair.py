"""Healing with redundancy: damaged or missing packs are replaced from a verified copy elsewhere.

`heal_local` fetches good copies of the local repository's bad packs from the
remotes; `heal_remote` re-uploads a remote's bad objects from the local copy
(a PUT replaces a stored copy only when that copy fails its hash). What no
copy can heal is reported as the files it takes with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import StasisError
from .pack import decode_index
from .remote import RemoteClient
from .remotes import DeviceRemotes, Remote
from .repository import Repository
from .storage import write_atomic
from .tree import DIR, FILE, decode_tree


@dataclass
class HealReport:
    checked: int = 0
    healed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # pack ids no copy could heal
    lost_files: list[str] = field(default_factory=list)


def indexed_packs(repo: Repository) -> dict[bytes, tuple[int, list[bytes]]]:
    """pack id -> (size, chunk ids) from the index objects."""
    packs: dict[bytes, tuple[int, list[bytes]]] = {}
    for object_id in repo.list_objects("index"):
        for pack in decode_index(repo.cipher, repo.read_object_raw("index", object_id)):
            packs[pack.pack_id] = (pack.size, [e.chunk_id for e in pack.blobs])
    return packs


def local_pack_ok(repo: Repository, pack_id: bytes, size: int) -> bool:
    path = repo.pack_path(pack_id)
    try:
        if path.stat().st_size != size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(4 << 20):
                digest.update(block)
        return digest.hexdigest() == pack_id.hex()
    except FileNotFoundError:
        return False


def affected_files(repo: Repository, lost_chunks: set[bytes]) -> Iterator[str]:
    """`<snapshot short id>:<path>` of every file (or directory) that needs a lost blob."""
    for snapshot in repo.snapshots():
        stack: list[tuple[bytes, bytes]] = [(snapshot.root, b"")]
        while stack:
            tree_id, path = stack.pop()
            if tree_id in lost_chunks:
                yield f"{snapshot.short_id}:{os.fsdecode(path) or '/'} (a whole directory)"
                continue
            try:
                nodes = decode_tree(repo.load_blob(tree_id))
            except StasisError:
                continue
            for node in nodes:
                child = path + b"/" + node.name
                if node.type == DIR and node.subtree is not None:
                    stack.append((node.subtree, child))
                elif node.type == FILE and lost_chunks.intersection(node.content):
                    yield f"{snapshot.short_id}:{os.fsdecode(child)}"


def heal_local(repo: Repository, say: Callable[[str], None]) -> HealReport:
    report = HealReport()
    remotes = DeviceRemotes(repo.id).all()
    packs = indexed_packs(repo)
    lost_chunks: set[bytes] = set()
    for pack_id, (size, chunks) in sorted(packs.items()):
        report.checked += 1
        if local_pack_ok(repo, pack_id, size):
            continue
        say(f"pack {pack_id.hex()} is damaged or missing here")
        if _fetch_good_copy(repo, pack_id, remotes, say):
            report.healed.append(pack_id.hex())
        else:
            report.lost.append(pack_id.hex())
            lost_chunks.update(chunks)
    if lost_chunks:
        report.lost_files = sorted(affected_files(repo, lost_chunks))
    return report


def _fetch_good_copy(repo: Repository, pack_id: bytes, remotes: list[Remote], say: Callable[[str], None]) -> bool:
    for remote in remotes:
        try:
            data = remote.client().get_object(remote.device, "data", pack_id.hex())  # verified against the id
        except StasisError as exc:
            say(f"  no good copy on {remote.name}: {exc}")
            continue
        path = repo.pack_path(pack_id)
        if path.exists():
            path.rename(path.with_name(path.name + ".damaged"))  # kept aside, never silently lost
        write_atomic(path, data)
        say(f"  healed from {remote.name}")
        return True
    return False


def heal_remote(repo: Repository, remote: Remote, read_data: bool, say: Callable[[str], None]) -> HealReport:
    """Re-upload what `remote` lacks or holds damaged, from good local copies."""
    report = HealReport()
    client: RemoteClient = remote.client()
    packs = indexed_packs(repo)
    held = {bytes.fromhex(i): n for i, n in client.list_objects(remote.device, "data")}
    lost_chunks: set[bytes] = set()
    for pack_id, (size, chunks) in sorted(packs.items()):
        report.checked += 1
        bad = held.get(pack_id) != size
        if not bad and read_data:
            try:
                client.get_object(remote.device, "data", pack_id.hex())
            except StasisError:
                bad = True
        if not bad:
            continue
        say(f"pack {pack_id.hex()} is damaged or missing on {remote.name}")
        if local_pack_ok(repo, pack_id, size):
            client.put_object(remote.device, "data", pack_id.hex(), repo.pack_path(pack_id).read_bytes())
            report.healed.append(pack_id.hex())
            say("  re-uploaded from the local copy")
        else:
            report.lost.append(pack_id.hex())
            lost_chunks.update(chunks)
    for kind in ("index", "snapshots"):
        for object_id in sorted(client.missing(remote.device, kind, repo.list_objects(kind))):
            client.put_object(remote.device, kind, object_id, repo.read_object_raw(kind, object_id))
            report.healed.append(object_id)
    if lost_chunks:
        report.lost_files = sorted(affected_files(repo, lost_chunks))
    return report
