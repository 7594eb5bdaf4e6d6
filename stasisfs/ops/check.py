"""`check`: verify the repository from its own objects, independently of the LMDB cache.

Structure: index objects decode, every indexed pack exists with its size, every
snapshot decodes, every tree reachable from a snapshot decodes and every chunk
it names is indexed. With read-data: every (or a subset of) pack hashes to its
name, its header matches the index, and every blob decrypts to its id.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stasisfs.errors import IntegrityError, StasisError, UsageError
from stasisfs.format.pack import BlobEntry, decode_index, open_blob, parse_pack, unreadable_blobs
from stasisfs.format.tree import FILE, decode_tree
from stasisfs.format.treewalk import Unreadable, walk_nodes
from stasisfs.progress import counted
from stasisfs.remote.devices import Remote
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import storage_id


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    packs_read: int = 0
    snapshots: int = 0
    trees: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_subset(text: str) -> Callable[[list[bytes]], list[bytes]]:
    """`N%` picks that share of packs at random; `n/m` picks the n-th of m slices, as restic does."""
    text = text.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise UsageError(f"--read-data-subset {text!r}: expected N% or n/m") from None
        if not 0 < share <= 100:
            raise UsageError("--read-data-subset percentage must be in (0, 100]")
        return lambda packs: random.sample(packs, max(1, round(len(packs) * share / 100))) if packs else []
    try:
        n, m = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--read-data-subset {text!r}: expected N% or n/m") from None
    if not 1 <= n <= m:
        raise UsageError("--read-data-subset n/m needs 1 <= n <= m")
    return lambda packs: [p for p in packs if p[0] % m == n - 1]


class Checker:
    """Checks the local copy, or with `remote` the copy a remote holds (packs read from there)."""

    def __init__(self, repo: Repository, say: Callable[[str], None] = lambda s: None, remote: Remote | None = None) -> None:
        self.repo = repo
        self.remote = remote
        self.client = remote.client() if remote is not None else None
        self.cipher = repo.cipher
        self.say = say
        self.report = CheckReport()
        self.chunks: dict[bytes, tuple[bytes, BlobEntry]] = {}
        self.pack_sizes: dict[bytes, int] = {}
        self.damaged_packs: set[bytes] = set()
        self.lost_chunks: set[bytes] = set()  # chunks whose own sealed box is gone or fails: what damage costs
        self.pack_entries: dict[bytes, Sequence[BlobEntry]] = {}

    def error(self, message: str) -> None:
        self.report.errors.append(message)
        self.say(f"error: {message}")

    def run(self, read_data: bool = False, subset: str | None = None) -> CheckReport:
        self._check_local_index()
        self._load_index_objects()
        self._check_packs_exist()
        self._check_snapshots()
        for name, why in sorted(self.repo.damaged.items()):
            self.error(f"damaged object {name}: {why}; `stasisfs repair` heals it from a remote, "
                       "`stasisfs repair snapshots --forget` sets a snapshot aside when no copy can")
        self.repo.damaged.clear()  # reported here, as errors
        if read_data or subset:
            packs = sorted(self.pack_sizes)
            chosen = parse_subset(subset)(packs) if subset else packs
            self.say(f"reading {len(chosen)} of {counted(len(packs), 'pack')}")
            for pack_id in chosen:
                self._read_pack(pack_id)
        if self.damaged_packs:
            self._report_affected_files()
        return self.report

    def _report_affected_files(self) -> None:
        from stasisfs.ops.repair import affected_files

        for line in sorted(affected_files(self.repo, self.lost_chunks)):
            self.say(f"affected: {line}")  # what the damage costs, not further problems: the count stays one per damage
        # --read-data: a damaged pack on a remote has the right size, so only reading it finds it again.
        where = f"`stasisfs repair --remote {self.remote.name} --read-data`" if self.remote is not None else "`stasisfs repair` (from a remote's copy)"
        self.report.notes.append(f"{counted(len(self.damaged_packs), 'damaged pack')}; {where} heals {'it' if len(self.damaged_packs) == 1 else 'them'} "
                                 "if a good copy exists")

    def _check_local_index(self) -> None:
        state = self.repo.index_state()
        if state == "missing":
            self.report.notes.append("the local index is missing; the next command rebuilds it (or run `stasisfs repair index`)")
        elif state == "incomplete":  # an interrupted rebuild or prune: the cache, not the repository
            self.report.notes.append("the local index cache is incomplete (an interrupted run); the next command rebuilds it")
        elif state != "ok":  # only a cache: the repository is what is checked, and the next command rebuilds it
            self.report.notes.append(f"{state.split('; run')[0]}; the next command rebuilds it from the repository")

    def _load_index_objects(self) -> None:
        self.say("loading index objects")
        for object_id in self.repo.list_objects("index"):
            try:
                for pack in decode_index(self.cipher, self.repo.read_object_raw("index", object_id)):
                    self.pack_sizes[pack.pack_id] = pack.size
                    self.pack_entries[pack.pack_id] = blobs = pack.blobs
                    for entry in blobs:
                        self.chunks[entry.chunk_id] = (pack.pack_id, entry)
            except (IntegrityError, ValueError) as exc:
                self.error(f"index object {object_id} is damaged ({exc}); run `stasisfs repair index`")

    def _check_packs_exist(self) -> None:
        if self.remote is not None:
            self._check_remote_holds_everything(self.remote)
            return
        self.say(f"checking {counted(len(self.pack_sizes), 'pack')}")
        on_disk = set(self.repo.list_packs())
        remote = self.repo.remote_packs
        on_remote = {bytes.fromhex(i): n for i, n in remote.listing()} if remote is not None and on_disk < self.pack_sizes.keys() else {}
        for pack_id, size in self.pack_sizes.items():
            path = self.repo.pack_path(pack_id)
            if pack_id not in on_disk and remote is not None:  # thin: the pack lives on the remote
                if on_remote.get(pack_id) != size:
                    self.error(f"pack {pack_id.hex()} is {'missing from' if pack_id not in on_remote else 'the wrong size on'} remote {remote.name}")
            elif pack_id not in on_disk:
                self.error(f"pack {pack_id.hex()} is missing")
            elif os.path.getsize(path) != size:
                self.error(f"pack {pack_id.hex()} has the wrong size (damaged or truncated)")
        unindexed = on_disk - self.pack_sizes.keys()
        if unindexed:
            self.report.notes.append(
                f"{len(unindexed)} packs are not in any index object yet (left by an interrupted run); the next backup or `repair index` adds them"
            )

    def _check_remote_holds_everything(self, remote: Remote) -> None:
        assert self.client is not None
        self.say(f"checking that remote {remote.name} holds {len(self.pack_sizes)} packs, the index and the snapshots")
        held = {bytes.fromhex(i): size for i, size in self.client.list_objects(remote.device, "data")}
        for pack_id, size in self.pack_sizes.items():
            if pack_id not in held:
                self.error(f"pack {pack_id.hex()} is missing from remote {remote.name}; `stasisfs sync` uploads it")
            elif held[pack_id] != size:
                self.error(f"pack {pack_id.hex()} has the wrong size on remote {remote.name} (damaged)")
        for kind in ("index", "snapshots"):
            local = self.repo.list_objects(kind)
            for object_id in sorted(self.client.missing(remote.device, kind, local)):
                self.error(f"{kind} object {object_id[:16]} is missing from remote {remote.name}; `stasisfs sync` uploads it")
            self._check_remote_only_objects(remote, kind, set(local))
        self._check_escrow(remote)

    def _check_remote_only_objects(self, remote: Remote, kind: str, local: set[str]) -> None:
        """Objects only the remote holds must at least authenticate: a token holder can upload, but not forge."""
        assert self.client is not None
        for object_id, _ in self.client.list_objects(remote.device, kind):
            if object_id in local:
                continue
            try:
                authentic = self.repo.authentic(kind, self.client.get_object(remote.device, kind, object_id))
            except StasisError as exc:
                self.error(f"{kind} object {object_id} on remote {remote.name} cannot be read: {exc}")
                continue
            if not authentic:
                self.error(f"{kind} object {object_id} on remote {remote.name} does not authenticate under this device's key "
                           "(junk from a token holder, or tampering); recovery skips it")
            else:
                self.report.notes.append(f"remote {remote.name} holds {kind} object {object_id[:16]} that this copy does not")

    def _check_escrow(self, remote: Remote) -> None:
        """The escrowed key cannot be opened here (that needs the password), but it must name this repository."""
        from stasisfs.remote.devices import DeviceRemotes

        assert self.client is not None
        try:
            blob = self.client.get_key(remote.device)
        except StasisError as exc:
            self.error(f"remote {remote.name} holds no readable escrowed key for device {remote.device} ({exc}); "
                       f"`stasisfs key passwd --from-remote {remote.name}` escrows it again")
            return
        if blob == DeviceRemotes(self.repo.id).escrow():
            return
        try:
            doc = json.loads(blob)
            ours = doc["repository"] == self.repo.id.hex() and doc.get("device", remote.device) == remote.device
        except (ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            self.error(f"the escrowed key of device {remote.device} on remote {remote.name} is not this repository's; "
                       f"recovery would skip it. `stasisfs key passwd --from-remote {remote.name}` escrows it again")
        else:
            self.report.notes.append(f"the escrowed key on remote {remote.name} was re-wrapped by another device of the account")

    def _blob(self, chunk_id: bytes) -> bytes:
        found = self.chunks.get(chunk_id)
        if found is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is not in any index")
        pack_id, entry = found
        box = self._pack_bytes(pack_id, entry.offset, entry.length)
        try:
            return open_blob(self.cipher, entry, box)
        except IntegrityError as exc:
            raise IntegrityError(f"pack {pack_id.hex()}: {exc}") from None

    def _pack_bytes(self, pack_id: bytes, offset: int = 0, length: int | None = None) -> bytes:
        """From the local pack, the remote being checked, or for a thin repository its remote (verified against the id)."""
        path = self.repo.pack_path(pack_id)
        if self.client is not None and self.remote is not None and (length is None or not path.exists()):
            # Data is read from the remote; trees for the structure walk come from the local copy when it has them.
            if length is None:
                return self.client.get_object(self.remote.device, "data", pack_id.hex())
            return self.client.get_range_upto(self.remote.device, "data", pack_id.hex(), offset, length)
        remote = self.repo.remote_packs
        if remote is not None and not path.exists():
            if length is None:
                return remote.whole(pack_id)
            return remote.read(pack_id, offset, length)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def _check_snapshots(self) -> None:
        seen_trees: set[bytes] = set()
        snapshots = self.repo.snapshots()
        self.report.snapshots = len(snapshots)
        self.say(f"checking {counted(len(snapshots), 'snapshot')}")
        load = lambda tree_id: decode_tree(self._blob(tree_id))  # noqa: E731
        for snapshot in snapshots:
            for step in walk_nodes(load, snapshot.root, seen=seen_trees, tolerate=(IntegrityError, ValueError, OSError)):
                if isinstance(step, Unreadable):
                    self.error(f"snapshot {snapshot.short_id}: tree of {os.fsdecode(step.path) or '/'} is unreadable: {step.error}")
                elif isinstance(step, tuple) and step[1].type == FILE:
                    missing = [c for c in step[1].content if c not in self.chunks]
                    if missing:
                        self.error(f"snapshot {snapshot.short_id}: {os.fsdecode(step[0])} references {len(missing)} missing chunks")
        self.report.trees = len(seen_trees)

    def _read_pack(self, pack_id: bytes) -> None:
        errors_before = len(self.report.errors)
        self._verify_pack(pack_id)
        if len(self.report.errors) > errors_before:
            self.damaged_packs.add(pack_id)

    def _verify_pack(self, pack_id: bytes) -> None:
        name = pack_id.hex()
        indexed = self.pack_entries.get(pack_id, ())
        try:
            data = self._pack_bytes(pack_id)
        except OSError as exc:
            self.error(f"pack {name} cannot be read: {exc.strerror}")
            self.lost_chunks.update(e.chunk_id for e in indexed)
            return
        except StasisError as exc:  # damaged or missing on the remote
            self.error(f"pack {name}: {exc}")
            self.lost_chunks.update(e.chunk_id for e in indexed)
            return
        self.report.packs_read += 1
        if storage_id(data) != name:
            # Judged per sealed box, by the index's offsets: only the chunks the damage hit are lost.
            bad = unreadable_blobs(self.cipher, indexed, data)
            self.lost_chunks.update(bad)
            self.error(f"pack {name} is damaged: its content does not match its id; {len(bad)} of its {len(indexed)} chunks fail authentication")
            return
        entries: Sequence[BlobEntry] = indexed
        try:
            entries = parse_pack(self.cipher, data)
        except IntegrityError as exc:
            self.error(f"pack {name} is damaged: {exc}")
        bad = unreadable_blobs(self.cipher, entries, data)
        if bad:
            self.lost_chunks.update(bad)
            self.error(f"pack {name} is damaged: {len(bad)} chunks fail authentication")

