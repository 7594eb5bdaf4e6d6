"""One conformance suite, run over every object store."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_fixture import make_bucket

from stasisfs_server.stores import ObjectNotFound, ObjectStore, object_key, open_store, open_stores

DEVICE = "0123456789abcdef0123456789abcdef"


def key(n: int, kind: str = "data") -> str:
    return object_key(DEVICE, kind, f"{n:064x}")


def real_key(data: bytes, kind: str = "data") -> str:
    import hashlib

    return object_key(DEVICE, kind, hashlib.sha256(data).hexdigest())


@pytest.fixture(params=["memory", "file", "s3", "replicated"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    if request.param == "s3":
        aws = request.getfixturevalue("s3_endpoint")
        for name, value in aws.items():
            monkeypatch.setenv(name, value)
        bucket = f"conformance-{os.urandom(4).hex()}"
        make_bucket(aws, bucket)
        yield open_store(f"s3://{bucket}/some/prefix", tmp_path)
    elif request.param == "replicated":
        yield open_stores(["memory://", f"file://{tmp_path / 'replica'}"], tmp_path)
    else:
        yield open_store("memory://" if request.param == "memory" else f"file://{tmp_path / 'objects'}", tmp_path)


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


def test_s3_multipart_and_ranged_reads(tmp_path: Path, s3_endpoint: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from stasisfs_server.stores import s3

    for name, value in s3_endpoint.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(s3, "MULTIPART_ABOVE", 6 * 1024 * 1024)
    make_bucket(s3_endpoint, "multipart")
    store = open_store("s3://multipart", tmp_path)
    data = os.urandom(12 * 1024 * 1024)
    store.put(key(1), data)
    assert store.size(key(1)) == len(data)
    assert store.get(key(1), 9_000_000, 1000) == data[9_000_000:9_001_000]
    assert store.get(key(1)) == data


def test_replicas_survive_a_lost_or_damaged_copy_and_heal(tmp_path: Path) -> None:
    from stasisfs_server.stores.replicated import ReplicatedStore

    first, second = f"file://{tmp_path / 'a'}", f"file://{tmp_path / 'b'}"
    store = open_stores([first, second], tmp_path)
    assert isinstance(store, ReplicatedStore)
    data = os.urandom(5000)
    k = real_key(data)
    store.put(k, data)
    a, b = store.replicas
    assert a.get(k) == b.get(k) == data  # written to both before put returns
    a.delete(k)
    assert store.get(k) == data  # falls back to the next replica
    assert store.heal(k) == (True, [a.url])
    assert a.get(k) == data
    damaged = bytearray(data)
    damaged[0] ^= 1
    b.put(k, bytes(damaged))
    assert store.get(k) == data  # a damaged copy is skipped
    assert store.heal(k) == (True, [b.url]) and b.get(k) == data
