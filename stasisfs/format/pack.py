"""The pack and index-object formats. Pure: bytes in, bytes out, no I/O.

A pack is

    blob box | blob box | ... | header box | random padding | trailer box

* each blob box seals `flag (0 raw, 1 zstd) | payload` with the chunk id in the associated data;
* the header box lists every blob (`HEADER_ENTRY`), so the index can be rebuilt from packs alone;
* the trailer box (fixed `TRAILER_BOX_LEN` bytes) holds the header's offset and length;
* random padding brings the total to Padmé(max(content, floor)), so neither the
  chunk sizes nor where the real content ends can be read from the outside.

The floor is 1 MiB for a pack holding any chunk cut by the content-defined chunker (a chunk of
a file of CHUNK_MIN bytes or more, whose boundaries the chunking attacks read), and 64 KiB for a
pack holding only whole small files and trees (see docs/security.md, "What a small change shows").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import zstandard

from stasisfs.errors import IntegrityError
from stasisfs.format.crypto import BOX_OVERHEAD, KIND_CHUNK, KIND_INDEX, KIND_PACK_HEADER, KIND_PACK_JOURNAL, KIND_PACK_TRAILER, Cipher, padded_size

BLOB_DATA = 0
BLOB_TREE = 1

PACK_TARGET_SIZE = 16 * 1024 * 1024
# A pack closes between these sizes at the first blob that leaves at most PACK_SNUG of padding: Padmé's
# steps there are 256 and 512 KiB, so closing anywhere would pad 1.5% on average, closing snug 0.2%.
PACK_MIN_SIZE = 12 * 1024 * 1024
PACK_MAX_SIZE = 20 * 1024 * 1024
PACK_SNUG = 32 * 1024
# Or once it holds this many blobs: a writer keeps an entry per blob of its open packs, and 16 MiB of
# tiny files (64-byte configs, empty-ish sources) is 150k of them, about 35 MB. At this many a pack of
# such files is a few MiB, padded to its Padmé step (at most 12%, 3% on average); other packs never get here.
PACK_MAX_BLOBS = 32_768
WRITE_BUFFER = 512 * 1024
PACK_PAD_FLOOR = 1024 * 1024  # a pack with a content-defined cut in it
SMALL_PACK_PAD_FLOOR = 64 * 1024  # a pack of whole small files and trees only

FLAG_RAW = 0
FLAG_ZSTD = 1

HEADER_MAGIC = b"SPH1"
HEADER_ENTRY = struct.Struct(">32sBIII")  # chunk id, blob kind, offset, box length, plaintext length
TRAILER = struct.Struct(">QI")  # header offset, header length
TRAILER_BOX_LEN = BOX_OVERHEAD + TRAILER.size

JOURNAL_RECORD = struct.Struct(">I")  # length of the sealed batch of entries that follows
INDEX_MAGIC = b"SIX1"
# Index objects since issue 18: "SIX2" || u32 length || zstd(body) || zeros, to Padmé(max(size, INDEX_FLOOR)), inside the
# box, so a server sees a run's index grow in Padmé steps only, not by 42 bytes a blob. Version 1 (no padding) is still read.
INDEX_PADDED_MAGIC = b"SIX2"
INDEX_FLOOR = 4096
INDEX_PACK = struct.Struct(">32sQI")  # pack id, pack size, entry count


@dataclass(frozen=True, slots=True)
class BlobEntry:
    chunk_id: bytes
    kind: int
    offset: int
    length: int
    raw_length: int


@dataclass(frozen=True, slots=True)
class PackInfo:
    """A pack as its header lists it. The entries stay encoded (HEADER_ENTRY rows, 45 bytes a blob):
    as `BlobEntry` objects they take about 150 bytes each, and a backup worker holds two open packs
    of up to 32k blobs."""

    pack_id: bytes
    size: int
    entries: bytes

    @classmethod
    def of_blobs(cls, pack_id: bytes, size: int, blobs: Iterable[BlobEntry]) -> PackInfo:
        return cls(pack_id, size, encode_entries(blobs))

    @property
    def blobs(self) -> list[BlobEntry]:
        return decode_entries(self.entries)

    @property
    def blob_count(self) -> int:
        return len(self.entries) // HEADER_ENTRY.size

    def chunk_ids(self) -> Iterator[bytes]:
        return (fields[0] for fields in HEADER_ENTRY.iter_unpack(self.entries))


def encode_entries(entries: Iterable[BlobEntry]) -> bytes:
    return b"".join(HEADER_ENTRY.pack(e.chunk_id, e.kind, e.offset, e.length, e.raw_length) for e in entries)


def decode_entries(view: bytes | bytearray | memoryview) -> list[BlobEntry]:
    return [BlobEntry(*fields) for fields in HEADER_ENTRY.iter_unpack(view)]


def encode_blob_payload(data: bytes | memoryview, compressed: bytes | None) -> bytes:
    """Keep zstd output only when it is smaller than the input."""
    if compressed is not None and len(compressed) < len(data):
        return b"\x01" + compressed
    return b"\x00" + bytes(data)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def decode_blob_payload(payload: bytes, raw_length: int) -> bytes:
    if not payload:
        raise IntegrityError("empty blob payload")
    if payload[0] == FLAG_RAW:
        return payload[1:]
    if payload[0] == FLAG_ZSTD:
        try:
            return _decompressor().decompress(memoryview(payload)[1:], max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob does not decompress: {exc}") from None
    raise IntegrityError("unknown blob compression flag")


class PackSink(Protocol):
    def write(self, data: bytes) -> None: ...


class MemorySink:
    """Collects a pack in memory (tests, and tools that need the bytes)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


