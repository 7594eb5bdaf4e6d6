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

import contextlib
import errno
import json
import os
import secrets
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import keys as keyslots
from .chunker import CHUNK_AVG, CHUNK_MAX, CHUNK_MIN
from .crypto import KIND_SETTINGS, KIND_SNAPSHOT, Cipher, MasterKeys, padded_size
from .errors import IndexDamaged, IntegrityError, RepositoryMissing, StasisError, UsageError, WrongKey
from .index import NO_INDEX_OBJECT, Index, Location, remove_index_dir
from .pack import (
    TRAILER_BOX_LEN,
    PackInfo,
    decode_index,
    encode_index,
    open_blob,
    parse_header,
    read_trailer,
)
from .paths import cache_root
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .packcache import RemotePacks
from .storage import TEMP_PREFIX, fsync_dir, is_object_name, read_verified, storage_id, sweep_temp_files, write_all, write_atomic, writer_alive

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
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._memory_backed: bool | None = None
        self._fd_lock = threading.Lock()
        self._index_lock = threading.RLock()
        self._index_opening = False
        self._remote_packs: RemotePacks | bool | None = False  # False: not looked up yet
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
    def for_worker(cls, path: Path, master: bytes) -> Repository:
        """A reader in a worker process: unlocked with the parent's key, index opened as is (the parent keeps it current)."""
        repo = cls(path)
        repo._attach(master, "")
        repo._index = Index(repo.cache_dir / "index", probe_first=False)
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

    def write_index_object(self, packs: list[PackInfo]) -> bytes:
        sealed = encode_index(self.cipher, packs)
        object_id = self.write_object_raw("index", sealed)
        if self._index is not None:
            self._index.add_packs(packs, object_id)
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
        name = pack_id.hex()
        return self.path / "data" / name[:2] / name

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

    def new_pack_file(self) -> PackFile:
        return PackFile(self)

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
        return PackInfo(pack_id, size, tuple(entries))

    def fetch_packs_from(self, packs: RemotePacks) -> None:
        """Make this a thin repository whose missing packs come from `packs`."""
        self._remote_packs = packs

    @property
    def remote_packs(self) -> RemotePacks | None:
        """Where packs not present locally come from, for a thin repository (made by `recover`)."""
        if self._remote_packs is False:
            from .packcache import RemotePacks
            from .remotes import DeviceRemotes

            thin = DeviceRemotes(self.id).thin
            self._remote_packs = RemotePacks(self.cache_dir, thin) if thin is not None else None
        assert not isinstance(self._remote_packs, bool)
        return self._remote_packs

    def _pack_fd(self, pack_id: bytes, required: bool = True) -> int | None:
        with self._fd_lock:
            fd = self._fds.get(pack_id)
            if fd is not None:
                self._fds.move_to_end(pack_id)
                return fd
            try:
                fd = os.open(self.pack_path(pack_id), os.O_RDONLY)
            except FileNotFoundError:
                if not required:
                    return None
                raise IntegrityError(f"pack {pack_id.hex()} is missing from the repository") from None
            self._fds[pack_id] = fd
            while len(self._fds) > 64:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def load_blob(self, chunk_id: bytes) -> bytes:
        location = self.index.lookup(chunk_id)
        if location is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is not in the index; run `stasisfs check`")
        remote = self.remote_packs
        fd = self._pack_fd(location.pack_id, required=remote is None)
        if fd is not None:
            return self._open_box(chunk_id, location, os.pread(fd, location.length, location.offset))
        assert remote is not None
        try:
            return self._open_box(chunk_id, location, remote.read(location.pack_id, location.offset, location.length))
        except IntegrityError:  # a damaged cache block, or a bad fetch: drop it and fetch once more
            remote.invalidate(location.pack_id, location.offset, location.length)
            return self._open_box(chunk_id, location, remote.read(location.pack_id, location.offset, location.length))

    def load_blob_if_cached(self, chunk_id: bytes, max_length: int) -> bytes | None:
        """The blob, if it is small, its bytes are in the page cache and it is intact; None rather than wait for a disk.

        Lets an event loop serve small reads inline without ever blocking on storage. For a damaged
        blob it is None too: `load_blob`, on the blocking path, reports the damage.
        """
        location = self.index.lookup(chunk_id)
        if location is None or location.length > max_length:
            return None
        buffer = bytearray(location.length)
        fd = self._pack_fd(location.pack_id, required=self.remote_packs is None)
        if fd is None:
            return None  # fetching from a remote may block
        try:
            # tmpfs cannot block (and does not support RWF_NOWAIT); elsewhere, refuse to wait for a disk.
            n = os.preadv(fd, [buffer], location.offset, 0 if self._is_memory_backed() else os.RWF_NOWAIT)
        except OSError:
            return None
        if n != location.length:
            return None  # partly cached, or truncated: the blocking path decides
        try:
            return self._open_box(chunk_id, location, bytes(buffer))
        except IntegrityError:
            return None  # damaged: the blocking path reads it again, and reports it

    def _is_memory_backed(self) -> bool:
        if self._memory_backed is None:
            self._memory_backed = filesystem_type(self.path) in MEMORY_FILESYSTEMS
        return self._memory_backed

    def advise_blobs(self, chunk_ids: list[bytes]) -> None:
        """Ask the kernel to start reading these blobs from storage (posix_fadvise WILLNEED); never waits."""
        if self._is_memory_backed():
            return
        for location in self.index.lookup_many(chunk_ids):
            fd = self._pack_fd(location.pack_id, required=False)
            if fd is None:
                continue
            with contextlib.suppress(OSError, IntegrityError):
                os.posix_fadvise(fd, location.offset, location.length, os.POSIX_FADV_WILLNEED)

    def _open_box(self, chunk_id: bytes, location: Location, box: bytes) -> bytes:
        if len(box) != location.length:
            raise IntegrityError(f"pack {location.pack_id.hex()} is truncated")
        try:
            # The AEAD already binds the chunk id; re-hashing is for `check --read-data`.
            return open_blob(self.cipher, location.entry(chunk_id), box, verify=False)
        except IntegrityError as exc:
            raise IntegrityError(f"pack {location.pack_id.hex()} is damaged: {exc}") from None

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._index is not None:
            self._index.close()
            self._index = None


