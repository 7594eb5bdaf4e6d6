"""The write path for blobs: dedup, compress, seal, and spread over two open packs.

Thread-safe: backup workers call `add` concurrently. A blob is claimed before it
is sealed, so two workers never store the same chunk twice. Chunks go to one of
two open packs at random (as restic 0.18 does), so a pack's layout does not
mirror the order of the files it came from. The second pack opens only once the
first holds a padding floor's worth: below that a run's blobs fit in one padded
pack, and two would double the padding of every small run.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

from stasisfs.errors import IntegrityError
from stasisfs.format.crypto import KIND_CHUNK, Cipher
from stasisfs.format.pack import (
    PACK_PAD_FLOOR,
    NullSink,
    PackBuilder,
    PackInfo,
    authentic_prefix,
    decode_journal,
    encode_blob_payload,
    encode_journal_record,
)
from stasisfs.repo.packfile import PackFile, abandoned_open_packs
from stasisfs.repo.repository import Repository

INDEX_OBJECT_EVERY = 32  # packs; bounds what a killed run leaves to header scanning
INDEX_OBJECT_BLOBS = 65_536  # or blobs, whichever comes first: the entries wait in memory until then (encoded, 45 bytes each)
ZSTD_LEVEL = 2  # 18% less CPU than 3 for 3% more bytes on a typical tree


class ChunkSealer:
    """Compress (keeping zstd only when smaller), self-check, and seal one chunk. One per thread or process."""

    def __init__(self, cipher: Cipher, verify: bool = True) -> None:
        self.cipher = cipher
        self.verify = verify
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._decompressor = zstandard.ZstdDecompressor()

    def seal(self, chunk_id: bytes, data: bytes | memoryview) -> bytes:
        compressed = self._compressor.compress(data)
        # The chunk id was just computed from `data`: comparing the round trip with it is the same check as rehashing.
        # As bytes: a memoryview compares item by item, 40x slower than the copy (1.8 ms a MiB).
        if self.verify and len(compressed) < len(data) and self._decompressor.decompress(compressed, max_output_size=len(data)) != bytes(data):
            # restic 0.16 shipped a compressor bug that wrote corrupt data; never trust the codec blindly.
            raise IntegrityError("compression self-check failed; refusing to store a corrupt chunk")
        return self.cipher.seal(encode_blob_payload(data, compressed), KIND_CHUNK, chunk_id)


class BlobWriter:
    def __init__(self, repo: Repository, dry_run: bool = False, verify: bool = True, dedup: bool = True, spread: bool = True) -> None:
        self.repo = repo
        self.dedup = dedup  # prune's repacking copies blobs the index still lists in the packs being replaced
        # Two open packs hide the order of a backup's files; prune copies blobs the storage side has seen
        # packed already, and one pack at a time leaves at most one small pack, so a second prune has none to merge.
        self.spread = spread
        self.cipher = repo.cipher
        self.dry_run = dry_run
        self.verify = verify
        self._lock = threading.Lock()
        self._open: list[PackBuilder] = []  # two open packs, created on first use
        self._claimed: set[bytes] = set()
        self._unindexed: list[PackInfo] = []  # written packs not yet in an index object
        self._local = threading.local()
        self._random = random.Random()  # placement needs unpredictability to the server, not secrecy
        self.bytes_added = 0
        self.blobs_added = 0
        self.packs_written = 0

    def _sealer(self) -> ChunkSealer:
        sealer = getattr(self._local, "sealer", None)
        if sealer is None:
            sealer = self._local.sealer = ChunkSealer(self.cipher, self.verify)
        return sealer

    def _claim(self, chunk_id: bytes, known_new: bool = False) -> bool:
        with self._lock:
            if chunk_id in self._claimed:
                return False
            self._claimed.add(chunk_id)
        return not (self.dedup and not known_new and self.repo.index.has_chunk(chunk_id))

    def add(self, chunk_id: bytes, kind: int, data: bytes | memoryview, content_defined: bool = True, known_new: bool = False) -> bool:
        """Store the blob unless it is already in the repository. True when it was new.

        `content_defined`: the chunker chose the blob's boundaries (False only for a whole small
        file or a tree), which keeps its pack at the 1 MiB padding floor. `known_new`: the caller
        knows the index does not have it, so it is not looked up (claims still count).
        """
        if not self._claim(chunk_id, known_new):
            return False
        self._append(chunk_id, kind, self._sealer().seal(chunk_id, data), len(data), content_defined)
        return True

    def add_sealed(self, chunk_id: bytes, kind: int, box: bytes, raw_length: int, content_defined: bool = True) -> bool:
        """Store a blob a worker process already sealed, unless it is already stored."""
        if not self._claim(chunk_id):
            return False
        self._append(chunk_id, kind, box, raw_length, content_defined)
        return True

    def _append(self, chunk_id: bytes, kind: int, box: bytes, raw_length: int, content_defined: bool) -> None:
        full = None
        with self._lock:
            self.bytes_added += len(box)
            self.blobs_added += 1
            if not self._open or (self.spread and len(self._open) == 1 and len(self._open[0]) >= PACK_PAD_FLOOR):
                self._open.append(self._new_pack())
            slot = self._random.getrandbits(1) if len(self._open) == 2 else 0  # a fifth of randrange's cost, per blob
            builder = self._open[slot]
            builder.add(chunk_id, kind, box, raw_length, content_defined)
            if builder.ready():
                full, self._open[slot] = builder, self._new_pack()
        if full is not None:
            self.write_pack(full)

    def _new_pack(self) -> PackBuilder:
        return PackBuilder(NullSink() if self.dry_run else PackFile(self.repo))

    def write_pack(self, builder: PackBuilder) -> None:
        """Seal the pack, make it durable, index it; an index object follows every INDEX_OBJECT_EVERY packs."""
        info = builder.finish(self.cipher)
        if self.dry_run:
            return
        assert isinstance(builder.sink, PackFile)
        builder.sink.commit(info.pack_id)
        self.repo.index.add_packs([info])  # no index object yet: a killed run leaves it to header scanning
        with self._lock:
            # The index answers for these from now on: the claims need not be held, and memory stays flat.
            if self.dedup:
                self._claimed.difference_update(info.chunk_ids())
            self.packs_written += 1
            self._unindexed.append(info)
            waiting = len(self._unindexed) >= INDEX_OBJECT_EVERY or sum(p.blob_count for p in self._unindexed) >= INDEX_OBJECT_BLOBS
            batch = self._unindexed if waiting else []
            if batch:
                self._unindexed = []
        if batch:
            self.repo.write_index_object(batch, blobs_indexed=True)

    def settled(self) -> bool:
        """Nothing waits: no blob in an open pack, no written pack missing from an index object."""
        with self._lock:
            return not self._unindexed and not any(len(builder) for builder in self._open)

    def journal(self) -> None:
        """List the blobs added to each open pack since the last call in the pack's journal.

        A killed run's open packs are then not lost: `salvage_open_packs` takes in every blob
        a journal lists, so the files recorded as done with them need not be read again.
        """
        with self._lock:
            for builder in self._open:
                if isinstance(builder.sink, PackFile) and builder.journaled < builder.entry_count:
                    builder.flush()
                    builder.sink.journal(encode_journal_record(self.cipher, builder.unjournaled()))

    def abort(self) -> None:
        """A failed run: drop the open packs' temp files. Packs already written stay and are reused next time."""
        with self._lock:
            builders, self._open = self._open, []
        for builder in builders:
            if isinstance(builder.sink, PackFile):
                builder.sink.discard()

    def flush(self) -> None:
        """Write the open packs and an index object for everything not yet covered."""
        with self._lock:
            builders, self._open = self._open, []
        for builder in builders:
            if len(builder):
                self.write_pack(builder)
            elif isinstance(builder.sink, PackFile):
                builder.sink.discard()
        with self._lock:
            batch, self._unindexed = self._unindexed, []
        if batch and not self.dry_run:
            self.repo.write_index_object(batch, blobs_indexed=True)


