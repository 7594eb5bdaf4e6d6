"""The LMDB index: a rebuildable cache on the device, never in the repository.

Databases (every key is a keyed hash or a storage id; nothing is plaintext):

    chunks      chunk id (32)  -> pack id (32) | blob kind | offset | box length | plaintext length
    packs       pack id (32)   -> pack size (u64) | id of the index object that covers it (32, zeros if none yet)
    indexobjs   index object id (32) -> b""   (ingested)
    snapshots   snapshot id (32) -> the sealed snapshot object, as stored
    files       keyed path hash (32) -> dev | ino | size | mtime_ns | ctime_ns | chunk ids...
    meta        b"complete" -> b"1" once a (re)build finished
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import lmdb

from stasisfs.errors import IndexDamaged
from stasisfs.format.pack import HEADER_ENTRY, BlobEntry, PackInfo
from stasisfs.system.kernel import drop_mappings, file_mappings

LOCATION = struct.Struct(">32sBIII")
PACK_ROW = struct.Struct(">Q32s")
FILE_ROW = struct.Struct(">QQQqq")
NO_INDEX_OBJECT = bytes(32)
MAP_SIZE = 1 << 40  # sparse; grows on MapFullError
RELEASE_EVERY = 0.2  # seconds between drops of the mapped index pages a long run has touched
# Puts per write transaction. LMDB keeps every page a transaction dirtied on a free list for reuse,
# for as long as the environment is open: 32k puts of random keys in one would hold 128 MB.
# Files-cache records: a directory's records are neighbours, and share pages.
WRITE_BATCH = 2048
# Chunk ids are random, so each put dirties a page of its own: 2048 left 8-12 MB on that list in each
# process that indexes packs (three in a backup; 120k small files peaked at 171-172 MB of PSS, 158-159
# at 512). The price: four commits (fsyncs) where there was one, 0.18 ms each on this machine's disk.
CHUNK_WRITE_BATCH = 512
# Each put into random keys faults its leaf in, and the kernel maps the 64 KiB around it: a transaction
# of N such puts maps up to N * 64 KiB of index. Below MAPPED_INDEX_BOUND, mapped pages are dropped every
# RELEASE_EVERY (the whole index may stay mapped, and is small). Past it, transactions take
# SCATTERED_WRITE_BATCH puts and each one's pages are dropped at its end, so no process maps more than
# about 8 MB of index at once (directory records, random keys too, always go so: `put_file_records`).
# The price: faulting those pages in again, about 5 µs a put; a drop is one madvise, since each process
# lists where it maps the index once (`Index._mapped`), not at every drop (0.3 ms).
# A first backup of 1M tiny files peaked at 273 MB of PSS with no bound, 227-234 MB with this bound at
# 64 MiB, 185-225 MB at 16 MiB with 256 puts a transaction; with 128, 168-173 MB against 188-205
# (two rounds each, interleaved), in no more time.
SCATTERED_WRITE_BATCH = 128
MAPPED_INDEX_BOUND = 16 << 20
PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Location:
    pack_id: bytes
    kind: int
    offset: int
    length: int
    raw_length: int

    def entry(self, chunk_id: bytes) -> BlobEntry:
        return BlobEntry(chunk_id, self.kind, self.offset, self.length, self.raw_length)


def stat_row(st: os.stat_result) -> bytes:
    """What a files-cache record holds of a file's stat: any change to the file moves one of these."""
    return FILE_ROW.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_record(st: os.stat_result, content: Iterable[bytes]) -> bytes:
    """A files-cache record: the stat row, then the file's chunk ids (32 bytes each)."""
    return stat_row(st) + b"".join(content)



