import pytest

from stasisfs.errors import IntegrityError
from stasisfs.format.crypto import KIND_CHUNK, KIND_SNAPSHOT, Cipher, MasterKeys, padded_size, padme


@pytest.fixture
def cipher() -> Cipher:
    return Cipher(MasterKeys(b"k" * 32, b"r" * 32))


def test_seal_open_roundtrip(cipher: Cipher) -> None:
    box = cipher.seal(b"secret data", KIND_CHUNK, b"id1")
    assert b"secret data" not in box
    assert cipher.open(box, KIND_CHUNK, b"id1") == b"secret data"


def test_associated_data_binds_kind_and_id(cipher: Cipher) -> None:
    box = cipher.seal(b"x", KIND_CHUNK, b"id1")
    with pytest.raises(IntegrityError):
        cipher.open(box, KIND_CHUNK, b"id2")
    with pytest.raises(IntegrityError):
        cipher.open(box, KIND_SNAPSHOT, b"id1")


def test_other_repository_cannot_open(cipher: Cipher) -> None:
    other = Cipher(MasterKeys(b"k" * 32, b"s" * 32))
    with pytest.raises(IntegrityError):
        other.open(cipher.seal(b"x", KIND_CHUNK), KIND_CHUNK)


def test_tampering_detected(cipher: Cipher) -> None:
    box = bytearray(cipher.seal(b"payload", KIND_CHUNK))
    box[-1] ^= 1
    with pytest.raises(IntegrityError):
        cipher.open(bytes(box), KIND_CHUNK)


def test_sessions_differ_and_interoperate() -> None:
    keys = MasterKeys(b"k" * 32, b"r" * 32)
    a, b = Cipher(keys), Cipher(keys)
    box_a, box_b = a.seal(b"same", KIND_CHUNK), b.seal(b"same", KIND_CHUNK)
    assert box_a[1:17] != box_b[1:17]  # fresh session id per writer
    assert b.open(box_a, KIND_CHUNK) == a.open(box_b, KIND_CHUNK) == b"same"


def test_nonces_never_repeat_within_session(cipher: Cipher) -> None:
    nonces = {cipher.seal(b"x", KIND_CHUNK)[17:29] for _ in range(1000)}
    assert len(nonces) == 1000


@pytest.mark.parametrize(
    "length,expected",
    [(0, 0), (1, 1), (9, 10), (100, 104), (1000, 1024), (16 * 2**20 + 1, 16 * 2**20 + 2**19)],
)
def test_padme(length: int, expected: int) -> None:
    assert padme(length) == expected


def test_padme_overhead_bounded() -> None:
    for length in range(1, 200_000, 997):
        assert length <= padme(length) <= length * 1.12 + 1


def test_padding_floor() -> None:
    assert padded_size(10, 1 << 20) == 1 << 20


def test_keyed_ids_depend_on_key() -> None:
    assert MasterKeys(b"a" * 32, b"r" * 32).chunk_id_of(b"x") != MasterKeys(b"b" * 32, b"r" * 32).chunk_id_of(b"x")
