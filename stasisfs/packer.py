"""The write path for blobs: dedup, compress, seal, and spread over two open packs.

Thread-safe: backup workers call `add` concurrently. A blob is claimed before it
is sealed, so two workers never store the same chunk twice. Chunks go to one of
two open packs at random (as restic 0.18 does), so a pack's layout does not
mirror the order of the files it came from.
"""

from __future__ import annotations

import random
import threading

import zstandard

from .crypto import KIND_CHUNK
from .errors import IntegrityError
from .pack import PACK_TARGET_SIZE, PackBuilder, PackInfo, encode_blob_payload
from .repository import Repository

INDEX_OBJECT_EVERY = 32  # packs; bounds what a killed run leaves to header scanning
ZSTD_LEVEL = 3


class BlobWriter:
    def __init__(self, repo: Repository, dry_run: bool = False, verify: bool = True) -> None:
        self.repo = repo
        self.cipher = repo.cipher
        self.dry_run = dry_run
        self.verify = verify
        self._open = [PackBuilder(), PackBuilder()]
        self._lock = threading.Lock()
        self._claimed: set[bytes] = set()
        self._unindexed: list[PackInfo] = []
        self._local = threading.local()
        self._random = random.Random()  # placement needs unpredictability to the server, not secrecy
        self.bytes_added = 0
        self.blobs_added = 0
        self.packs_written = 0

    def _codecs(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        codecs = getattr(self._local, "codecs", None)
        if codecs is None:
            codecs = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
            self._local.codecs = codecs
        return codecs

    def knows(self, chunk_id: bytes) -> bool:
        return chunk_id in self._claimed or self.repo.index.has_chunk(chunk_id)

    def add(self, chunk_id: bytes, kind: int, data: bytes | memoryview) -> bool:
        """Store the blob unless it is already in the repository. True when it was new."""
        with self._lock:
            if chunk_id in self._claimed:
                return False
            self._claimed.add(chunk_id)
        if self.repo.index.has_chunk(chunk_id):
            return False
        compressor, decompressor = self._codecs()
        compressed = compressor.compress(data)
        if (
            self.verify
            and len(compressed) < len(data)
            and self.cipher.keys.chunk_id_of(decompressor.decompress(compressed, max_output_size=len(data))) != chunk_id
        ):
            # restic 0.16 shipped a compressor bug that wrote corrupt data; never trust the codec blindly.
            raise IntegrityError("compression self-check failed; refusing to store a corrupt chunk")
        box = self.cipher.seal(encode_blob_payload(data, compressed), KIND_CHUNK, chunk_id)
        full = None
        with self._lock:
            self.bytes_added += len(box)
            self.blobs_added += 1
            slot = self._random.randrange(2)
            builder = self._open[slot]
            builder.add(chunk_id, kind, box, len(data))
            if len(builder) >= PACK_TARGET_SIZE:
                full, self._open[slot] = builder, PackBuilder()
        if full is not None:
            self._write_pack(full)
        return True

    def _write_pack(self, builder: PackBuilder) -> None:
        if self.dry_run:
            return
        data, info = builder.finish(self.cipher)
        self.repo.store_pack(data, info)
        self.repo.index.add_packs([info])  # no index object yet: a killed run leaves it to header scanning
        with self._lock:
            self.packs_written += 1
            self._unindexed.append(info)
            batch = self._unindexed if len(self._unindexed) >= INDEX_OBJECT_EVERY else []
            if batch:
                self._unindexed = []
        if batch:
            self.repo.write_index_object(batch)

    def flush(self) -> None:
        """Write the open packs and an index object for everything not yet covered."""
        with self._lock:
            builders = [b for b in self._open if len(b)]
            self._open = [PackBuilder(), PackBuilder()]
        for builder in builders:
            self._write_pack(builder)
        with self._lock:
            batch, self._unindexed = self._unindexed, []
        if batch and not self.dry_run:
            self.repo.write_index_object(batch)
