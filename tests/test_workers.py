"""The chunking worker on its own: what it stores for a file that changed between the walk and the read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