def salvage_open_packs(repo: Repository) -> int:
    """Seal in place the open packs a killed run left, as far as their journals vouch for them; returns the blobs kept.

    Each listed box must still authenticate under its chunk id, so a torn tail is cut off.
    Sealing in place costs one hash of the kept bytes: nothing is copied. A pack with nothing
    to keep is deleted with its journal.
    """
    writer = BlobWriter(repo)

    def seal(tmp: Path, journal: Path) -> int:
        try:
            entries = decode_journal(repo.cipher, journal.read_bytes())
            content = tmp.read_bytes()
        except FileNotFoundError:
            return 0
        kept = authentic_prefix(repo.cipher, entries, content)
        if kept:
            end = kept[-1].offset + kept[-1].length
            writer.write_pack(PackBuilder.resume(PackFile.adopt(repo, tmp, end), kept, memoryview(content)[:end]))
        else:
            tmp.unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        return len(kept)

    abandoned = abandoned_open_packs(repo)
    if not abandoned:
        return 0
    with ThreadPoolExecutor(min(len(abandoned), 4), thread_name_prefix="salvage") as pool:  # hashing releases the GIL
        kept_blobs = sum(pool.map(lambda pair: seal(*pair), abandoned))
    writer.flush()  # an index object for the sealed packs
    return kept_blobs