class NullSink:
    """Discards the pack (dry runs)."""

    def write(self, data: bytes) -> None:
        return None  # a dry run measures, it does not store


class PackBuilder:
    """Streams sealed blobs to a sink as they come, so an open pack costs no memory, then seals it."""

    def __init__(self, sink: PackSink) -> None:
        self.sink = sink
        self.size = 0
        self.encoded = bytearray()  # the entries, as the header lists them
        self.journaled = 0  # how many entries the open pack's journal already lists
        self.content_defined = False  # holds a chunk whose boundaries the chunker chose: the 1 MiB floor
        self._digest = hashlib.sha256()
        self._buffered: list[bytes] = []  # small boxes go to the sink together: one write, one hash update
        self._buffered_size = 0

    @classmethod
    def resume(cls, sink: PackSink, entries: list[BlobEntry], written: bytes | memoryview) -> PackBuilder:
        """A builder for a pack whose first bytes (`written`, holding `entries`) are already in `sink`."""
        builder = cls(sink)
        builder.encoded = bytearray(encode_entries(entries))
        builder.journaled = len(entries)
        builder.content_defined = True  # what the blobs were is not recorded: the safe floor
        builder.size = len(written)
        builder._digest.update(written)
        return builder

    def __len__(self) -> int:
        return self.size

    @property
    def entry_count(self) -> int:
        return len(self.encoded) // HEADER_ENTRY.size

    def unjournaled(self) -> bytes:
        """The encoded entries added since the last call, now counted as journaled."""
        fresh = bytes(self.encoded[self.journaled * HEADER_ENTRY.size :])
        self.journaled = self.entry_count
        return fresh

    def _emit(self, data: bytes) -> None:
        self._buffered.append(data)
        self._buffered_size += len(data)
        self.size += len(data)
        if self._buffered_size >= WRITE_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Hand what is buffered to the sink; before journaling entries, so the journal never runs ahead of the file."""
        if self._buffered:
            data = b"".join(self._buffered) if len(self._buffered) > 1 else self._buffered[0]
            self._buffered, self._buffered_size = [], 0
            self.sink.write(data)
            self._digest.update(data)

    def add(self, chunk_id: bytes, kind: int, box: bytes, raw_length: int, content_defined: bool = True) -> None:
        self.encoded += HEADER_ENTRY.pack(chunk_id, kind, self.size, len(box), raw_length)
        self.content_defined |= content_defined
        self._emit(box)

    def padding_if_finished(self) -> int:
        """The padding `finish` would add now."""
        content = self.size + BOX_OVERHEAD + len(HEADER_MAGIC) + len(self.encoded) + TRAILER_BOX_LEN
        return padded_size(content, self.floor) - content

    def ready(self) -> bool:
        """Big enough to close: past the minimum and snug against a Padmé step, or at the maximum."""
        return (self.size >= PACK_MAX_SIZE or self.entry_count >= PACK_MAX_BLOBS
                or (self.size >= PACK_MIN_SIZE and self.padding_if_finished() <= PACK_SNUG))

    @property
    def floor(self) -> int:
        return PACK_PAD_FLOOR if self.content_defined else SMALL_PACK_PAD_FLOOR

    def finish(self, cipher: Cipher, floor: int | None = None) -> PackInfo:
        """Append header, padding and trailer; the pack id is the SHA-256 of everything written."""
        floor = self.floor if floor is None else floor
        header_box = cipher.seal(HEADER_MAGIC + self.encoded, KIND_PACK_HEADER)
        header_offset = self.size
        content = self.size + len(header_box) + TRAILER_BOX_LEN
        padding = os.urandom(padded_size(content, floor) - content)
        trailer_box = cipher.seal(TRAILER.pack(header_offset, len(header_box)), KIND_PACK_TRAILER)
        for part in (header_box, padding, trailer_box):
            self._emit(part)
        self.flush()
        return PackInfo(self._digest.digest(), self.size, bytes(self.encoded))


def encode_journal_record(cipher: Cipher, encoded_entries: bytes) -> bytes:
    """One appended batch of an open pack's journal: the (encoded) entries of blobs it holds so far, sealed."""
    box = cipher.seal(encoded_entries, KIND_PACK_JOURNAL)
    return JOURNAL_RECORD.pack(len(box)) + box