# Reads every page of an environment in a child process: damage that would fault LMDB (SIGBUS, SIGSEGV)
# kills the child, not the command. Read-only and lock-free, so it never changes what it reads.
_PROBE = """
import sys, lmdb
env = lmdb.open(sys.argv[1], subdir=True, readonly=True, lock=False, max_dbs=16)
with env.begin(buffers=True) as txn:
    names = [bytes(name) for name, _ in txn.cursor()]
    for name in names:
        for _key, value in txn.cursor(db=env.open_db(name, txn=txn, create=False)):
            if len(value):
                value[0], value[len(value) - 1]
"""
FILES_DIR = "files"  # the files cache's environment, beside the index's
VERIFIED = "verified"  # size, mtime and inode of data.mdb as a stasisfs writer left it, or as the last probe passed it


def _fingerprint(data_file: Path) -> str:
    st = data_file.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def probe(path: Path) -> str | None:
    """Why the environment at `path` cannot be trusted, or None when every page reads.

    Skipped when data.mdb is exactly as a stasisfs writer or an earlier probe left it.
    """
    data_file = path / "data.mdb"
    if not data_file.exists():
        return None
    fingerprint = _fingerprint(data_file)
    with contextlib.suppress(OSError):
        if (path / VERIFIED).read_text() == fingerprint:
            return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"it could not be checked ({exc})"
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"signal {-done.returncode}"]
        return f"reading it failed: {last[0]}" if done.returncode > 0 else f"reading it crashed ({signal_name(-done.returncode)})"
    _mark_verified(path, fingerprint)
    return None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _mark_verified(path: Path, fingerprint: str) -> None:
    with contextlib.suppress(OSError):
        tmp = path / f".{VERIFIED}.{os.getpid()}"
        tmp.write_text(fingerprint)
        os.replace(tmp, path / VERIFIED)


