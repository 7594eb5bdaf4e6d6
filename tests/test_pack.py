import hashlib
import os
from pathlib import Path

import pytest

from stasisfs.errors import IntegrityError
from stasisfs.format.crypto import KIND_CHUNK, Cipher, MasterKeys, padme
from stasisfs.format.pack import (
    BLOB_DATA,
    BLOB_TREE,
    PACK_MAX_BLOBS,
    BlobEntry,
    MemorySink,
    PackBuilder,
    PackInfo,
    authentic_prefix,
    decode_index,
    decode_journal,
    encode_blob_payload,
    encode_entries,
    encode_index,
    encode_journal_record,
    open_blob,
    parse_pack,
)
from stasisfs.repo.index import WRITE_BATCH, Index


@pytest.fixture
def cipher() -> Cipher:
    return Cipher(MasterKeys(os.urandom(32), os.urandom(32)))


def build(cipher: Cipher, blobs: list[bytes], floor: int = 1 << 20) -> tuple[bytes, object]:
    sink = MemorySink()
    builder = PackBuilder(sink)
    for i, data in enumerate(blobs):
        chunk_id = cipher.keys.chunk_id_of(data)
        payload = encode_blob_payload(data, None)
        builder.add(chunk_id, BLOB_TREE if i % 2 else BLOB_DATA, cipher.seal(payload, KIND_CHUNK, chunk_id), len(data))
    info = builder.finish(cipher, floor)
    data = sink.data
    assert len(data) == info.size
    return data, info


def test_pack_roundtrip_from_header_alone(cipher: Cipher) -> None:
    blobs = [os.urandom(n) for n in (10, 5000, 70000)]
    data, info = build(cipher, blobs)
    entries = parse_pack(cipher, data)
    assert [e.chunk_id for e in entries] == [b.chunk_id for b in info.blobs]  # type: ignore[attr-defined]
    for entry, original in zip(entries, blobs, strict=False):
        assert open_blob(cipher, entry, data[entry.offset : entry.offset + entry.length]) == original


def test_pack_size_is_padded_and_hides_content_size(cipher: Cipher) -> None:
    small, _ = build(cipher, [b"a"])
    larger, _ = build(cipher, [os.urandom(300_000)])
    assert len(small) == len(larger) == 1 << 20  # the floor hides both
    big, _ = build(cipher, [os.urandom(3_000_001)])
    assert len(big) == padme(len(big))


def test_tampered_blob_is_rejected(cipher: Cipher) -> None:
    data, _info = build(cipher, [b"hello world" * 100])
    entry = parse_pack(cipher, data)[0]
    box = bytearray(data[entry.offset : entry.offset + entry.length])
    box[40] ^= 0xFF
    with pytest.raises(IntegrityError):
        open_blob(cipher, entry, bytes(box))


def test_index_object_roundtrip(cipher: Cipher) -> None:
    _, info_a = build(cipher, [b"one", b"two"])
    _, info_b = build(cipher, [b"three"])
    decoded = list(decode_index(cipher, encode_index(cipher, [info_a, info_b])))  # type: ignore[list-item]
    assert decoded == [info_a, info_b]


def test_compression_kept_only_when_smaller() -> None:
    assert encode_blob_payload(b"abc", b"longer-than-input")[0] == 0
    assert encode_blob_payload(b"a" * 100, b"short")[0] == 1


def test_journal_yields_entries_up_to_the_first_torn_record(cipher: Cipher) -> None:
    first = [BlobEntry(os.urandom(32), BLOB_DATA, 0, 100, 80), BlobEntry(os.urandom(32), BLOB_TREE, 100, 50, 40)]
    second = [BlobEntry(os.urandom(32), BLOB_DATA, 150, 70, 70)]
    third = [BlobEntry(os.urandom(32), BLOB_DATA, 220, 30, 10)]
    records = [encode_journal_record(cipher, encode_entries(batch)) for batch in (first, second, third)]
    assert decode_journal(cipher, b"".join(records)) == first + second + third
    assert decode_journal(cipher, b"".join(records)[:-5]) == first + second  # killed mid-write
    damaged = bytearray(b"".join(records))
    damaged[len(records[0]) + 20] ^= 1
    assert decode_journal(cipher, bytes(damaged)) == first  # nothing after an unreadable record is trusted
    assert decode_journal(cipher, b"") == []
    other = Cipher(MasterKeys(os.urandom(32), os.urandom(32)))
    assert decode_journal(other, b"".join(records)) == []  # another repository's journal vouches for nothing


