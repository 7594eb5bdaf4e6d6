"""forget and prune: drop snapshots, then reclaim the space only they used.

Prune holds the repository's exclusive lock, so no backup can add references
while it decides what is unused (backups wait, or exit 11). It is crash safe
by ordering, like a backup:

1. copy the live blobs of partly used packs into new packs (the sealed boxes
   are copied as they are, after authenticating them);
2. write one index object listing the kept packs' live blobs; the new packs
   have their own;
3. mark the local index cache incomplete, so a prune killed from here on
   forces a rebuild instead of trusting stale entries;
4. delete the old index objects, then the unused and repacked packs;
5. rebuild the local index cache from the index objects.

A kill at any point leaves every live blob reachable from some index object.
Packs left unreferenced by a killed run are harmless orphans that `check`
notes and the next prune deletes. Deletions are recorded for every remote
(`remotes.py` tombstones) before they happen locally; sync applies them
after uploading the new packs and index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from stasisfs.errors import IntegrityError, StasisError
from stasisfs.format.pack import BLOB_TREE, PACK_PAD_FLOOR, PACK_TARGET_SIZE, BlobEntry, PackInfo, open_blob
from stasisfs.format.tree import FILE, decode_tree
from stasisfs.format.treewalk import walk_nodes
from stasisfs.remote.devices import DeviceRemotes
from stasisfs.repo.packer import BlobWriter
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import fsync_dir
from stasisfs.system.crashpoints import crash_point

SMALL_PACK_LIMIT = PACK_TARGET_SIZE // 4  # a pack this small was cut short by the end of its run


@dataclass
class PrunePlan:
    used: set[bytes]
    packs: dict[bytes, PackInfo]
    index_objects: list[str]
    delete: list[bytes] = field(default_factory=list)
    repack: list[bytes] = field(default_factory=list)
    keep: list[bytes] = field(default_factory=list)
    live: dict[bytes, list[BlobEntry]] = field(default_factory=dict)  # pack -> blobs it keeps serving
    consolidate: list[bytes] = field(default_factory=list)  # small packs merged into full ones (also in `repack`)
    used_bytes: int = 0
    unused_bytes: int = 0  # blobs no snapshot uses
    padding_bytes: int = 0  # padding, headers and trailers: all of it comes back when a pack is rewritten

    @property
    def reclaimed_bytes(self) -> int:
        """Bytes freed, less what the rewritten blobs take again (their new packs' padding left out: at most 12%, or one floor)."""
        return sum(self.packs[p].size for p in self.delete + self.repack) - sum(
            sum(e.length for e in self.live[p]) for p in self.repack)


@dataclass
class PruneReport:
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    bytes_freed: int = 0


def forget_snapshots(repo: Repository, snapshot_ids: list[bytes]) -> None:
    """Delete snapshot objects; each remote deletes its copies at its next sync."""
    remotes = DeviceRemotes(repo.id)
    remotes.add_tombstones("snapshots", [s.hex() for s in snapshot_ids])
    for snapshot_id in snapshot_ids:
        (repo.path / "snapshots" / snapshot_id.hex()).unlink(missing_ok=True)
        repo.index.remove_snapshot(snapshot_id)
    fsync_dir(repo.path / "snapshots")


def used_blobs(repo: Repository, say: Callable[[str], None] = lambda s: None) -> set[bytes]:
    """Every tree and chunk a snapshot references."""
    used: set[bytes] = set()
    snapshots = repo.snapshots()
    unreadable = sorted(name for name in repo.damaged if name.startswith("snapshots/"))
    if unreadable:
        # A snapshot that cannot be read may use any pack: freeing "unused" data now could lose it.
        raise StasisError(f"{len(unreadable)} snapshot object(s) are damaged ({', '.join(unreadable)}); prune frees nothing until "
                          "they are healed with `stasisfs repair` (from a remote) or removed with `stasisfs repair snapshots --forget`")
    say(f"finding data used by {len(snapshots)} snapshots")
    load = lambda tree_id: decode_tree(repo.blobs.load(tree_id))  # noqa: E731
    for snapshot in snapshots:
        for step in walk_nodes(load, snapshot.root, seen=used):  # tree ids land in `used` as they are entered
            if isinstance(step, tuple) and step[1].type == FILE:
                used.update(step[1].content)
    return used


def plan_prune(repo: Repository, max_unused_percent: float, say: Callable[[str], None] = lambda s: None) -> PrunePlan:
    used = used_blobs(repo, say)
    index_objects = repo.list_objects("index")
    packs = repo.indexed_packs(index_objects)
    plan = PrunePlan(used, packs, index_objects)
    served: set[bytes] = set()
    unused_of: dict[bytes, int] = {}
    for pack_id in sorted(packs):  # a blob stored twice (after a crash) is served by its first pack only
        live = []
        blobs = packs[pack_id].blobs
        for entry in blobs:
            if entry.chunk_id in used and entry.chunk_id not in served:
                served.add(entry.chunk_id)
                live.append(entry)
        plan.live[pack_id] = live
        live_bytes = sum(e.length for e in live)
        blob_bytes = sum(e.length for e in blobs)
        plan.used_bytes += live_bytes
        unused_of[pack_id] = blob_bytes - live_bytes
        plan.unused_bytes += unused_of[pack_id]
        plan.padding_bytes += packs[pack_id].size - blob_bytes
    missing = used - served
    if missing:
        raise IntegrityError(f"{len(missing)} blobs that snapshots use are in no pack; run `stasisfs check` before pruning")
    partly = []
    for pack_id in sorted(packs):
        if not plan.live[pack_id]:
            plan.delete.append(pack_id)
        elif unused_of[pack_id]:
            partly.append(pack_id)
        else:
            plan.keep.append(pack_id)
    # restic's --max-unused: repack the most wasteful packs until what stays unused is within the limit.
    allowed = plan.used_bytes * max_unused_percent / 100
    remaining = sum(unused_of[p] for p in partly)
    for pack_id in sorted(partly, key=lambda p: unused_of[p] / max(1, packs[p].size), reverse=True):
        if remaining <= allowed:
            plan.keep.append(pack_id)
        else:
            plan.repack.append(pack_id)
            remaining -= unused_of[pack_id]
    consolidate_small_packs(plan)
    return plan


def consolidate_small_packs(plan: PrunePlan) -> None:
    """Merge small packs (each small run writes one, padded to its floor) into full ones.

    Only when they take at least one 1 MiB floor together: the merged pack may be padded to
    that floor, and must not take more room than the packs it replaces. When other packs are
    repacked anyway, the small ones join them: the writer's last pack is then the only small
    one left, so the next prune finds nothing to merge (prune reaches a fixed point).
    """
    small = [p for p in plan.keep + plan.repack if plan.packs[p].size < SMALL_PACK_LIMIT]
    if not small:
        return
    if not plan.repack and (len(small) < 2 or sum(plan.packs[p].size for p in small) < PACK_PAD_FLOOR):
        return  # merging them alone would not pay for the floor
    plan.consolidate = sorted(small)
    plan.keep = [p for p in plan.keep if p not in small]
    plan.repack += [p for p in plan.consolidate if p not in plan.repack]


def execute(repo: Repository, plan: PrunePlan, say: Callable[[str], None] = lambda s: None) -> PruneReport:
    report = PruneReport()
    if not plan.delete and not plan.repack:
        return report
    writer = BlobWriter(repo, dedup=False, spread=False)
    try:
        for pack_id in plan.repack:
            with open(repo.pack_path(pack_id), "rb") as f:
                for entry in plan.live[pack_id]:
                    f.seek(entry.offset)
                    box = f.read(entry.length)
                    open_blob(repo.cipher, entry, box, verify=False)  # never copy a damaged blob into a new pack
                    writer.add_sealed(entry.chunk_id, entry.kind, box, entry.raw_length, content_defined=entry.kind != BLOB_TREE)
            crash_point("prune-repacking")
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    report.packs_written = writer.packs_written
    kept = [PackInfo.of_blobs(p, plan.packs[p].size, plan.live[p]) for p in plan.keep]
    crash_point("prune-repacked")
    fresh = {repo.write_index_object(kept).hex()} if kept else set()
    fresh.update(set(repo.list_objects("index")) - set(plan.index_objects))  # the new packs' own index objects
    stale_index = [i for i in plan.index_objects if i not in fresh]
    doomed = plan.delete + plan.repack
    remotes = DeviceRemotes(repo.id)
    remotes.add_tombstones("index", stale_index)
    remotes.add_tombstones("data", [p.hex() for p in doomed])
    crash_point("prune-indexed")
    repo.index.set_complete(False)  # from here, a killed prune makes the next command rebuild the cache
    say(f"deleting {len(stale_index)} old index objects and {len(doomed)} packs")
    for object_id in stale_index:
        (repo.path / "index" / object_id).unlink(missing_ok=True)
    fsync_dir(repo.path / "index")
    crash_point("prune-index-deleted")
    for number, pack_id in enumerate(doomed):
        if number == len(doomed) // 2:
            crash_point("prune-deleting-packs")
        path = repo.pack_path(pack_id)
        with contextlib.suppress(FileNotFoundError):  # already gone: a killed prune got this far before
            report.bytes_freed += path.stat().st_size
            path.unlink()
    for fan in {repo.pack_path(p).parent for p in doomed}:
        fsync_dir(fan)
    crash_point("prune-packs-deleted")
    repo.rebuild_index(from_packs=False)
    report.packs_deleted = len(plan.delete)
    report.packs_repacked = len(plan.repack)
    return report