def _open_environment(path: Path, probe_first: bool, max_dbs: int) -> lmdb.Environment:
    """An LMDB environment, refused (`IndexDamaged`) when its file is truncated or a page does not read."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_file = path / "data.mdb"
    size = data_file.stat().st_size if data_file.exists() else 0
    if 0 < size < 2 * PAGE_SIZE:  # not even the two meta pages: opening would fault on them
        raise IndexDamaged(f"the local index at {path} is truncated; run `stasisfs repair index`")
    damage = probe(path) if probe_first else None
    if damage is not None:
        raise IndexDamaged(f"the local index at {path} is damaged: {damage}; run `stasisfs repair index`")
    try:
        env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=max_dbs, subdir=True, sync=True, metasync=True, mode=0o600)
        env.reader_check()
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except lmdb.Error as exc:
        raise IndexDamaged(f"the local index at {path} is damaged ({exc}); run `stasisfs repair index`") from None
    if size and data_file.stat().st_size < needed:
        # A truncated map would end in SIGBUS on first touch of the missing pages.
        env.close()
        raise IndexDamaged(f"the local index at {path} is truncated; run `stasisfs repair index`")
    return env


def _open_files_environment(path: Path) -> tuple[lmdb.Environment, lmdb._Database]:
    env = _open_environment(path, True, max_dbs=2)
    return env, env.open_db(b"records")  # named, as every database of ours (`probe` walks them by name)


class Index:
    """The chunk index (`index/`) and, beside it, the files cache (`files/`): two environments.

    The files cache has its own file because the two are read differently. Chunk lookups land
    anywhere (keys are hashes), and the kernel maps 64 KiB around each page a lookup faults in:
    sharing a file, the backup workers' lookups mapped the files cache's pages too, nearly the
    whole index at 1M files. Workers never open the files cache; the parent reads and writes it a
    directory at a time (see `Backup._record_key`).
    """

    def __init__(self, path: Path, probe_first: bool = True) -> None:
        """`probe_first=False` for worker processes: their parent opened (and so probed) the same environment."""
        self.path = path
        self.files_path = path.with_name(FILES_DIR)
        self._write_lock = threading.Lock()
        self._wrote: set[Path] = set()  # the environments this process wrote to
        self._released_at = time.monotonic()
        # Where this process maps the environments, listed once: every change to a map (opening the files
        # cache, growing a map, closing) forgets it under the write lock, which every drop also holds.
        self._mapped: list[tuple[int, int]] | None = None
        self.env = _open_environment(path, probe_first, max_dbs=8)
        self._files_cache: tuple[lmdb.Environment, lmdb._Database] | None = None  # opened on first use: workers never need it
        self._files_lock = threading.Lock()
        try:
            self._chunks = self.env.open_db(b"chunks")
            self._packs = self.env.open_db(b"packs")
            self._indexobjs = self.env.open_db(b"indexobjs")
            self._snapshots = self.env.open_db(b"snapshots")
            self._legacy_files = self.env.open_db(b"files")  # the files cache before it had its own environment
            self._meta = self.env.open_db(b"meta")
            with self.env.begin() as txn:
                txn.stat(self._chunks)
        except lmdb.Error as exc:
            raise IndexDamaged(f"the local index at {path} is damaged ({exc}); run `stasisfs repair index`") from None

    def open_files_cache(self) -> tuple[lmdb.Environment, lmdb._Database]:
        """The files cache's environment and its `records` database, opened on first use (after a killed
        run, opening includes a probe); a damaged one is dropped, since the files are only read again."""
        files = self._files_cache
        if files is None:
            with self._files_lock:
                if self._files_cache is None:
                    try:
                        opened = _open_files_environment(self.files_path)
                    except (IndexDamaged, lmdb.Error):
                        remove_index_dir(self.files_path)
                        opened = _open_files_environment(self.files_path)
                    with self._write_lock:
                        self._files_cache, self._mapped = opened, None
                files = self._files_cache
        return files

    def release_mapped_pages(self, now: bool = False) -> None:
        """Drop this process's mappings of the index pages it has read, at most once a `RELEASE_EVERY` (unless `now`).

        A backup or a mount touches index pages all over the file (its keys are hashes), and each
        stays mapped (with the 64 KiB the kernel maps around each fault), so RSS grows with the
        index: 2.7x from 100k to 1M files. They are clean page cache (LMDB writes with write(),
        never through the map), so dropping them loses nothing: the next read faults them back in.
        """
        started = time.monotonic()
        if not now and started - self._released_at < RELEASE_EVERY:
            return
        self._released_at = started
        with self._write_lock:  # a map moves only when a writer grows it
            if self._mapped is None:
                files = [self.files_path / "data.mdb"] if self._files_cache is not None else []
                self._mapped = file_mappings(self.path / "data.mdb", *files)
            drop_mappings(self._mapped)

    def close(self) -> None:
        with self._write_lock:
            self._mapped = None
        environments = [(self.path, self.env)] + ([(self.files_path, self._files_cache[0])] if self._files_cache else [])
        for path, env in environments:
            env.close()
            if path in self._wrote:  # LMDB commits are atomic: what this process wrote last is a whole environment
                with contextlib.suppress(OSError):
                    _mark_verified(path, _fingerprint(path / "data.mdb"))

    def _write(self, fn: Callable[[lmdb.Transaction], object], files: bool = False, scattered: bool = False) -> None:
        """One write transaction (growing the map when full); `scattered`: its keys land all over, see `put_file_records`."""
        env = self.open_files_cache()[0] if files else self.env
        with self._write_lock:
            self._wrote.add(self.files_path if files else self.path)
            while True:
                try:
                    with env.begin(write=True) as txn:
                        fn(txn)
                    break
                except lmdb.MapFullError:
                    self._mapped = None  # the map moves
                    env.set_mapsize(env.info()["map_size"] * 2)
        self.release_mapped_pages(now=scattered)  # a write reads the pages its keys land on

    # --- state ---
    @property
    def complete(self) -> bool:
        with self.env.begin() as txn:
            return txn.get(b"complete", db=self._meta) == b"1"

    def set_complete(self, value: bool) -> None:
        self._write(lambda txn: txn.put(b"complete", b"1" if value else b"0", db=self._meta))

    def start_backup_run(self) -> bool:
        """Note that a backup runs; True when the last one never finished (killed, or failed)."""
        with self.env.begin() as txn:
            killed = txn.get(b"backup-running", db=self._meta) is not None
        self._write(lambda txn: txn.put(b"backup-running", b"1", db=self._meta))
        return killed

    def end_backup_run(self) -> None:
        self._write(lambda txn: txn.delete(b"backup-running", db=self._meta))

    def clear(self) -> None:
        def drop(txn: lmdb.Transaction) -> None:
            for db in (self._chunks, self._packs, self._indexobjs, self._snapshots, self._meta):
                txn.drop(db, delete=False)

        self._write(drop)

    # --- chunks and packs ---
    def lookup(self, chunk_id: bytes) -> Location | None:
        self.release_mapped_pages()  # a mount or a restore looks up chunks for as long as it runs
        with self.env.begin() as txn:
            raw = txn.get(chunk_id, db=self._chunks)
        return Location(*LOCATION.unpack(raw)) if raw is not None else None

    def lookup_many(self, chunk_ids: list[bytes]) -> list[Location]:
        with self.env.begin() as txn:
            raws = [txn.get(c, db=self._chunks) for c in chunk_ids]
        return [Location(*LOCATION.unpack(raw)) for raw in raws if raw is not None]

    def has_chunk(self, chunk_id: bytes) -> bool:
        with self.env.begin() as txn:
            return txn.get(chunk_id, db=self._chunks) is not None


    def add_packs(self, packs: Iterable[PackInfo], index_object_id: bytes = NO_INDEX_OBJECT) -> None:
        """Index packs' blobs, then the packs themselves (see `add_pack_rows`).

        The blobs go in transactions of at most `CHUNK_WRITE_BATCH`; the packs' rows come after, so a pack
        with a row has all its blobs indexed (a run killed in between leaves a pack without a row,
        which `Repository.index_orphan_packs` indexes from its header).
        """
        packs = list(packs)
        locations = ((chunk_id, LOCATION.pack(pack.pack_id, *fields))
                     for pack in packs for chunk_id, *fields in HEADER_ENTRY.iter_unpack(pack.entries))
        # Past a size, every transaction's pages are dropped: see MAPPED_INDEX_BOUND.
        scattered = self.env.info()["last_pgno"] * PAGE_SIZE > MAPPED_INDEX_BOUND
        batch = SCATTERED_WRITE_BATCH if scattered else CHUNK_WRITE_BATCH
        while part := list(itertools.islice(locations, batch)):
            self._write(functools.partial(self._put_all, db=self._chunks, items=part), scattered=scattered)
        self.add_pack_rows(packs, index_object_id)

    def add_pack_rows(self, packs: Iterable[PackInfo], index_object_id: bytes = NO_INDEX_OBJECT) -> None:
        """A row for each pack (size, and the index object listing it, if any); their blobs are indexed already."""

        def put(txn: lmdb.Transaction) -> None:
            for pack in packs:
                txn.put(pack.pack_id, PACK_ROW.pack(pack.size, index_object_id), db=self._packs)
            if index_object_id != NO_INDEX_OBJECT:
                txn.put(index_object_id, b"", db=self._indexobjs)

        self._write(put)

    @staticmethod
    def _put_all(txn: lmdb.Transaction, db: lmdb._Database, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            txn.put(key, value, db=db)

    def packs(self) -> dict[bytes, tuple[int, bytes]]:
        with self.env.begin() as txn:
            return {bytes(k): PACK_ROW.unpack(v) for k, v in txn.cursor(db=self._packs)}

    def chunk_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self._chunks)["entries"])


    def index_objects(self) -> set[bytes]:
        with self.env.begin() as txn:
            return {bytes(k) for k in txn.cursor(db=self._indexobjs).iternext(values=False)}

    # --- snapshots ---
    def put_snapshot(self, snapshot_id: bytes, sealed: bytes) -> None:
        self._write(lambda txn: txn.put(snapshot_id, sealed, db=self._snapshots))

    def remove_snapshot(self, snapshot_id: bytes) -> None:
        self._write(lambda txn: txn.delete(snapshot_id, db=self._snapshots))

    def snapshots(self) -> dict[bytes, bytes]:
        with self.env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=self._snapshots)}

    # --- files cache ---

    def unchanged_content(self, key: bytes, st: os.stat_result, legacy_key: bytes | None = None) -> tuple[bool, list[bytes] | None]:
        """(a record exists, its chunk ids if the file is unchanged and every chunk is still stored).

        `legacy_key`: the file's key in a files cache written before records were grouped by directory.
        """
        expected = stat_row(st)
        files, records = self.open_files_cache()
        with files.begin() as txn:
            raw = txn.get(key, db=records)
        if raw is None and legacy_key is None:
            return False, None
        with self.env.begin() as txn:
            if raw is None and legacy_key is not None:
                raw = txn.get(legacy_key, db=self._legacy_files)
            if raw is None:
                return False, None
            if raw[: FILE_ROW.size] != expected:
                return True, None
            content = [raw[i : i + 32] for i in range(FILE_ROW.size, len(raw), 32)]
            if any(txn.get(c, db=self._chunks) is None for c in content):
                return True, None
        return True, content

    def files_empty(self) -> bool:
        """No file or directory record at all (a first backup)."""
        files, records = self.open_files_cache()
        with files.begin() as txn:
            if txn.stat(records)["entries"]:
                return False
        return not self.has_legacy_files()

    def has_legacy_files(self) -> bool:
        with self.env.begin() as txn:
            return int(txn.stat(self._legacy_files)["entries"]) > 0

    def drop_legacy_files(self) -> None:
        """After a complete run has recorded every file it met under the grouped keys."""
        self._write(lambda txn: txn.drop(self._legacy_files, delete=False))

    def cached_tree(self, dir_key: bytes, signature: bytes) -> bytes | None:
        """The tree id recorded for a directory whose signature is unchanged, if that tree is still stored."""
        files, records = self.open_files_cache()
        with files.begin() as txn:
            raw = txn.get(dir_key, db=records)
            if raw is None or len(raw) != 64 or raw[:32] != signature:
                return None
            tree_id = bytes(raw[32:])
        with self.env.begin() as txn:
            return tree_id if txn.get(tree_id, db=self._chunks) is not None else None

    def clear_files_cache(self) -> None:
        """Forget every file and directory record: the next backup reads and lists everything again.

        Needed when blobs are declared lost: a directory record names a tree by id, and that tree
        may still be stored while data it references is gone.
        """
        records = self.open_files_cache()[1]
        self._write(lambda txn: txn.drop(records, delete=False), files=True)
        self.drop_legacy_files()

    def put_file_records(self, records: Iterable[tuple[bytes, bytes]], scattered: bool = False) -> None:
        """(keyed path hash, `file_record(...)`) pairs.

        `scattered`: directory records, whose keys are random. Each lands on a page of its own and maps
        64 KiB around it, which 2048 at once made 33 MB of the parent's memory at 300k files; they go in
        smaller transactions, each followed by a drop of the mapped pages (about 1.7 ms with the faults after).
        """
        records = list(records)
        db = self.open_files_cache()[1]
        batch = SCATTERED_WRITE_BATCH if scattered else WRITE_BATCH
        for start in range(0, len(records), batch):  # bounded transactions (see WRITE_BATCH); each record stands alone
            part = records[start : start + batch]
            self._write(functools.partial(self._put_all, db=db, items=part), files=True, scattered=scattered)



def remove_index_dir(path: Path) -> None:
    for name in ("data.mdb", "lock.mdb", VERIFIED):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)