def sealed_blobs(cipher: Cipher, sizes: list[int]) -> tuple[list[BlobEntry], bytes]:
    """Boxes laid end to end as an open pack holds them, with their header entries."""
    entries, parts, offset = [], [], 0
    for size in sizes:
        data = os.urandom(size)
        chunk_id = cipher.keys.chunk_id_of(data)
        box = cipher.seal(encode_blob_payload(data, None), KIND_CHUNK, chunk_id)
        entries.append(BlobEntry(chunk_id, BLOB_DATA, offset, len(box), size))
        parts.append(box)
        offset += len(box)
    return entries, b"".join(parts)


def test_an_open_pack_is_kept_up_to_its_first_damaged_or_missing_box(cipher: Cipher) -> None:
    entries, content = sealed_blobs(cipher, [100, 2000, 300, 50])
    assert authentic_prefix(cipher, entries, content) == entries
    assert authentic_prefix(cipher, entries, content[:-1]) == entries[:3]  # the last box was torn
    damaged = bytearray(content)
    damaged[entries[1].offset + 40] ^= 1
    assert authentic_prefix(cipher, entries, bytes(damaged)) == entries[:1]  # nothing after a bad box is trusted
    swapped = [entries[0], entries[2], entries[1], entries[3]]
    assert authentic_prefix(cipher, swapped, content) == entries[:1]  # entries must tile the pack from its start
    other = Cipher(MasterKeys(os.urandom(32), os.urandom(32)))
    assert authentic_prefix(other, entries, content) == []


def test_a_pack_resumed_from_its_written_part_equals_one_built_at_once(cipher: Cipher) -> None:
    entries, content = sealed_blobs(cipher, [100, 2000, 300])
    resumed_sink = MemorySink()
    resumed_sink.write(content)
    resumed = PackBuilder.resume(resumed_sink, entries, memoryview(content))
    info = resumed.finish(cipher)
    data = resumed_sink.data
    assert info.pack_id == hashlib.sha256(data).digest() and info.size == len(data)
    assert list(info.blobs) == entries
    assert parse_pack(cipher, data) == entries


def test_a_pack_of_tiny_blobs_closes_at_the_blob_limit(cipher: Cipher) -> None:
    """A writer holds an entry per blob of an open pack: tiny files must not make one pack hold 150k of them."""
    builder = PackBuilder(MemorySink())
    box = cipher.seal(encode_blob_payload(b"x" * 40, b"x" * 40), KIND_CHUNK, b"")
    for n in range(PACK_MAX_BLOBS - 1):
        builder.add(n.to_bytes(32, "big"), BLOB_DATA, box, 40, content_defined=False)
        assert n % 4096 or not builder.ready()  # far below the size at which a pack closes
    builder.add(PACK_MAX_BLOBS.to_bytes(32, "big"), BLOB_DATA, box, 40, content_defined=False)
    assert builder.ready() and len(builder) < 8 << 20
    info = builder.finish(cipher)
    assert info.size == padme(info.size) and len(info.blobs) == PACK_MAX_BLOBS


def test_the_index_takes_a_pack_of_many_blobs_whole(tmp_path: Path) -> None:
    """Blobs go in bounded transactions, the pack's row after them: every blob is found, and the pack is listed."""
    index = Index(tmp_path / "index")
    try:
        blobs = tuple(BlobEntry(os.urandom(32), BLOB_DATA, 100 * n, 100, 60) for n in range(3 * WRITE_BATCH + 5))
        pack = PackInfo.of_blobs(os.urandom(32), 1 << 20, blobs)
        index.add_packs([pack])
        assert index.packs()[pack.pack_id][0] == 1 << 20
        assert all(index.lookup(e.chunk_id) is not None for e in blobs)
        assert index.chunk_count() == len(blobs)
    finally:
        index.close()
