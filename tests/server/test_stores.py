"""One conformance suite, run over every object store."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stasisfs_server.stores import ObjectNotFound, ObjectStore, object_key, open_store

DEVICE = "0123456789abcdef0123456789abcdef"


def key(n: int, kind: str = "data") -> str:
    return object_key(DEVICE, kind, f"{n:064x}")


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    url = "memory://" if request.param == "memory" else f"file://{tmp_path / 'objects'}"
    yield open_store(url, tmp_path)


def test_round_trip_and_ranges(store: ObjectStore) -> None:
    data = bytes(range(256)) * 100
    store.put(key(1), data)
    assert store.get(key(1)) == data
    assert store.get(key(1), 10, 20) == data[10:30]
    assert store.get(key(1), len(data) - 5) == data[-5:]
    assert store.get(key(1), 100, 10**9) == data[100:]
    assert store.size(key(1)) == len(data)


def test_missing_objects(store: ObjectStore) -> None:
    assert store.size(key(2)) is None
    with pytest.raises(ObjectNotFound):
        store.get(key(2))
    assert store.delete(key(2)) is False


def test_delete(store: ObjectStore) -> None:
    store.put(key(3), b"x")
    assert store.delete(key(3)) is True
    assert store.size(key(3)) is None


def test_listing_is_sorted_and_prefixed(store: ObjectStore) -> None:
    for n in (5, 1, 9):
        store.put(key(n), b"d")
    store.put(key(4, "index"), b"i")
    assert list(store.keys(f"{DEVICE}/data/")) == [key(1), key(5), key(9)]
    assert list(store.keys()) == sorted([key(1), key(5), key(9), key(4, "index")])
    assert list(store.keys("ffff")) == []


def test_replacing_is_atomic_under_concurrent_readers(store: ObjectStore) -> None:
    a, b = b"a" * 1_000_000, b"b" * 1_000_000
    store.put(key(7), a)
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = store.get(key(7))
            seen.add(data[:1] + data[-1:])

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(20):
        store.put(key(7), b)
        store.put(key(7), a)
    stop.set()
    reader.join()
    assert seen <= {b"aa", b"bb"}  # never a torn mix


@pytest.mark.parametrize("bad", ["../" * 3 + "etc/passwd", f"{DEVICE}/data/{'0' * 63}", f"{DEVICE}/data/{'0' * 63}/", f"{DEVICE}/../{'0' * 64}",
                                 f"{DEVICE}/data/{'G' * 64}", f"{DEVICE.upper()}/data/{'0' * 64}"])
def test_keys_are_never_paths(bad: str) -> None:
    device, _, rest = bad.partition("/")
    kind, _, object_id = rest.partition("/")
    with pytest.raises(ValueError):
        object_key(device, kind, object_id)


def test_file_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'o'}", tmp_path)
    for n in range(20):
        store.put(key(n), b"z" * n)
    files = [p.name for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert len(files) == 20 and not any(name.startswith(".tmp") for name in files)
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in (tmp_path / "o").rglob("*") if p.is_file())


def test_file_store_sweeps_only_old_temp_files(tmp_path: Path) -> None:
    import os

    from stasisfs_server.stores.file import FileStore

    store = FileStore(tmp_path / "o")
    store.put(key(1), b"kept")
    fan = tmp_path / "o" / DEVICE / "data" / "00"
    old, fresh = fan / ".tmp-old.abc", fan / ".tmp-fresh.def"
    old.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    os.utime(old, (1, 1))
    assert store.sweep_temp_files() == 1
    assert not old.exists() and fresh.exists() and store.get(key(1)) == b"kept"
