import io
import os

from stasisfs.format.chunker import CHUNK_MAX, CHUNK_MIN, WINDOW, Chunker


def cut(data: bytes, seed: int = 7, step: int | None = None) -> list[bytes]:
    stream = io.BytesIO(data)

    def readinto(view: memoryview) -> int:
        return stream.readinto(view if step is None else view[:step])  # type: ignore[no-any-return]

    return [bytes(c) for c in Chunker(seed).cut(readinto)]


def test_chunks_reassemble_and_respect_bounds() -> None:
    data = os.urandom(3 * WINDOW + 12345)
    chunks = cut(data)
    assert b"".join(chunks) == data
    assert all(len(c) <= CHUNK_MAX for c in chunks)
    assert all(len(c) >= CHUNK_MIN for c in chunks[:-1])


def test_cut_points_do_not_depend_on_the_window() -> None:
    data = os.urandom(2 * WINDOW + 999)
    whole = cut(data)
    # the same data, with the window boundaries falling elsewhere, cuts the same way
    shifted = cut(os.urandom(0) + data)
    assert whole == shifted
    from pyfastcdc import FastCDC

    from stasisfs.format.chunker import CHUNK_AVG

    reference = [bytes(c.data) for c in FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX, seed=7).cut_buf(data)]
    assert whole == reference


def test_edit_changes_few_chunks() -> None:
    data = bytearray(os.urandom(20 * 1024 * 1024))
    before = set(cut(bytes(data)))
    data[10_000_000:10_000_010] = b"X" * 10
    after = cut(bytes(data))
    assert sum(c not in before for c in after) <= 2


def test_seed_changes_cut_points() -> None:
    data = os.urandom(8 * 1024 * 1024)
    assert cut(data, seed=1) != cut(data, seed=2)


def test_empty_and_tiny() -> None:
    assert cut(b"") == []
    assert cut(b"abc") == [b"abc"]
