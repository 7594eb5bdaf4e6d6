"""The chunking worker on its own: what it stores for a file that changed between the walk and the read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stasisfs.backup import pipeline
from stasisfs.backup.workers import ChunkWorker
from stasisfs.format.chunker import CHUNK_MAX, CHUNK_MIN
from stasisfs.repo.blobs import BlobReader
from stasisfs.repo.repository import Repository


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo, _ = Repository.init(tmp_path / "repo", "a long test password here", "laptop")
    return repo


def stored_content(repo: Repository, worker: ChunkWorker, chunk_ids: list[bytes]) -> bytes:
    worker.writer.flush()
    reader = BlobReader(repo.path, repo.cipher, lambda: repo.index, None)
    return b"".join(reader.load(chunk_id) for chunk_id in chunk_ids)


@pytest.mark.parametrize("now_bytes", [0, 5, 3000, CHUNK_MIN, 2 * CHUNK_MAX + 17])
def test_a_small_file_that_changed_size_since_the_walk_is_stored_as_it_is_now(repo: Repository, tmp_path: Path, now_bytes: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    listed = path.stat()
    content = os.urandom(now_bytes)
    path.write_bytes(content)
    worker = ChunkWorker(repo, verify=True, dry_run=False)
    result = worker.process(bytes(path), listed.st_size, listed.st_mtime_ns, pack_here=True)
    assert result.error is None
    assert result.size == now_bytes
    assert result.changed, "a size other than the listed one is reported as a change"
    assert stored_content(repo, worker, result.content) == content
    if now_bytes > CHUNK_MAX:
        assert len(result.content) > 1, "a file that grew past one chunk is cut by content"


def test_a_small_file_is_one_chunk_and_compressible_content_is_checked_and_stored(repo: Repository, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = b"the same line again\n" * 400
    path.write_bytes(content)
    st = path.stat()
    worker = ChunkWorker(repo, verify=True, dry_run=False)
    result = worker.process(bytes(path), st.st_size, st.st_mtime_ns, pack_here=True)
    assert (result.error, result.changed, len(result.content)) == (None, False, 1)
    assert 0 < result.stored < len(content) // 4, "compressed before it was sealed"
    assert stored_content(repo, worker, result.content) == content


def test_into_an_empty_index_copies_of_a_small_file_are_stored_once_without_a_lookup(repo: Repository, tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every copy of a small file comes to the same worker (by size), which remembers what it stored; with an
    empty index at the start there is nothing else to find, so the index is not searched (its pages stay unmapped)."""
    lookups: list[bytes] = []
    has_chunk = repo.index.has_chunk

    def counted_has_chunk(chunk_id: bytes) -> bool:
        lookups.append(chunk_id)
        return has_chunk(chunk_id)

    monkeypatch.setattr(repo.index, "has_chunk", counted_has_chunk)
    contents = [b"alpha" * 100, b"beta" * 125, b"alpha" * 100, b"alpha" * 100, b""]
    worker = ChunkWorker(repo, verify=True, dry_run=False)
    results = []
    for n, content in enumerate(contents):
        path = tmp_path / f"f{n}"
        path.write_bytes(content)
        st = path.stat()
        results.append(worker.process(bytes(path), st.st_size, st.st_mtime_ns, pack_here=True, index_was_empty=True))
    assert [r.added for r in results] == [500, 500, 0, 0, 0], "each content stored once"
    assert lookups == []
    assert stored_content(repo, worker, results[3].content) == contents[3]


def test_after_an_earlier_run_a_small_file_it_stored_is_looked_up_and_not_stored_again(repo: Repository, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"kept from the last run" * 10)
    st = path.stat()
    first = ChunkWorker(repo, verify=True, dry_run=False)
    assert first.process(bytes(path), st.st_size, st.st_mtime_ns, pack_here=True, index_was_empty=True).added == 220
    first.writer.flush()
    copy = tmp_path / "copy"
    copy.write_bytes(path.read_bytes())
    st = copy.stat()
    second = ChunkWorker(repo, verify=True, dry_run=False)  # the next run: a new worker, knowing nothing of the last
    for pack_here in (True, False):
        result = second.process(bytes(copy), st.st_size, st.st_mtime_ns, pack_here=pack_here, index_was_empty=False)
        assert (result.added, result.new_blobs) == (0, [])


def test_in_one_run_a_copy_of_a_file_past_one_chunk_goes_to_the_worker_that_has_the_original(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Larger files go to the least loaded worker, except a size met before, which goes where that file went.

    Queued in this order (files of a directory come after its subdirectories): the original (worker 0),
    then 600 KB (worker 1), then 5 MB (worker 0, the less loaded), then the copy, which the least loaded
    worker (1) would store again: it cannot know what worker 0 has not indexed yet.
    """
    monkeypatch.setattr(pipeline, "PARENT_PACKS_FIRST", 0)  # every worker packs what it seals: no parent dedups for it
    original = os.urandom(300_000)
    deepest = tmp_path / "src" / "d1" / "d2" / "d3"
    deepest.mkdir(parents=True)
    (deepest / "original").write_bytes(original)
    (deepest.parent / "middle").write_bytes(os.urandom(600_000))
    (deepest.parent.parent / "big").write_bytes(os.urandom(5_000_000))
    (tmp_path / "src" / "copy").write_bytes(original)
    job = pipeline.Backup(repo, pipeline.BackupOptions(paths=[bytes(tmp_path / "src")], workers=2))
    snapshot = job.run()
    assert len(job._worker_pids) == 2, "worker processes, not threads"
    assert snapshot.summary.data_added == 300_000 + 600_000 + 5_000_000, "the copy was stored once"


def test_a_re_backup_whose_files_are_all_unchanged_starts_no_worker(repo: Repository, tmp_path: Path) -> None:
    """A new symlink rebuilds the directory's tree: past the walk's look-ahead of unchanged entries, none is read."""
    src = tmp_path / "src"
    src.mkdir()
    for n in range(pipeline.MAX_PENDING_ITEMS + 200):
        (src / f"f{n}").write_bytes(b"%d" % n)
    options = pipeline.BackupOptions(paths=[bytes(src)], workers=2)
    pipeline.Backup(repo, options).run()
    (src / "link").symlink_to("f1")
    again = pipeline.Backup(repo, options)
    snapshot = again.run()
    assert snapshot.summary.files_unmodified == pipeline.MAX_PENDING_ITEMS + 200
    assert again._procs is None, "no worker started"
