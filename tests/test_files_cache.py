"""The files cache: its own environment, records grouped by directory, and a cache from before that still spares a re-read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stasisfs.backup.pipeline import Backup, BackupOptions
from stasisfs.format.snapshot import Snapshot
from stasisfs.repo.repository import Repository


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo, _ = Repository.init(tmp_path / "repo", "a long test password here", "laptop")
    return repo


def tree(root: Path) -> list[Path]:
    files = []
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(20):
            path = root / f"d{d}" / f"f{f}.txt"
            path.write_text(f"file {d}/{f}\n" * (f + 1))
            files.append(path)
    return files


def backup(repo: Repository, root: Path) -> Snapshot:
    return Backup(repo, BackupOptions(paths=[bytes(root)])).run()


def file_records(repo: Repository) -> dict[bytes, bytes]:
    files, records = repo.index.open_files_cache()
    with files.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=records)}


def test_a_directorys_records_share_a_key_prefix(repo: Repository, tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    backup(repo, tmp_path / "src")
    keys = repo.master_keys
    stored = file_records(repo)
    for path in files:
        dir_key = keys.path_key(b"dir\0" + os.fsencode(path.parent))
        assert dir_key[:8] + keys.path_key(os.fsencode(path))[:24] in stored
    prefixes = {key[:8] for key in stored if len(stored[key]) != 64}  # not the directory records (signature | tree id)
    assert len(prefixes) == 3, "one prefix per directory"


def test_a_cache_from_before_the_grouping_is_read_once_then_dropped(repo: Repository, tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    backup(repo, tmp_path / "src")
    keys, index = repo.master_keys, repo.index
    grouped = file_records(repo)
    # Rewrite the cache as an older version kept it: file records under the path hash alone, no directory records.
    legacy = {}
    for path in files:
        dir_key = keys.path_key(b"dir\0" + os.fsencode(path.parent))
        legacy[keys.path_key(os.fsencode(path))] = grouped[dir_key[:8] + keys.path_key(os.fsencode(path))[:24]]
    index.clear_files_cache()
    with index.env.begin(write=True) as txn:
        old = index.env.open_db(b"files", txn=txn)
        for key, value in legacy.items():
            txn.put(key, value, db=old)
    assert index.has_legacy_files() and not index.files_empty()

    migrating = backup(repo, tmp_path / "src")
    assert migrating.summary.files_unmodified == len(files), "the old records spare every file a re-read"
    assert (migrating.summary.files_new, migrating.summary.files_changed) == (0, 0)
    assert not index.has_legacy_files(), "a complete run drops the old records"

    (files[0]).write_text("changed\n")
    after = backup(repo, tmp_path / "src")
    assert (after.summary.files_changed, after.summary.files_unmodified) == (1, len(files) - 1), "the grouped records carry on"


def test_the_workers_chunk_index_holds_no_file_records(repo: Repository, tmp_path: Path) -> None:
    tree(tmp_path / "src")
    backup(repo, tmp_path / "src")
    index = repo.index
    with index.env.begin() as txn:
        names = {bytes(name) for name, _ in txn.cursor()}
        legacy = index.env.open_db(b"files", txn=txn)
        assert txn.stat(legacy)["entries"] == 0
    assert b"files-by-dir" not in names
    assert len(file_records(repo)) == 60 + 4, "every file and directory (and the parent above them) in the files cache"


def test_a_damaged_files_cache_is_dropped_and_the_files_read_again(repo: Repository, tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    backup(repo, tmp_path / "src")
    files_path = repo.index.files_path
    repo.close()
    data = files_path / "data.mdb"
    scrambled = bytearray(data.read_bytes())
    scrambled[2 * 4096 :] = os.urandom(len(scrambled) - 2 * 4096)  # every page past the two meta pages
    data.write_bytes(scrambled)
    again = Repository(repo.path)
    again.unlock_master(repo.master_keys.master)
    snapshot = backup(again, tmp_path / "src")
    assert snapshot.summary.files_unmodified == 0 and not snapshot.incomplete
    assert backup(again, tmp_path / "src").summary.files_unmodified == len(files), "a fresh cache serves the next run"
