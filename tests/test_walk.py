"""Listing a tree ahead of the walk: what it hands over, and that its age never costs a change."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stasisfs.backup.pipeline import Backup, BackupOptions
from stasisfs.backup.walk import ListingAhead, WalkRules
from stasisfs.repo.repository import Repository
from stasisfs.repo.trees import TreeReader

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
    assert b"".join(repo.blobs.load(chunk_id) for chunk_id in node.content) == target.read_bytes()
    repo.close()