class PackFile:
    """An open pack spooled to a temp file in `data/`; renamed to its id once sealed.

    Beside it, a journal of sealed entry batches (`BlobWriter.journal`) lets the next run
    salvage what a killed run had packed (`salvage_open_packs`).
    """

    def __init__(self, repo: Repository, tmp: Path | None = None, fd: int | None = None) -> None:
        """A new temp pack; or, given both, one already open (see `adopt`)."""
        self.repo = repo
        if tmp is None or fd is None:
            tmp = repo.path / "data" / f"{TEMP_PREFIX}pack-{secrets.token_hex(8)}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.tmp, self.fd = tmp, fd
        self.journal_path = journal_path_of(tmp)
        self._journal_fd: int | None = None

    @classmethod
    def adopt(cls, repo: Repository, tmp: Path, length: int) -> PackFile:
        """Take over a dead writer's temp pack, cut to its first `length` bytes, to finish and commit it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(fd, length)
        os.lseek(fd, length, os.SEEK_SET)
        return cls(repo, tmp, fd)

    def _write_all(self, fd: int, data: bytes) -> None:
        try:
            write_all(fd, data)
        except OSError as exc:
            self.discard()
            if exc.errno == errno.ENOSPC:
                raise StasisError(f"no space left on the device holding {self.repo.path}; nothing was lost, free some space and run again") from None
            raise

    def write(self, data: bytes) -> None:
        self._write_all(self.fd, data)

    def journal(self, record: bytes) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._write_all(self._journal_fd, record)

    def _drop_journal(self) -> None:
        if self._journal_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._journal_fd)
            self._journal_fd = None
            self.journal_path.unlink(missing_ok=True)

    def commit(self, pack_id: bytes) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        final = self.repo.pack_path(pack_id)
        os.replace(self.tmp, final)
        fsync_dir(final.parent)
        self._drop_journal()  # only now: a journal whose temp pack is gone is swept as junk

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.tmp.unlink(missing_ok=True)
        self._drop_journal()


def journal_path_of(pack_tmp: Path) -> Path:
    return pack_tmp.with_name(pack_tmp.name.replace("pack-", "journal-", 1))


def abandoned_open_packs(repo: Repository) -> list[tuple[Path, Path]]:
    """(temp pack, its journal) pairs left by killed runs."""
    found = []
    for entry in os.scandir(repo.path / "data"):
        if entry.name.startswith(f"{TEMP_PREFIX}pack-") and not writer_alive(entry.name):
            tmp = Path(entry.path)
            journal = journal_path_of(tmp)
            if journal.exists():
                found.append((tmp, journal))
    return found


MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    from . import mountinfo

    entry = mountinfo.containing(os.fsencode(os.path.realpath(path)))
    return os.fsdecode(entry.fstype) if entry is not None else ""


def keyslots_id_ok(slot_id: str) -> bool:
    return len(slot_id) == 16 and all(c in "0123456789abcdef" for c in slot_id)


def hostname() -> str:
    return socket.gethostname()
