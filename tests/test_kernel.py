"""The libc calls Python does not wrap: dropping a file's mapped pages keeps its content readable."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from stasisfs.repo import index as index_module
from stasisfs.system.kernel import drop_mappings, file_mappings


def resident_kib(path: Path) -> int:
    """This process's resident KiB in mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.endswith(" " + str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_every_named_files_pages_are_dropped_and_read_back_on_use(tmp_path: Path) -> None:
    files = [tmp_path / "a.mdb", tmp_path / "b.mdb", tmp_path / "kept.mdb"]
    maps = []
    for number, path in enumerate(files):
        path.write_bytes(bytes([number + 1]) * (4 << 20))
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert sum(mapped[offset] for offset in range(0, len(mapped), 4096)) == (number + 1) * 1024  # touch every page
        maps.append(mapped)
    assert all(resident_kib(path) >= 4096 for path in files)
    drop_mappings(file_mappings(files[0], files[1]))
    assert resident_kib(files[0]) == 0 and resident_kib(files[1]) == 0
    assert resident_kib(files[2]) >= 4096, "only the files named"
    assert maps[1][12345] == 2 and maps[0][(4 << 20) - 1] == 1, "read back from the file"
    for mapped in maps:
        mapped.close()


def test_the_index_lists_its_mappings_once_and_again_whenever_a_map_may_have_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale range would drop (zero) whatever memory was mapped there since: every map change forgets the list."""
    monkeypatch.setattr(index_module, "MAP_SIZE", 1 << 20)  # small, so writes grow it
    listed: list[list[tuple[int, int]]] = []

    def counted(*paths: os.PathLike[str] | str) -> list[tuple[int, int]]:
        listed.append(file_mappings(*paths))
        return listed[-1]

    monkeypatch.setattr(index_module, "file_mappings", counted)
    index = index_module.Index(tmp_path / "index")
    try:
        index.release_mapped_pages(now=True)
        index.release_mapped_pages(now=True)
        assert len(listed) == 1 and len(listed[0]) == 1, "listed once: the chunk index's map"
        index.open_files_cache()
        index.release_mapped_pages(now=True)
        assert len(listed) == 2 and len(listed[1]) == 2, "the files cache's map joined it"
        before = listed[-1]
        entries = [(os.urandom(32), os.urandom(200)) for _ in range(20_000)]  # 4.6 MB: the 1 MiB map grows
        index._write(lambda txn: [txn.put(key, value, db=index._chunks) for key, value in entries])
        assert index.env.info()["map_size"] > 1 << 20, "the map grew (and moved)"
        index.release_mapped_pages(now=True)
        assert len(listed) == 3 and listed[-1] != before, "listed again where the grown map is now"
        with index.env.begin() as txn:
            assert all(txn.get(key, db=index._chunks) == value for key, value in entries[::997])
    finally:
        index.close()
