import os

import pytest

from stasisfs.crypto import KIND_CHUNK, Cipher, MasterKeys, padme
from stasisfs.errors import IntegrityError
from stasisfs.pack import (
    BLOB_DATA,
    BLOB_TREE,
    MemorySink,
    PackBuilder,
    decode_index,
    encode_blob_payload,
    encode_index,
    open_blob,
    parse_pack,
)


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