def decode_journal(cipher: Cipher, data: bytes) -> list[BlobEntry]:
    """The entries a journal vouches for, up to its first torn or unreadable record."""
    entries: list[BlobEntry] = []
    pos = 0
    while pos + JOURNAL_RECORD.size <= len(data):
        (length,) = JOURNAL_RECORD.unpack_from(data, pos)
        box = data[pos + JOURNAL_RECORD.size : pos + JOURNAL_RECORD.size + length]
        try:
            plain = cipher.open(box, KIND_PACK_JOURNAL)
        except IntegrityError:
            break  # the writer was killed mid-record
        if len(plain) % HEADER_ENTRY.size:
            break
        entries.extend(decode_entries(plain))
        pos += JOURNAL_RECORD.size + length
    return entries


def read_trailer(cipher: Cipher, trailer_box: bytes, pack_size: int) -> tuple[int, int]:
    offset, length = TRAILER.unpack(cipher.open(trailer_box, KIND_PACK_TRAILER))
    if offset + length > pack_size - TRAILER_BOX_LEN:
        raise IntegrityError("pack trailer points outside the pack")
    return offset, length


def parse_header(cipher: Cipher, header_box: bytes) -> list[BlobEntry]:
    header = cipher.open(header_box, KIND_PACK_HEADER)
    if header[:4] != HEADER_MAGIC or (len(header) - 4) % HEADER_ENTRY.size:
        raise IntegrityError("malformed pack header")
    return decode_entries(memoryview(header)[4:])


def parse_pack(cipher: Cipher, data: bytes) -> list[BlobEntry]:
    """Entries of a whole pack held in memory."""
    offset, length = read_trailer(cipher, data[-TRAILER_BOX_LEN:], len(data))
    return parse_header(cipher, data[offset : offset + length])


