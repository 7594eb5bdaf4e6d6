"""The libc calls Python does not wrap: dropping a file's mapped pages keeps its content readable."""

from __future__ import annotations

import mmap
from pathlib import Path

from stasisfs.system.kernel import drop_file_mappings


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
    drop_file_mappings(files[0], files[1])
    assert resident_kib(files[0]) == 0 and resident_kib(files[1]) == 0
    assert resident_kib(files[2]) >= 4096, "only the files named"
    assert maps[1][12345] == 2 and maps[0][(4 << 20) - 1] == 1, "read back from the file"
    for mapped in maps:
        mapped.close()
