"""Healing with redundancy: damaged or missing packs are replaced from a verified copy elsewhere.

`heal_local` fetches good copies of the local repository's bad packs from the
remotes, and `heal_metadata` of its bad snapshot and index objects; `heal_remote` re-uploads a remote's bad objects from the local copy
(a PUT replaces a stored copy only when that copy fails its hash). What no
copy can heal is reported as the files it takes with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stasisfs.errors import StasisError
from stasisfs.format.pack import BLOB_TREE, PackInfo, blobs_in, unreadable_blobs
from stasisfs.format.tree import DIR, FILE, decode_tree, encode_tree
from stasisfs.format.treewalk import Skipped, walk_nodes
from stasisfs.remote.client import RemoteClient
from stasisfs.remote.devices import DeviceRemotes, Remote
from stasisfs.repo.packer import BlobWriter
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import fsync_dir, write_atomic


@dataclass
class HealReport:
    checked: int = 0
    healed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # pack ids no copy could heal
    lost_files: list[str] = field(default_factory=list)


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


def damaged_chunks(repo: Repository, pack: PackInfo) -> set[bytes]:
    """The chunks of a bad local pack that are really lost: all when it is missing, else those whose box fails."""
    try:
        data = repo.pack_path(pack.pack_id).read_bytes()
    except OSError:
        return {entry.chunk_id for entry in pack.blobs}
    return unreadable_blobs(repo.cipher, pack.blobs, data)


def salvage_blobs(repo: Repository, pack: PackInfo) -> list[tuple[bytes, int, bytes]]:
    """(chunk id, kind, plaintext) of every blob of a bad local pack whose own box still opens and matches its id."""
    try:
        data = repo.pack_path(pack.pack_id).read_bytes()
    except OSError:
        return []
    return [(entry.chunk_id, entry.kind, plain) for entry, plain in blobs_in(repo.cipher, pack.blobs, data) if plain is not None]


def affected_files(repo: Repository, lost_chunks: set[bytes]) -> Iterator[str]:
    """`<snapshot short id>:<path>` of every file (or directory) that needs a lost blob."""
    load = lambda tree_id: decode_tree(repo.blobs.load(tree_id))  # noqa: E731
    for snapshot in repo.snapshots():
        for step in walk_nodes(load, snapshot.root, skip=lost_chunks.__contains__, tolerate=(StasisError,)):
            if isinstance(step, Skipped):
                yield f"{snapshot.short_id}:{os.fsdecode(step.path) or '/'} (a whole directory)"
            elif isinstance(step, tuple) and step[1].type == FILE and lost_chunks.intersection(step[1].content):
                yield f"{snapshot.short_id}:{os.fsdecode(step[0])}"


def heal_local(repo: Repository, say: Callable[[str], None]) -> HealReport:
    report = HealReport()
    remotes = DeviceRemotes(repo.id).all()
    packs = repo.indexed_packs()
    lost_chunks: set[bytes] = set()
    for pack_id, pack in sorted(packs.items()):
        size = pack.size
        report.checked += 1
        if local_pack_ok(repo, pack_id, size):
            continue
        say(f"pack {pack_id.hex()} is damaged or missing here")
        if _fetch_good_copy(repo, pack_id, remotes, say):
            report.healed.append(pack_id.hex())
        else:
            report.lost.append(pack_id.hex())
            lost_chunks.update(damaged_chunks(repo, pack))
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


def heal_metadata(repo: Repository, say: Callable[[str], None]) -> list[str]:
    """Replace damaged snapshot and index objects with copies from a remote that authenticate. Returns the healed names."""
    repo.sync_index()
    repo.snapshots()  # both note what does not open in repo.damaged
    healed = []
    for name in sorted(repo.damaged):
        kind, object_id = name.split("/")
        say(f"{kind} object {object_id} is damaged here")
        for remote in DeviceRemotes(repo.id).all():
            try:
                data = remote.client().get_object(remote.device, kind, object_id)  # verified against the id
            except StasisError as exc:
                say(f"  no good copy on {remote.name}: {exc}")
                continue
            if not repo.authentic(kind, data):
                say(f"  the copy on {remote.name} does not authenticate either")
                continue
            path = repo.path / kind / object_id
            if path.exists():
                path.rename(path.with_name(path.name + ".damaged"))  # kept aside, never silently lost
            write_atomic(path, data)
            if kind == "snapshots":
                repo.index.remove_snapshot(bytes.fromhex(object_id))  # the next sync reads the good copy
            del repo.damaged[name]
            healed.append(name)
            say(f"  healed from {remote.name}")
            break
    repo.sync_index()
    return healed


def set_aside_damaged_snapshots(repo: Repository, say: Callable[[str], None]) -> list[str]:
    """Rename snapshot objects that do not open to `<id>.damaged`: no copy could heal them, and they hold nothing readable."""
    repo.snapshots()
    aside = []
    for name in sorted(n for n in repo.damaged if n.startswith("snapshots/")):
        path = repo.path / name
        if path.exists():
            path.rename(path.with_name(path.name + ".damaged"))
        repo.index.remove_snapshot(bytes.fromhex(name.split("/")[1]))
        del repo.damaged[name]
        aside.append(name)
        say(f"set aside damaged snapshot object {path}.damaged")
    return aside


def heal_remote(repo: Repository, remote: Remote, read_data: bool, say: Callable[[str], None]) -> HealReport:
    """Re-upload what `remote` lacks or holds damaged, from good local copies."""
    report = HealReport()
    client: RemoteClient = remote.client()
    packs = repo.indexed_packs()
    held = {bytes.fromhex(i): n for i, n in client.list_objects(remote.device, "data")}
    lost_chunks: set[bytes] = set()
    for pack_id, pack in sorted(packs.items()):
        size, chunks = pack.size, list(pack.chunk_ids())
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


@dataclass
class SnapshotRepair:
    rewritten: list[tuple[str, str]] = field(default_factory=list)  # (old short id, new short id)
    dropped_files: list[str] = field(default_factory=list)
    packs_set_aside: int = 0
    snapshots_set_aside: list[str] = field(default_factory=list)


def repair_snapshots(repo: Repository, forget_originals: bool, say: Callable[[str], None]) -> SnapshotRepair:
    """Rewrite every snapshot that needs lost data, without what is lost (restic's `repair snapshots`).

    Lost = in a pack that is missing, or in a box that fails authentication in a pack
    that fails its hash here. Those packs are set aside (renamed `*.damaged`) and
    dropped from the index first, so no later backup can deduplicate against their
    blobs; the blobs of theirs that still open are written again into new packs. Files that need a lost chunk are
    dropped; a directory whose tree is lost becomes empty. Repaired snapshots
    get the tag `repaired`; with `forget_originals` the originals are removed.
    """
    from stasisfs.ops.prune import forget_snapshots

    result = SnapshotRepair()
    if forget_originals:
        result.snapshots_set_aside = set_aside_damaged_snapshots(repo, say)
    packs = repo.indexed_packs()
    bad = {p for p, info in packs.items() if not local_pack_ok(repo, p, info.size)}
    # Judged per sealed box: what still opens in a bad pack is kept, written again below into new packs.
    salvaged = [blob for p in sorted(bad) for blob in salvage_blobs(repo, packs[p])]
    if bad:
        good = [info for p, info in packs.items() if p not in bad]
        old_index = repo.list_objects("index")
        fresh = repo.write_index_object(good).hex() if good else None
        repo.index.set_complete(False)
        for object_id in old_index:
            if object_id != fresh:
                (repo.path / "index" / object_id).unlink(missing_ok=True)
        fsync_dir(repo.path / "index")
        for pack_id in bad:
            path = repo.pack_path(pack_id)
            if path.exists():
                path.rename(path.with_name(path.name + ".damaged"))
        repo.rebuild_index(from_packs=False)
        repo.index.clear_files_cache()
        result.packs_set_aside = len(bad)
        say(f"set aside {len(bad)} damaged or missing packs")
    writer = BlobWriter(repo)
    if salvaged:
        try:
            for chunk_id, kind, data in salvaged:
                writer.add(chunk_id, kind, data)
            writer.flush()
        except BaseException:
            writer.abort()
            raise
        say(f"kept {len(salvaged)} chunks of the damaged packs whose own boxes are intact")
    present = repo.index.has_chunk
    memo: dict[bytes, bytes | None] = {}

    def rewrite(tree_id: bytes, path: bytes, snapshot_id: str) -> bytes | None:
        """The id of the tree without lost data; None when the tree itself is lost."""
        if not present(tree_id):
            return None
        if tree_id in memo:
            return memo[tree_id] or tree_id
        nodes, changed = [], False
        for node in decode_tree(repo.blobs.load(tree_id)):
            child = path + b"/" + node.name
            if node.type == FILE and not all(present(c) for c in node.content):
                result.dropped_files.append(f"{snapshot_id}:{os.fsdecode(child)}")
                changed = True
                continue
            if node.type == DIR and node.subtree is not None:
                fixed = rewrite(node.subtree, child, snapshot_id)
                if fixed is None:
                    result.dropped_files.append(f"{snapshot_id}:{os.fsdecode(child)}/ (its listing is lost)")
                    fixed = _empty_tree(writer, repo)
                if fixed != node.subtree:
                    node.subtree = fixed
                    changed = True
            nodes.append(node)
        if not changed:
            memo[tree_id] = None
            return tree_id
        data = encode_tree(nodes)
        new_id = repo.master_keys.chunk_id_of(data)
        writer.add(new_id, BLOB_TREE, data, content_defined=False)
        memo[tree_id] = new_id
        return new_id

    replaced = []
    try:
        for snapshot in repo.snapshots():
            root = rewrite(snapshot.root, b"", snapshot.short_id)
            if root == snapshot.root:
                continue
            writer.flush()
            old_id = snapshot.id
            snapshot.root = root if root is not None else _empty_tree(writer, repo)
            snapshot.tags = sorted({*snapshot.tags, "repaired"})
            writer.flush()
            repo.save_snapshot(snapshot)
            result.rewritten.append((old_id.hex()[:8], snapshot.short_id))
            replaced.append(old_id)
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    if forget_originals and replaced:
        forget_snapshots(repo, replaced)
    return result


def _empty_tree(writer: BlobWriter, repo: Repository) -> bytes:
    data = encode_tree([])
    tree_id = repo.master_keys.chunk_id_of(data)
    writer.add(tree_id, BLOB_TREE, data, content_defined=False)
    return tree_id