def encode_index(cipher: Cipher, packs: Iterable[PackInfo]) -> bytes:
    parts = [INDEX_MAGIC]
    for pack in packs:
        parts += (INDEX_PACK.pack(pack.pack_id, pack.size, pack.blob_count), pack.entries)
    compressed = zstandard.ZstdCompressor(level=3).compress(b"".join(parts))
    framed = INDEX_PADDED_MAGIC + struct.pack(">I", len(compressed)) + compressed
    return cipher.seal(framed + bytes(padded_size(len(framed), INDEX_FLOOR) - len(framed)), KIND_INDEX)


def decode_index(cipher: Cipher, data: bytes) -> Iterator[PackInfo]:
    opened = cipher.open(data, KIND_INDEX)
    if opened[:4] == INDEX_PADDED_MAGIC:
        (length,) = struct.unpack_from(">I", opened, 4)
        if length > len(opened) - 8:
            raise IntegrityError("index object padding is malformed")
        opened = opened[8 : 8 + length]
    plain = zstandard.ZstdDecompressor().decompress(opened, max_output_size=1 << 31)
    if plain[:4] != INDEX_MAGIC:
        raise IntegrityError("malformed index object")
    view = memoryview(plain)
    pos = 4
    while pos < len(plain):
        pack_id, size, count = INDEX_PACK.unpack_from(view, pos)
        pos += INDEX_PACK.size
        end = pos + count * HEADER_ENTRY.size
        if end > len(plain):
            raise IntegrityError("truncated index object")
        entries = bytes(view[pos:end])
        pos = end
        yield PackInfo(pack_id, size, entries)


def open_blob(cipher: Cipher, entry: BlobEntry, box: bytes | memoryview, verify: bool = True) -> bytes:
    """Decrypt, decompress and (by default) check the plaintext against its keyed id."""
    data = decode_blob_payload(cipher.open(box, KIND_CHUNK, entry.chunk_id), entry.raw_length)
    if len(data) != entry.raw_length or (verify and cipher.keys.chunk_id_of(data) != entry.chunk_id):
        raise IntegrityError(f"chunk {entry.chunk_id.hex()[:16]} does not match its id")
    return data


def blobs_in(cipher: Cipher, entries: Iterable[BlobEntry], data: bytes | memoryview) -> Iterator[tuple[BlobEntry, bytes | None]]:
    """Each entry with its plaintext from `data` (a pack's bytes, damaged or short), or None where its own sealed box
    is cut off, fails to open or does not match its id.

    Damage is judged per box: a flipped byte costs the one chunk whose box it hit, not the whole pack.
    """
    view = memoryview(data)
    for entry in entries:
        plain = None
        if entry.offset + entry.length <= len(view):
            with contextlib.suppress(IntegrityError, ValueError, zstandard.ZstdError):
                plain = open_blob(cipher, entry, view[entry.offset : entry.offset + entry.length])
        yield entry, plain


def unreadable_blobs(cipher: Cipher, entries: Iterable[BlobEntry], data: bytes | memoryview) -> set[bytes]:
    """Chunk ids whose own sealed box in `data` is lost (see `blobs_in`)."""
    return {entry.chunk_id for entry, plain in blobs_in(cipher, entries, data) if plain is None}


def authentic_prefix(cipher: Cipher, entries: list[BlobEntry], content: bytes) -> list[BlobEntry]:
    """The journal's entries up to the first whose box is not where it says, whole and authentic."""
    view = memoryview(content)
    kept: list[BlobEntry] = []
    end = 0
    for entry in entries:
        if entry.offset != end or entry.offset + entry.length > len(content):
            break
        try:
            cipher.open(view[entry.offset : entry.offset + entry.length], KIND_CHUNK, entry.chunk_id)
        except IntegrityError:
            break  # the rest was never written whole
        kept.append(entry)
        end = entry.offset + entry.length
    return kept
