"""The helper that signs directories from the far end of the walk: its signatures are the walk's, and never change a snapshot."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import Cli, processes_started_for

from stasisfs.backup.pipeline import Backup, BackupOptions
from stasisfs.backup.presign import MARK, ReverseSigner, WalkParams
from stasisfs.format.snapshot import Snapshot
from stasisfs.repo.repository import Repository
from stasisfs.repo.trees import TreeReader

EXCLUDES = ["*.tmp", "skipme/"]


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo, _ = Repository.init(tmp_path / "repo", "a long test password here", "laptop")
    return repo


def varied_tree(root: Path) -> None:
    """Nesting, an empty directory, links, and what the options leave out: an excluded directory and file, a cache."""
    for d in range(4):
        deep = root / f"d{d}" / "inner" / "deeper"
        deep.mkdir(parents=True)
        for f in range(5):
            (root / f"d{d}" / f"f{f}.txt").write_text(f"file {d}/{f}\n" * (f + 1))
            (deep / f"g{f}.dat").write_bytes(bytes([d, f]) * 300)
    (root / "empty").mkdir()
    (root / "d0" / "link").symlink_to("inner/deeper/g0.dat")
    os.link(root / "d1" / "f1.txt", root / "d2" / "hardlink.txt")
    (root / "d3" / "scratch.tmp").write_text("excluded file\n")
    (root / "skipme").mkdir()
    (root / "skipme" / "secret.txt").write_text("excluded directory\n")
    (root / "cache").mkdir()
    (root / "cache" / "CACHEDIR.TAG").write_bytes(b"Signature: 8a477f597d28d172789f06886806bc55\n")
    (root / "cache" / "blob").write_text("cached\n")


def options(root: Path, excludes: list[str] = EXCLUDES) -> BackupOptions:
    return BackupOptions(paths=[bytes(root)], excludes=list(excludes), exclude_caches=True)


def finished_signer(repo: Repository, root: Path, excludes: list[str] = EXCLUDES) -> ReverseSigner:
    signer = ReverseSigner(WalkParams([bytes(root)], list(excludes), True, False, str(repo.path)))
    signer.wait()
    return signer


def backup(repo: Repository, root: Path, signer: ReverseSigner | None = None, excludes: list[str] = EXCLUDES) -> Snapshot:
    return Backup(repo, options(root, excludes), presigned=signer).run()


def saved_files(repo: Repository, snapshot: Snapshot, root: Path) -> dict[str, bytes]:
    """Every regular file under `root` in the snapshot, by its path relative to `root`, with its content."""
    reader = TreeReader(repo)
    top = reader.node_at(snapshot.root, bytes(root))
    return {os.fsdecode(os.path.relpath(path, bytes(root))): b"".join(repo.blobs.load(chunk) for chunk in node.content)
            for path, node in reader.walk(top, bytes(root)) if node.content is not None}


def test_the_helper_signs_every_directory_as_the_walk_recorded_it(repo: Repository, tmp_path: Path) -> None:
    root = tmp_path / "src"
    varied_tree(root)
    first = backup(repo, root)
    signer = finished_signer(repo, root)
    walked = [Path(d) for d, _, _ in os.walk(root)]
    left_out = {root / "skipme", root / "cache"}
    for directory in walked:
        signed = signer.take(bytes(directory))
        if directory in left_out:
            assert signed is None, f"{directory} is left out of the snapshot, so never signed"
            continue
        assert signed is not None, f"{directory} was not signed"
        dir_key = repo.master_keys.path_key(b"dir\0" + bytes(directory))
        assert repo.index.cached_tree(dir_key, signed.signature) is not None, f"{directory}: not the walk's signature"
    signer = finished_signer(repo, root)
    whole = signer.take(bytes(root))
    assert whole is not None and whole.files == first.summary.total_files
    assert whole.nbytes == first.summary.total_bytes
    second = backup(repo, root, finished_signer(repo, root))
    assert second.root == first.root
    assert (second.summary.files_unmodified, second.summary.total_files) == (first.summary.total_files, first.summary.total_files)
    assert second.summary.total_bytes == first.summary.total_bytes


def test_changes_made_before_the_run_are_saved_with_the_helper(repo: Repository, tmp_path: Path) -> None:
    root = tmp_path / "src"
    varied_tree(root)
    backup(repo, root)
    (root / "d1" / "inner" / "deeper" / "g3.dat").write_bytes(b"changed deep down\n")
    (root / "d3" / "new").mkdir()
    (root / "d3" / "new" / "fresh.txt").write_text("new file\n")
    (root / "d0" / "f2.txt").unlink()
    with_helper = backup(repo, root, finished_signer(repo, root))
    files = saved_files(repo, with_helper, root)
    assert files["d1/inner/deeper/g3.dat"] == b"changed deep down\n"
    assert files["d3/new/fresh.txt"] == b"new file\n"
    assert "d0/f2.txt" not in files
    assert files["d2/f4.txt"] == b"file 2/4\n" * 5
    assert with_helper.summary.files_changed == 1 and with_helper.summary.files_new == 1
    assert backup(repo, root).root == with_helper.root, "the walk alone saves the same tree"


def test_a_helper_started_long_before_the_walk_is_started_again(repo: Repository, tmp_path: Path) -> None:
    root = tmp_path / "src"
    varied_tree(root)
    backup(repo, root)
    stale = finished_signer(repo, root)  # signed the tree as it was before the edits below
    (root / "d2" / "inner" / "deeper" / "g1.dat").write_bytes(b"edited while the run waited for its lock\n")
    (root / "d0" / "inner" / "new.txt").write_text("added meanwhile\n")
    stale.started -= 60  # as if the run had waited a minute for another run's lock
    files = saved_files(repo, backup(repo, root, stale), root)
    assert files["d2/inner/deeper/g1.dat"] == b"edited while the run waited for its lock\n"
    assert files["d0/inner/new.txt"] == b"added meanwhile\n"


def test_signatures_under_other_rules_are_never_reused(repo: Repository, tmp_path: Path) -> None:
    root = tmp_path / "src"
    varied_tree(root)
    backup(repo, root, excludes=[])
    # A helper started with other excludes signs differently: every signature misses, and the walk lists everything.
    snapshot = backup(repo, root, finished_signer(repo, root, excludes=EXCLUDES), excludes=[])
    files = saved_files(repo, snapshot, root)
    assert files["skipme/secret.txt"] == b"excluded directory\n" and files["d3/scratch.tmp"] == b"excluded file\n"
    assert "cache/blob" not in files


def helpers(marked_by: str) -> list[int]:
    """Running presign helpers whose environment holds this string."""
    return processes_started_for(marked_by, MARK.encode())


def test_a_helper_killed_midway_costs_nothing_but_time(repo: Repository, tmp_path: Path) -> None:
    root = tmp_path / "src"
    varied_tree(root)
    first = backup(repo, root)
    signer = ReverseSigner(WalkParams([bytes(root)], EXCLUDES, True, False, str(repo.path)))
    os.kill(signer.pid, signal.SIGKILL)  # as the OOM killer would; still starting, so before it signed anything
    second = backup(repo, root, signer)
    assert second.root == first.root and second.summary.files_unmodified == first.summary.total_files
    assert helpers(str(tmp_path)) == []


def test_a_cli_re_backup_saves_the_same_tree_and_leaves_no_helper(cli: Cli) -> None:
    cli.init()
    root = cli.tmp / "src"
    varied_tree(root)
    cli.backup(root, "--exclude-caches")
    cli.backup(root, "--exclude-caches")
    (root / "d2" / "inner" / "late.txt").write_text("added before the third run\n")
    cli.backup(root, "--exclude-caches")
    first, second, third = cli.snapshots()
    assert second["summary"]["files_unmodified"] == first["summary"]["total_files"]  # type: ignore[index]
    assert second["summary"]["dirs_new"] == 0  # type: ignore[index]
    assert third["summary"]["files_new"] == 1  # type: ignore[index]
    assert helpers(str(cli.tmp)) == []
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    restored = cli.tmp / "out" / str(root).lstrip("/")
    assert (restored / "d2" / "inner" / "late.txt").read_text() == "added before the third run\n"
    assert not (restored / "cache" / "blob").exists()
