"""The local repository: the same objects a server would hold, and nothing else.

    REPO/config                  plaintext JSON: format version, repository id, sealed settings
    REPO/keys/<slot id>          wrapped master key slots
    REPO/data/<2 hex>/<64 hex>   packs
    REPO/index/<64 hex>          sealed index objects
    REPO/snapshots/<64 hex>      sealed snapshots
    REPO/locks/<64 hex>          sealed locks

The LMDB index and the files cache live in the device's cache directory.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stasisfs.errors import IndexDamaged, IntegrityError, RepositoryMissing, StasisError, UsageError, WrongKey
from stasisfs.format import keyslots
from stasisfs.format.chunker import CHUNK_AVG, CHUNK_MAX, CHUNK_MIN
from stasisfs.format.crypto import KIND_SETTINGS, KIND_SNAPSHOT, Cipher, MasterKeys, padded_size
from stasisfs.format.pack import (
    TRAILER_BOX_LEN,
    PackInfo,
    decode_index,
    encode_index,
    parse_header,
    read_trailer,
)
from stasisfs.format.snapshot import Snapshot
from stasisfs.repo.blobs import BlobReader, PackSource, pack_path
from stasisfs.repo.index import FILES_DIR, NO_INDEX_OBJECT, Index, remove_index_dir
from stasisfs.repo.storage import is_object_name, read_verified, storage_id, sweep_temp_files, write_atomic
from stasisfs.system.paths import cache_root

FORMAT_VERSION = 1
SMALL_OBJECT_FLOOR = 1024
SUBDIRS = ("keys", "data", "index", "snapshots", "locks")



@dataclass
class Credential:
    """What the user gave to open the repository: a password or a machine key file."""

    password: str | None = None
    machine_slot: str | None = None
    machine_secret: bytes | None = None
    machine_repo: str | None = None




def pad_small(plaintext: bytes) -> bytes:
    """Length-prefix and zero-pad inside the encryption, to a Padmé size."""
    framed = struct.pack(">I", len(plaintext)) + plaintext
    return framed + bytes(padded_size(len(framed), SMALL_OBJECT_FLOOR) - len(framed))


def unpad_small(padded: bytes) -> bytes:
    (length,) = struct.unpack_from(">I", padded)
    if length > len(padded) - 4:
        raise IntegrityError("object padding is malformed")
    return padded[4 : 4 + length]


class Repository:
    def __init__(self, path: Path, cache_dir: Path | None = None) -> None:
        self.path = path.absolute()
        self._cache_dir = cache_dir  # another device's repository shown in a mount keeps its cache apart
        config_path = self.path / "config"
        if not config_path.is_file():
            raise RepositoryMissing(f"no stasisfs repository at {self.path}; create one with `stasisfs init`")
        try:
            self.config = json.loads(config_path.read_text())
            self.id = bytes.fromhex(self.config["id"])
        except (ValueError, KeyError, OSError) as exc:
            raise StasisError(f"repository config at {config_path} is unreadable: {exc}") from None
        if self.config.get("version") != FORMAT_VERSION:
            raise StasisError(f"repository format version {self.config.get('version')} is not supported by this stasisfs")
        self.keys: MasterKeys | None = None
        self._cipher: Cipher | None = None
        self._index: Index | None = None
        self.device = ""
        self.slot_id = ""
        self._index_lock = threading.RLock()
        self._index_opening = False
        # A thin repository's missing packs come from a remote; whoever opens it hands the source in.
        self.remote_packs: PackSource | None = None
        self._blobs: BlobReader | None = None
        # Objects found damaged and skipped, "kind/id" -> why: a bad object hides only itself.
        self.damaged: dict[str, str] = {}
        self.notices: list[str] = []  # damage found and repaired on the way, for the user to hear of

    # --- creation and unlocking ---
    @classmethod
    def init(cls, path: Path, password: str, device: str) -> tuple[Repository, bytes]:
        path = path.absolute()
        if (path / "config").exists():
            raise StasisError(f"a repository already exists at {path}")
        if path.exists() and any(path.iterdir()):
            raise StasisError(f"{path} exists and is not empty; choose an empty or new directory")
        master, repo_id = secrets.token_bytes(32), secrets.token_bytes(32)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in SUBDIRS:
            (path / sub).mkdir(mode=0o700, exist_ok=True)
        for i in range(256):
            (path / "data" / f"{i:02x}").mkdir(mode=0o700, exist_ok=True)
        keys = MasterKeys(master, repo_id)
        cipher = Cipher(keys)
        settings = cipher.seal(json.dumps({"device": device}).encode(), KIND_SETTINGS)
        slot = keyslots.wrap(master, repo_id, password.encode(), keyslots.SLOT_PASSWORD, keyslots.argon2_params())
        write_atomic(path / "keys" / slot.id, slot.encode())
        config = {
            "version": FORMAT_VERSION,
            "id": repo_id.hex(),
            "chunker": {"min": CHUNK_MIN, "avg": CHUNK_AVG, "max": CHUNK_MAX},
            "key_check": keys.key_check.hex(),
            "settings": settings.hex(),
        }
        write_atomic(path / "config", json.dumps(config, indent=1).encode())
        repo = cls(path)
        repo._attach(master, slot.id)
        return repo, master

    @classmethod
    def adopt(cls, path: Path, config: bytes, master: bytes, password: str | None, cache_dir: Path | None = None) -> Repository:
        """Recreate a repository from its config and master key (recovery), with a fresh local password slot if given."""
        path = path.absolute()
        if path.exists() and any(path.iterdir()):
            raise StasisError(f"{path} exists and is not empty; recover into a new or empty directory")
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in SUBDIRS:
            (path / sub).mkdir(mode=0o700, exist_ok=True)
        for i in range(256):
            (path / "data" / f"{i:02x}").mkdir(mode=0o700, exist_ok=True)
        doc = json.loads(config)
        repo_id = bytes.fromhex(doc["id"])
        if MasterKeys(master, repo_id).key_check.hex() != doc.get("key_check"):
            raise WrongKey("the recovered key does not open this repository config")
        slot_id = ""
        if password is not None:
            slot = keyslots.wrap(master, repo_id, password.encode(), keyslots.SLOT_PASSWORD, keyslots.argon2_params())
            write_atomic(path / "keys" / slot.id, slot.encode())
            slot_id = slot.id
        write_atomic(path / "config", config)
        repo = cls(path, cache_dir)
        repo._attach(master, slot_id)
        return repo

    def slots(self) -> list[keyslots.KeySlot]:
        """Every key slot that parses; a malformed one is noted (named) and skipped, so the others still open."""
        result = []
        for entry in sorted(os.scandir(self.path / "keys"), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                try:
                    result.append(keyslots.KeySlot.decode(Path(entry.path).read_bytes()))
                except StasisError as exc:
                    self._skip_slot(entry.path, str(exc))
        return result

    def _skip_slot(self, path: str, why: str) -> None:
        notice = f"key slot {path} was skipped: {why}"
        if notice not in self.notices:
            self.notices.append(notice)

    def unlock(self, credential: Credential) -> None:
        if credential.machine_secret is not None:
            if credential.machine_repo != self.id.hex():
                raise WrongKey("this key file belongs to a different repository")
            slot_path = self.path / "keys" / str(credential.machine_slot)
            if not slot_path.is_file():
                raise WrongKey("this machine key has been removed from the repository")
            slot = keyslots.KeySlot.decode(slot_path.read_bytes())
            self._attach(keyslots.unwrap(slot, self.id, credential.machine_secret), slot.id)
            return
        assert credential.password is not None
        for slot in self.slots():
            if slot.kind != keyslots.SLOT_PASSWORD:
                continue
            try:
                master = keyslots.unwrap(slot, self.id, credential.password.encode())
            except WrongKey:
                continue
            except StasisError as exc:  # parameters out of bounds: refused before any memory is spent
                self._skip_slot(str(self.path / "keys" / slot.id), str(exc))
                continue
            self._attach(master, slot.id)
            return
        skipped = f" ({'; '.join(self.notices)})" if self.notices else ""
        raise WrongKey(f"wrong password: no key slot of this repository opens with it{skipped}")

    @classmethod
    def for_worker(cls, path: Path, master: bytes, index_path: Path | None = None) -> Repository:
        """A worker process's view: unlocked with the parent's key, index opened as is (the parent keeps it current)."""
        repo = cls(path)
        repo._attach(master, "")
        repo._index = Index(index_path or repo.cache_dir / "index", probe_first=False)
        return repo

    def unlock_master(self, master: bytes) -> None:
        """Open with the recovery key (the master key itself)."""
        if MasterKeys(master, self.id).key_check.hex() != self.config.get("key_check"):
            raise WrongKey("this recovery key belongs to a different repository")
        self._attach(master, "")

    def _attach(self, master: bytes, slot_id: str) -> None:
        self.keys = MasterKeys(master, self.id)
        self._cipher = Cipher(self.keys)
        self.slot_id = slot_id
        try:
            settings = json.loads(self._cipher.open(bytes.fromhex(self.config["settings"]), KIND_SETTINGS))
            self.device = str(settings["device"])
        except (StasisError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"repository config at {self.path / 'config'} is damaged: its settings do not open ({exc})") from None

    @property
    def cipher(self) -> Cipher:
        if self._cipher is None:
            raise StasisError("repository is not unlocked")
        return self._cipher

    @property
    def master_keys(self) -> MasterKeys:
        if self.keys is None:
            raise StasisError("repository is not unlocked")
        return self.keys

    def add_slot(self, slot: keyslots.KeySlot) -> None:
        write_atomic(self.path / "keys" / slot.id, slot.encode())

    def remove_slot(self, slot_id: str) -> None:
        if not keyslots_id_ok(slot_id):
            raise UsageError(f"{slot_id!r} is not a key slot id")
        try:
            (self.path / "keys" / slot_id).unlink()
        except FileNotFoundError:
            raise UsageError(f"no key slot {slot_id}; see `stasisfs key list`") from None

    # --- the cache directory and its index ---
    @property
    def cache_dir(self) -> Path:
        path = self._cache_dir or cache_root() / self.id.hex()
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def has_files_cache(self) -> bool:
        """Whether an earlier backup left its files cache here; needs no key (a hint: the index says for sure)."""
        return (self.cache_dir / FILES_DIR / "data.mdb").exists()

    @property
    def index(self) -> Index:
        index = self._index
        if index is not None and not self._index_opening:
            return index
        with self._index_lock:  # threads may ask at once, and an LMDB environment opens once per process
            if self._index is None:
                self._index_opening = True  # until synced: other threads wait here rather than read a stale index
                try:
                    try:
                        self._index = Index(self.cache_dir / "index")
                    except IndexDamaged as exc:
                        # Only a cache: rebuilt from the repository, never trusted and never fatal.
                        remove_index_dir(self.cache_dir / "index")
                        self._index = Index(self.cache_dir / "index")
                        self.notices.append(f"{exc.args[0].split('; run')[0]}; it was rebuilt from the repository")
                    if not self._index.complete:
                        self.rebuild_index(from_packs=False)
                    else:
                        self.sync_index()
                finally:
                    self._index_opening = False
            return self._index

    def index_state(self) -> str:
        """`ok`, `missing` or a damage description, without repairing anything."""
        path = self.cache_dir / "index" / "data.mdb"
        if not path.exists():
            return "missing"
        try:
            probe = Index(self.cache_dir / "index")
        except IndexDamaged as exc:
            return str(exc)
        try:
            return "ok" if probe.complete else "incomplete"
        finally:
            probe.close()

    def rebuild_index(self, from_packs: bool) -> tuple[int, int]:
        """Rebuild the LMDB index from index objects, and from pack headers for packs none covers."""
        if self._index is None:  # a full rebuild: the old environment is never opened, whatever its state
            remove_index_dir(self.cache_dir / "index")
            self._index = Index(self.cache_dir / "index")
        index = self._index
        index.set_complete(False)
        index.clear()
        damaged = []
        for object_id in self.list_objects("index"):
            if from_packs:
                damaged.append(object_id)
                continue
            try:
                index.add_packs(decode_index(self.cipher, self.read_object_raw("index", object_id)), bytes.fromhex(object_id))
            except (IntegrityError, ValueError):
                damaged.append(object_id)  # its packs now have no index object, so their headers are read below
        recovered = self.index_orphan_packs()
        for object_id in damaged:  # superseded by the index object written from the pack headers
            if not from_packs:
                self.notices.append(f"index object {self.path / 'index' / object_id} was damaged; its packs were indexed from their headers instead")
            (self.path / "index" / object_id).unlink(missing_ok=True)
        self._load_snapshots_into(index)
        index.set_complete(True)
        return index.chunk_count(), recovered

    def sync_index(self) -> None:
        """Take in index objects and snapshots other runs have added since."""
        if self._index is None:
            self.index  # noqa: B018 - opening the index syncs it
            return
        index = self._index
        known = index.index_objects()
        for object_id in self.list_objects("index"):
            if bytes.fromhex(object_id) not in known:
                try:
                    packs = list(decode_index(self.cipher, self.read_object_raw("index", object_id)))
                except (IntegrityError, ValueError) as exc:
                    # Its packs stay readable through their own headers: `repair index` indexes them from there.
                    self.note_damage("index", object_id, f"{exc}; `stasisfs repair index` indexes its packs from their headers")
                    continue
                index.add_packs(packs, bytes.fromhex(object_id))
        self._load_snapshots_into(index)

    def note_damage(self, kind: str, object_id: str, why: str) -> None:
        self.damaged[f"{kind}/{object_id}"] = why

    def _load_snapshots_into(self, index: Index) -> None:
        cached = index.snapshots()
        present = {bytes.fromhex(i) for i in self.list_objects("snapshots")}
        for snapshot_id in present - cached.keys():
            try:
                sealed = read_verified(self.path / "snapshots" / snapshot_id.hex())
            except IntegrityError:
                self.note_damage("snapshots", snapshot_id.hex(), "its bytes no longer match its name (damaged on disk)")
                continue
            index.put_snapshot(snapshot_id, sealed)
        for snapshot_id in cached.keys() - present:
            index.remove_snapshot(snapshot_id)

    def indexed_packs(self, object_ids: list[str] | None = None) -> dict[bytes, PackInfo]:
        """Every pack the index objects (all, or these) describe; read from the repository, not the cache."""
        packs: dict[bytes, PackInfo] = {}
        for object_id in self.list_objects("index") if object_ids is None else object_ids:
            for pack in decode_index(self.cipher, self.read_object_raw("index", object_id)):
                packs[pack.pack_id] = pack
        return packs

    def index_orphan_packs(self) -> int:
        """Packs on disk that no index object covers (a run was killed): read their headers and index them."""
        known = self.index.packs()
        orphans = []
        for pack_id in self.list_packs():
            row = known.get(pack_id)
            if row is None or row[1] == NO_INDEX_OBJECT:
                try:
                    orphans.append(self.read_pack_info(pack_id))
                except IntegrityError:
                    continue  # a damaged pack is for `check` to report, not for the index
        if orphans:
            self.write_index_object(orphans)
        return len(orphans)

    def write_index_object(self, packs: list[PackInfo], blobs_indexed: bool = False) -> bytes:
        """Seal an index object for these packs and note them in the local index, with their blobs unless
        `blobs_indexed` (a backup indexes each pack's blobs as it writes the pack)."""
        object_id = self.write_object_raw("index", encode_index(self.cipher, packs))
        if self._index is not None:
            (self._index.add_pack_rows if blobs_indexed else self._index.add_packs)(packs, object_id)
        return object_id

    # --- objects ---
    def list_objects(self, kind: str) -> list[str]:
        directory = self.path / kind
        return sorted(e.name for e in os.scandir(directory) if is_object_name(e.name))

    def write_object_raw(self, kind: str, data: bytes) -> bytes:
        object_id = storage_id(data)
        write_atomic(self.path / kind / object_id, data)
        return bytes.fromhex(object_id)

    def read_object_raw(self, kind: str, object_id: str) -> bytes:
        try:
            return read_verified(self.path / kind / object_id)
        except FileNotFoundError:
            raise IntegrityError(f"{kind} object {object_id[:16]} is missing") from None

    def authentic(self, kind: str, data: bytes) -> bool:
        """Whether a snapshot or index object from elsewhere (a remote) opens under this repository's key and parses."""
        try:
            if kind == "snapshots":
                Snapshot.decode(unpad_small(self.cipher.open(data, KIND_SNAPSHOT)), bytes.fromhex(storage_id(data)))
            else:
                list(decode_index(self.cipher, data))
        except (StasisError, ValueError, KeyError, TypeError):  # untrusted bytes: any parse failure means "not ours"
            return False
        return True

    def save_snapshot(self, snapshot: Snapshot) -> bytes:
        sealed = self.cipher.seal(pad_small(snapshot.encode()), KIND_SNAPSHOT)
        snapshot.id = self.write_object_raw("snapshots", sealed)
        self.index.put_snapshot(snapshot.id, sealed)
        return snapshot.id

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot that opens; one that does not (damaged, or another repository's) is noted in `damaged` and skipped."""
        result = []
        for snapshot_id, sealed in self.index.snapshots().items():
            try:
                plain = unpad_small(self.cipher.open(sealed, KIND_SNAPSHOT))
                result.append(Snapshot.decode(plain, snapshot_id))
            except (StasisError, ValueError, KeyError, TypeError):
                self.note_damage("snapshots", snapshot_id.hex(), "it does not authenticate under this repository's key "
                                 "(damaged, or copied in from another repository)")
        return sorted(result, key=lambda s: s.time)

    # --- packs ---
    def pack_path(self, pack_id: bytes) -> Path:
        return pack_path(self.path, pack_id)

    def list_packs(self) -> Iterator[bytes]:
        for sub in sorted(os.scandir(self.path / "data"), key=lambda e: e.name):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    if is_object_name(entry.name):
                        yield bytes.fromhex(entry.name)

    def sweep(self) -> None:
        for name in ("index", "snapshots", "locks", "keys"):
            sweep_temp_files(self.path / name)
        sweep_temp_files(self.path / "data")  # open packs of killed runs
        for entry in os.scandir(self.path / "data"):
            if entry.is_dir():
                sweep_temp_files(Path(entry.path))

    def read_pack_info(self, pack_id: bytes) -> PackInfo:
        """Parse a pack's header without reading its body."""
        path = self.pack_path(pack_id)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < TRAILER_BOX_LEN:
                raise IntegrityError(f"pack {pack_id.hex()} is truncated")
            f.seek(size - TRAILER_BOX_LEN)
            offset, length = read_trailer(self.cipher, f.read(TRAILER_BOX_LEN), size)
            f.seek(offset)
            entries = parse_header(self.cipher, f.read(length))
        return PackInfo.of_blobs(pack_id, size, entries)

    def fetch_packs_from(self, packs: PackSource | None) -> None:
        """Make this a thin repository whose missing packs come from `packs` (None: every pack is local)."""
        self.remote_packs = packs
        self._blobs = None

    @property
    def blobs(self) -> BlobReader:
        """Reads and opens single blobs (chunks and trees) by id, from local packs or the thin source."""
        if self._blobs is None:
            self._blobs = BlobReader(self.path, self.cipher, lambda: self.index, self.remote_packs)
        return self._blobs

    def close(self) -> None:
        if self._blobs is not None:
            self._blobs.close()
        if self._index is not None:
            self._index.close()
            self._index = None


def keyslots_id_ok(slot_id: str) -> bool:
    return len(slot_id) == 16 and all(c in "0123456789abcdef" for c in slot_id)


def hostname() -> str:
    return socket.gethostname()
