"""Listing a tree ahead of the walk: what it hands over, and that its age never costs a change."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from stasisfs.backup import Backup, BackupOptions
from stasisfs.reader import TreeReader
from stasisfs.repository import Repository
from stasisfs.walk import ListingAhead, WalkRules

HOUR_AGO = time.time() - 3600


def settled_tree(root: Path) -> Path:
    """A small tree whose directories were last changed an hour ago, as most of a real disk is."""
    (root / "docs" / "old").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "docs" / "old" / "b.txt").write_text("bravo\n")
    (root / "skipme").mkdir()
    (root / "skipme" / "c.txt").write_text("charlie\n")
    for directory in (root / "docs" / "old", root / "docs", root / "skipme", root):
        os.utime(directory, (HOUR_AGO, HOUR_AGO))
    return root


def listed_ahead(root: Path, rules: WalkRules) -> ListingAhead:
    listing = ListingAhead([bytes(root)], rules)
    listing.__enter__()
    listing.wait()
    return listing


def test_unchanged_directories_are_handed_over_with_their_stats(tmp_path: Path) -> None:
    root = settled_tree(tmp_path / "src")
    listing = listed_ahead(root, WalkRules(["skipme/"], False, tmp_path / "repo"))
    entries = listing.take(bytes(root / "docs"))
    assert entries is not None and sorted(e.name for e in entries) == [b"a.txt", b"old"]
    assert listing.take(bytes(root / "docs")) is None, "each listing is handed over once"
    assert listing.take(bytes(root / "docs" / "old")) is not None
    assert listing.take(bytes(root / "skipme")) is None, "excluded directories are not listed"


def test_a_directory_changed_since_it_was_listed_is_listed_again(tmp_path: Path) -> None:
    root = settled_tree(tmp_path / "src")
    listing = listed_ahead(root, WalkRules([], False, tmp_path / "repo"))
    (root / "docs" / "new.txt").write_text("new\n")
    (root / "docs" / "old" / "b.txt").unlink()
    assert listing.take(bytes(root / "docs")) is None
    assert listing.take(bytes(root / "docs" / "old")) is None
    assert listing.take(bytes(root / "skipme")) is not None


def test_a_directory_changed_just_before_it_was_listed_is_listed_again(tmp_path: Path) -> None:
    root = settled_tree(tmp_path / "src")
    (root / "docs" / "fresh.txt").write_text("fresh\n")  # mtime now: a change in the same clock tick would not show
    listing = listed_ahead(root, WalkRules([], False, tmp_path / "repo"))
    assert listing.take(bytes(root / "docs")) is None
    assert listing.take(bytes(root / "docs" / "old")) is not None


def test_a_file_rewritten_after_the_listing_is_backed_up_as_it_is_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo, _ = Repository.init(tmp_path / "repo", "a long test password here", "laptop")
    root = settled_tree(tmp_path / "src")
    options = BackupOptions(paths=[bytes(root)])
    listing = listed_ahead(root, WalkRules([], False, repo.path))
    target = root / "docs" / "old" / "b.txt"
    target.write_text("bravo, rewritten at greater length\n")  # the directory's entries stay as listed
    job = Backup(repo, options, listed=listing)
    snapshot = job.run()
    assert job.warnings == [], "a listing's age is not a change while reading"
    reader = TreeReader(repo)
    node = reader.node_at(snapshot.root, bytes(target))
    assert node.size == len(target.read_bytes())
    assert b"".join(repo.load_blob(chunk_id) for chunk_id in node.content) == target.read_bytes()
    repo.close()


def backed_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: BackupOptions) -> tuple[Repository, bytes]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo, _ = Repository.init(tmp_path / "repo", "a long test password here", "laptop")
    return repo, Backup(repo, options).run().root


def entered_directories(root: Path, excluded: set[str]) -> list[Path]:
    return [root] + [p for p in sorted(root.rglob("*")) if p.is_dir() and p.name not in excluded and "skipme" not in p.parts]


@pytest.mark.parametrize("excludes,exclude_caches", [([], False), (["skipme/"], False), ([], True), (["skipme/", "*.txt"], True)])
def test_signatures_made_ahead_are_the_walks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, excludes: list[str], exclude_caches: bool) -> None:
    """The directory cache, filled by a walk, knows every signature the listing made: else the listing would save nothing."""
    root = settled_tree(tmp_path / "src")
    (root / "docs" / "cache").mkdir()
    (root / "docs" / "cache" / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    (root / "docs" / "link").symlink_to("a.txt")
    os.link(root / "docs" / "a.txt", root / "docs" / "old" / "a-again.txt")
    for directory in (root / "docs" / "cache", root / "docs" / "old", root / "docs", root):
        os.utime(directory, (HOUR_AGO, HOUR_AGO))
    options = BackupOptions(paths=[bytes(root)], excludes=excludes, exclude_caches=exclude_caches)
    repo, _ = backed_up_once(tmp_path, monkeypatch, options)
    listing = listed_ahead(root, WalkRules(excludes, False, repo.path, exclude_caches))
    skipped = {"skipme"} if excludes else set()
    if exclude_caches:
        skipped.add("cache")
    for directory in entered_directories(root, skipped):
        signed = listing.signature(bytes(directory))
        assert signed is not None, directory
        assert repo.index.cached_tree(repo.master_keys.path_key(b"dir\0" + bytes(directory)), signed.signature) is not None, directory
    repo.close()


def test_an_unchanged_tree_listed_ahead_is_not_walked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = settled_tree(tmp_path / "src")
    options = BackupOptions(paths=[bytes(root)])
    repo, first_root = backed_up_once(tmp_path, monkeypatch, options)
    listing = listed_ahead(root, WalkRules([], False, repo.path))
    entered: list[bytes] = []
    real_save_dir = Backup._save_dir

    def counted_save_dir(self: Backup, pool: ThreadPoolExecutor, path: bytes, *rest: Any) -> bytes:
        entered.append(path)
        return real_save_dir(self, pool, path, *rest)

    monkeypatch.setattr(Backup, "_save_dir", counted_save_dir)
    job = Backup(repo, options, listed=listing)
    snapshot = job.run()
    assert entered == [bytes(root)], "the walk stops at the top: the cache knows the signature made ahead"
    assert snapshot.root == first_root
    assert job.summary.files_unmodified == 3 and job.summary.files_new == 0
    repo.close()


def test_changes_before_or_after_the_listing_reach_the_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = settled_tree(tmp_path / "src")
    options = BackupOptions(paths=[bytes(root)])
    repo, _ = backed_up_once(tmp_path, monkeypatch, options)
    (root / "docs" / "old" / "b.txt").write_text("bravo, changed before the listing\n")
    os.utime(root / "docs" / "old", (HOUR_AGO, HOUR_AGO))  # only the file's own stat tells
    listing = listed_ahead(root, WalkRules([], False, repo.path))
    (root / "skipme" / "d.txt").write_text("delta, added after the listing\n")
    snapshot = Backup(repo, options, listed=listing).run()
    reader = TreeReader(repo)
    for path in (root / "docs" / "old" / "b.txt", root / "skipme" / "d.txt"):
        node = reader.node_at(snapshot.root, bytes(path))
        assert b"".join(repo.load_blob(chunk_id) for chunk_id in node.content) == path.read_bytes(), path
    repo.close()
