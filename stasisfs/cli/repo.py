"""Repository commands: init, backup, snapshots, ls, find, dump, diff, restore, check, repair."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import click

from stasisfs import jobs
from stasisfs.backup.pipeline import Backup, BackupOptions, count_tree, normalize_paths
from stasisfs.backup.presign import ReverseSigner, WalkParams
from stasisfs.cli.common import (
    active_profile,
    counted,
    filter_options,
    fs,
    global_options,
    human_size,
    info,
    interruptible,
    open_repository,
    print_json,
    read_password,
    repo_path,
    snapshot_filter,
    sync_after_change,
    unlocked,
    warn,
    write_line,
)
from stasisfs.errors import EXIT_INCOMPLETE, EXIT_INTERRUPTED, StasisError, UsageError
from stasisfs.format.keyslots import password_weakness
from stasisfs.format.snapshot import Snapshot, resolve
from stasisfs.format.tree import FILE, SYMLINK, Node
from stasisfs.ops.check import Checker
from stasisfs.ops.restore import OVERWRITE_MODES, RestoreOptions, Restorer
from stasisfs.progress import Counters, Reporter
from stasisfs.remote.devices import DeviceRemotes
from stasisfs.repo.locking import RepositoryLock
from stasisfs.repo.repository import Repository
from stasisfs.repo.trees import TreeReader
from stasisfs.system.pools import spawn_ahead
from stasisfs.system.workerprocess import WorkerProcess


def find_snapshot(repo: Repository, ref: str, path: bytes = b"") -> Snapshot:
    """The snapshot `ref` names; for `latest`, the newest that passes --path/--tag and holds `path`."""
    try:
        return resolve(repo.snapshots(), ref, path, snapshot_filter())
    except LookupError as exc:
        raise UsageError(str(exc)) from None


def node_in(repo: Repository, snapshot: Snapshot, ref: str, path: bytes) -> Node:
    """The node at `path`; a path that is not there names the snapshot it looked in, and why that one."""
    try:
        return TreeReader(repo).node_at(snapshot.root, path)
    except UsageError as exc:
        why = " (the newest holding that path)" if ref == "latest" else ""
        raise UsageError(f"{exc} {snapshot.short_id} of {snapshot.time.astimezone():%Y-%m-%d %H:%M}{why}; "
                         f"its paths: {', '.join(fs(p) for p in snapshot.paths)}") from None


def filtered_snapshots(repo: Repository) -> list[Snapshot]:
    only = snapshot_filter()
    return [s for s in repo.snapshots() if only.admits(s)]


def split_ref(ref: str) -> tuple[str, bytes]:
    snapshot, _, path = ref.partition(":")
    return snapshot, os.fsencode(path)


@click.command()
@click.option("--device", default=None, help="Name of this device (default: the hostname).")
@global_options
def init(device: str | None) -> None:
    """Create a repository and this device's key.

    The repository directory must be new or empty. It will hold only
    encrypted objects; the index lives in ~/.cache/stasisfs.
    """
    path = repo_path()
    if (path / "config").exists():
        raise StasisError(f"a repository already exists at {path.absolute()}")
    password = read_password("new repository password", confirm=True)
    reason = password_weakness(password, [device or socket.gethostname(), "stasisfs"])
    if reason:
        raise StasisError(reason)
    repo, _ = Repository.init(path, password, device or socket.gethostname())
    info(f"created stasisfs repository {repo.id.hex()[:8]} at {repo.path}")
    info(
        "Your password is the only way into this repository. If you forget it, everything in it is lost,\n"
        "unless you export a recovery key now and keep it somewhere safe:  stasisfs key export --paper"
    )
    repo.close()


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=bytes))
@click.option("--exclude", "excludes", multiple=True, metavar="PAT", help="Skip paths matching this gitignore-style pattern.")
@click.option("--exclude-file", type=click.Path(exists=True, dir_okay=False), help="Read exclude patterns from a file, one per line.")
@click.option("--exclude-caches", is_flag=True, help="Skip directories holding a valid CACHEDIR.TAG.")
@click.option("--one-file-system", "-x", is_flag=True, help="Stay on the filesystem of each given path.")
@click.option("--tag", "tags", multiple=True, metavar="T", help="Tag the snapshot (repeatable).")
@click.option("--time", "when", metavar="ISO8601", help="Record this time instead of now.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Back up standard input as one file.")
@click.option("--stdin-filename", default="stdin", show_default=True, help="Name of the file made from standard input.")
@click.option("--dry-run", "-n", is_flag=True, help="Do everything but write to the repository.")
@click.option("--json", "json_output", is_flag=True, help="JSON lines: progress, then a summary.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the snapshot id.")
@click.option("--no-sync", is_flag=True, help="Do not sync to the remotes afterwards.")
@click.option("--lock-wait", type=click.IntRange(min=0), default=0, metavar="SECONDS",
              help="Wait this long for another run's lock before giving up with exit 11.")
@click.option("--schedule", "schedule_name", metavar="NAME", help="Run as the schedule NAME: log to ~/.local/state/stasisfs/NAME.log.")
@click.option("--every-missed", is_flag=True, help="With --schedule: only run when the schedule's last due time has no success yet.")
@global_options
def backup(paths: tuple[bytes, ...], excludes: tuple[str, ...], exclude_file: str | None, exclude_caches: bool,
           one_file_system: bool, tags: tuple[str, ...], when: str | None, from_stdin: bool, stdin_filename: str,
           dry_run: bool, json_output: bool, quiet: bool, no_sync: bool, lock_wait: int, schedule_name: str | None,
           every_missed: bool) -> None:
    """Snapshot PATHS into the repository, then sync it to every remote.

    Unchanged files are not read again. The last line of output is the
    snapshot id. Exits 3 if some files could not be read (the snapshot is
    saved without them), or if a remote could not be synced (the local
    snapshot is kept; the next run catches up).

    With --profile, the profile supplies the paths, excludes and tags, applies
    its retention policy afterwards and runs its on-success/on-failure hooks.
    """
    from stasisfs.schedule import unattended

    if schedule_name:
        unattended.log_to_rotating_file(schedule_name)
        try:
            profile = active_profile()
        except StasisError as exc:  # a run that cannot even start is a failed run, in the log and in `status`
            info(f"stasisfs: error: {exc}")
            unattended.record_run(f"schedule:{schedule_name}", unattended.RunRecord(unattended.now_iso(), 0.0, "failed", str(exc)))
            raise
    else:
        profile = active_profile()
    run_key = f"schedule:{schedule_name}" if schedule_name else (f"profile:{profile.name}" if profile else f"repo:{repo_path().absolute()}")
    if schedule_name:
        known = unattended.schedules().get(schedule_name)
        if every_missed and known is not None and run_key and not unattended.missed(known, run_key):
            info(f"schedule {schedule_name}: nothing missed since {known.previous_run().isoformat(timespec='minutes')}")
            return
    if profile is not None:
        paths = paths or tuple(os.fsencode(p) for p in profile.paths)
        excludes = (*excludes, *profile.exclude)
        exclude_caches = exclude_caches or profile.exclude_caches
        one_file_system = one_file_system or profile.one_file_system
        tags = (*tags, *profile.tags)
    started_at, started = unattended.now_iso(), time.monotonic()
    try:
        code, snapshot, reasons = _backup(paths, excludes, exclude_file, exclude_caches, one_file_system, tags, when, from_stdin,
                                          stdin_filename, dry_run, json_output, quiet, no_sync, lock_wait)
    except (StasisError, OSError) as exc:
        reason = str(exc)
        if run_key:
            unattended.record_run(run_key, unattended.RunRecord(started_at, round(time.monotonic() - started, 2), "failed", reason))
        if profile is not None:
            _hook_warning(unattended.run_hook(profile.on_failure, "failed", reason, "", profile.name))
        raise
    result = "success" if code == 0 else "incomplete"
    if run_key and not dry_run:
        unattended.record_run(run_key, unattended.RunRecord(started_at, round(time.monotonic() - started, 2), result, "; ".join(reasons),
                                                            snapshot.id.hex(), snapshot.summary.total_files, snapshot.summary.total_bytes))
    if profile is not None and not dry_run:
        hook = profile.on_success if code == 0 else profile.on_failure
        _hook_warning(unattended.run_hook(hook, result, "; ".join(reasons), snapshot.id.hex(), profile.name))
    if code:
        sys.exit(code)


def _hook_warning(message: str | None) -> None:
    if message:
        warn(message)


def _reverse_signer(repo: Repository, options: BackupOptions, from_stdin: bool) -> contextlib.AbstractContextManager[ReverseSigner | None]:
    """A helper signing directories from the far end of the walk (see presign), when an earlier run left signatures."""
    if from_stdin or not repo.has_files_cache():
        return contextlib.nullcontext()
    try:
        return ReverseSigner(WalkParams(normalize_paths(options.paths), options.excludes, options.exclude_caches,
                                        options.one_file_system, str(repo.path)))
    except OSError:  # no process to spare: the walk does it all
        return contextlib.nullcontext()


@contextlib.contextmanager
def _workers_ahead(repo: Repository, options: BackupOptions, from_stdin: bool) -> Iterator[list[WorkerProcess]]:
    """A first backup's worker processes, started while the key is derived; they read every file, so none is wasted."""
    spawned = [] if from_stdin or repo.has_files_cache() else spawn_ahead(options.workers, "stasisfs.backup.workers")
    try:
        yield spawned
    finally:
        for worker in spawned:  # the backup shut down those it adopted; this is for the rest
            worker.shutdown(cancel_futures=True)


def _backup(paths: tuple[bytes, ...], excludes: tuple[str, ...], exclude_file: str | None, exclude_caches: bool,
            one_file_system: bool, tags: tuple[str, ...], when: str | None, from_stdin: bool, stdin_filename: str,
            dry_run: bool, json_output: bool, quiet: bool, no_sync: bool, lock_wait: int) -> tuple[int, Snapshot, list[str]]:
    """The backup itself; returns (exit code, snapshot, reasons it is incomplete)."""
    if not paths and not from_stdin:
        raise UsageError("nothing to back up: give one or more paths, or --stdin")
    if paths and from_stdin:
        raise UsageError("--stdin takes no paths")
    patterns = list(excludes)
    if exclude_file:
        with open(exclude_file) as f:
            patterns += [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    moment = None
    if when:
        try:
            moment = datetime.fromisoformat(when)
        except ValueError:
            raise UsageError(f"--time {when!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.astimezone()
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing and len(missing) == len(paths):
        raise StasisError(f"nothing to back up: {', '.join(fs(p) for p in missing)} {'does' if len(missing) == 1 else 'do'} not exist")
    for p in missing:  # an unplugged disk among several paths: the rest is saved, and the run exits 3
        warn(f"{fs(p)} does not exist; backing up the other paths")
    paths = tuple(p for p in paths if p not in missing)
    options = BackupOptions(paths=list(paths), excludes=patterns, exclude_caches=exclude_caches,
                            one_file_system=one_file_system, tags=list(tags), time=moment, dry_run=dry_run)
    counters = Counters()
    mode = Reporter.choose(json_output, quiet)
    profile = active_profile()
    saved: Snapshot | None = None
    try:
        # While the key is derived and open packs are salvaged, a re-backup's helper signs directories from the far end of the walk.
        with open_repository(unlock=False) as repo, _reverse_signer(repo, options, from_stdin) as presigned, \
                _workers_ahead(repo, options, from_stdin) as spawned, unlocked(repo), RepositoryLock(repo, "backup", wait=lock_wait):
            job = Backup(repo, options, counters, warn=None if json_output else warn, presigned=presigned, spawned=spawned)
            job.begin()  # after a killed run its workers start now, while the salvage below runs
            jobs.prepare_backup(repo)  # resume: chunks a killed run packed are reused, even from its open packs
            stop = threading.Event()
            if mode == "bar" and not from_stdin:
                threading.Thread(target=count_tree, args=(job.options.paths, counters, stop, job.rules), daemon=True).start()
            written: list[Snapshot] = []
            with Reporter(counters, mode, "backup"):
                try:
                    with interruptible(job.stop):
                        written.append(job.run_stdin(sys.stdin.buffer, stdin_filename) if from_stdin else job.run())
                finally:
                    saved = written[0] if written and not dry_run else None  # a signal after this point finds it saved
            snapshot = written[0]
            stop.set()
            if profile is not None and profile.retention is not None and not dry_run:
                assert profile.retention is not None
                removed = jobs.apply_retention(repo, profile.retention, profile.prune, profile.max_unused,
                                               say=jobs.quiet if quiet or json_output else info)
                if removed and not (quiet or json_output):
                    info(f"retention of profile {profile.name}: removed {counted(removed, 'snapshot')}")
            sync_failures = {} if dry_run or no_sync else sync_after_change(repo, json_output, names=profile.remotes if profile else None)
    except KeyboardInterrupt:
        if saved is None:
            info("interrupted: nothing saved; the next run resumes and reuses what this one stored")
            raise SystemExit(EXIT_INTERRUPTED) from None
        info(f"interrupted after snapshot {saved.short_id} was saved; retention and sync did not finish, the next run catches up")
        click.echo(saved.id.hex())
        return 0, saved, []
    s = snapshot.summary
    if json_output:
        print_json({"message_type": "summary", "snapshot_id": snapshot.id.hex() if not dry_run else None,
                    "dry_run": dry_run, "errors": job.warnings, "sync_failed": sync_failures, **s.__dict__})
    elif not quiet:
        info(f"files: {s.files_new} new, {s.files_changed} changed, {s.files_unmodified} unmodified")
        info(f"dirs: {s.dirs_new} new trees; added {human_size(s.data_added)} of data ({human_size(job.bytes_stored)} stored)")
        info(f"processed {s.total_files} files, {human_size(s.total_bytes)} in {s.duration_s:.2f}s")
        if dry_run:
            info("dry run: nothing was written")
        else:
            info(f"snapshot {snapshot.short_id} saved")
    if not dry_run and not json_output:  # with --json the summary line carries the id
        click.echo(snapshot.id.hex())
    reasons = ([f"{fs(p)} does not exist" for p in missing] + [str(w) for w in job.warnings]
               + [f"remote {name}: {why}" for name, why in sync_failures.items()])
    if (job.warnings or missing) and not json_output:
        warn(f"the snapshot is incomplete: {counted(len(job.warnings) + len(missing), 'problem')} (listed above)")
    return (EXIT_INCOMPLETE if reasons else 0), snapshot, reasons


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Print a JSON list.")
@filter_options
@global_options
def snapshots(json_output: bool) -> None:
    """List snapshots, oldest first (--path and --tag narrow the list)."""
    with open_repository() as repo:
        items = filtered_snapshots(repo)
    if json_output:
        print_json([s.to_json() for s in items])
        return
    write_line(f"{'ID':<9} {'Time':<19}  {'Device':<16} {'Tags':<12} Paths")
    for s in items:
        paths = b", ".join(s.paths)
        write_line(f"{s.short_id:<9} {s.time.astimezone().strftime('%Y-%m-%d %H:%M:%S')}  {s.device:<16} {','.join(s.tags):<12} ", paths)
    write_line(counted(len(items), "snapshot"))


def node_json(path: bytes, node: Node) -> dict[str, object]:
    doc: dict[str, object] = {"path": fs(path), "name": fs(node.name), "type": node.type, "mode": node.mode,
                              "uid": node.uid, "gid": node.gid, "mtime_ns": node.mtime_ns}
    if node.type == FILE:
        doc["size"] = node.size
    if node.type == SYMLINK:
        doc["target"] = fs(node.target)
    return doc


@click.command()
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("path", required=False, type=click.Path(path_type=bytes))
@click.option("--long", "-l", "long_format", is_flag=True, help="Show mode, size and time.")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON list.")
@filter_options
@global_options
def ls(snapshot_ref: str, path: bytes | None, long_format: bool, json_output: bool) -> None:
    """List everything in a snapshot, or below PATH in it (`latest` with PATH: the newest snapshot holding it)."""
    with open_repository() as repo:
        start = b"/" + (path or b"").strip(b"/")
        snapshot = find_snapshot(repo, snapshot_ref, start if path else b"")
        reader = TreeReader(repo)
        top = node_in(repo, snapshot, snapshot_ref, start)
        entries = [(p, n) for p, n in reader.walk(top, start) if p != b"/"]
    if json_output:
        print_json([node_json(p, n) for p, n in entries])
        return
    for p, n in entries:
        if long_format:
            mtime = datetime.fromtimestamp(n.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
            write_line(f"{n.type:<8} {n.mode:04o} {n.uid:>5} {n.gid:>5} {n.size:>12} {mtime} ", p)
        else:
            write_line(p)


@click.command()
@click.argument("pattern")
@click.option("--snapshot", "snapshot_ref", metavar="SNAPSHOT", help="Search only this snapshot.")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON list.")
@filter_options
@global_options
def find(pattern: str, snapshot_ref: str | None, json_output: bool) -> None:
    """Find files whose name (or path, if PATTERN has a /) matches a glob."""
    pat = os.fsencode(pattern)
    on_path = b"/" in pat
    results = []
    with open_repository() as repo:
        reader = TreeReader(repo)
        chosen = [find_snapshot(repo, snapshot_ref)] if snapshot_ref else filtered_snapshots(repo)
        for snap in chosen:
            for p, n in reader.walk(reader.root_node(snap.root), b"/"):
                if p != b"/" and fnmatch.fnmatchcase(p if on_path else n.name, pat):
                    results.append((snap, p, n))
    if json_output:
        print_json([{"snapshot": s.id.hex(), **node_json(p, n)} for s, p, n in results])
        return
    for snap, p, n in results:
        write_line(f"{snap.short_id}  {n.type:<8} ", p)
    if not results:
        info("no matches")


@click.command()
@click.argument("ref", metavar="SNAPSHOT:PATH")
@filter_options
@global_options
def dump(ref: str) -> None:
    """Write one file from a snapshot to standard output."""
    snapshot_ref, path = split_ref(ref)
    if not path:
        raise UsageError("give SNAPSHOT:PATH, for example latest:/home/me/notes.txt")
    with open_repository() as repo:
        node = node_in(repo, find_snapshot(repo, snapshot_ref, path), snapshot_ref, path)
        if node.type != FILE:
            raise UsageError(f"{fs(path)} is a {node.type}, not a file; use `stasisfs restore` for directories")
        out = sys.stdout.buffer
        for chunk_id in node.content:
            out.write(repo.blobs.load(chunk_id))
        out.flush()


@click.command()
@click.argument("first", metavar="SNAPSHOT")
@click.argument("second", metavar="SNAPSHOT")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON document.")
@filter_options
@global_options
def diff(first: str, second: str, json_output: bool) -> None:
    """Show what changed between two snapshots.

    + added, - removed, M content changed, U metadata changed, T type changed.
    """
    with open_repository() as repo:
        a, b = find_snapshot(repo, first), find_snapshot(repo, second)
        changes = jobs.diff_snapshots(repo, a, b)
    counts = {k: sum(1 for c, _ in changes if c == k) for k in "+-MUT"}
    if json_output:
        print_json({"first": a.id.hex(), "second": b.id.hex(), "changes": [{"modifier": c, "path": fs(p)} for c, p in changes],
                    "added": counts["+"], "removed": counts["-"], "changed": counts["M"], "metadata": counts["U"], "type": counts["T"]})
        return
    for code, p in changes:
        write_line(f"{code}    ", p)
    info(f"{counts['+']} added, {counts['-']} removed, {counts['M']} changed, {counts['U']} metadata only, {counts['T']} type changed")


@click.command()
@click.argument("ref", metavar="SNAPSHOT[:PATH]")
@click.option("--target", "-t", required=True, type=click.Path(path_type=bytes), help="Directory to restore into.")
@click.option("--include", "includes", multiple=True, metavar="PAT", help="Restore only paths matching (repeatable).")
@click.option("--exclude", "excludes", multiple=True, metavar="PAT", help="Do not restore paths matching (repeatable).")
@click.option("--overwrite", type=click.Choice(OVERWRITE_MODES), default="always", show_default=True,
              help="What to do with files that already exist in the target.")
@click.option("--verify", is_flag=True, help="Read restored files back and check them.")
@click.option("--sparse", is_flag=True, help="Leave holes where the data is all zeros.")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON summary.")
@filter_options
@global_options
def restore(ref: str, target: bytes, includes: tuple[str, ...], excludes: tuple[str, ...], overwrite: str,
            verify: bool, sparse: bool, json_output: bool) -> None:
    """Restore a snapshot, or one path in it, into --target.

    A backed-up path /home/a/x comes back as TARGET/home/a/x. With :PATH naming
    a directory, its contents land directly in TARGET.
    """
    snapshot_ref, path = split_ref(ref)
    counters = Counters()
    with open_repository() as repo:
        snapshot = find_snapshot(repo, snapshot_ref, path)
        if path:
            node_in(repo, snapshot, snapshot_ref, path)  # a missing path names the snapshot it was looked for in
        counters.total_files, counters.total_bytes, counters.total_known = snapshot.summary.total_files, snapshot.summary.total_bytes, True
        options = RestoreOptions(target=target, subpath=path, includes=list(includes), excludes=list(excludes),
                                 overwrite=overwrite, verify=verify, sparse=sparse)
        restorer = Restorer(repo, options, counters, report=lambda m: warn(m))
        try:
            with Reporter(counters, Reporter.choose(False, json_output), "restore"), interruptible(restorer.stop):
                result = restorer.run(snapshot)
        except KeyboardInterrupt:
            info(f"interrupted: {restorer.result.files} files restored; run the same command to finish "
                 "(files being written were left under temporary names and are written again)")
            raise SystemExit(EXIT_INTERRUPTED) from None
    for w in result.warnings:
        warn(w)
    if json_output:
        print_json({"message_type": "summary", "snapshot_id": snapshot.id.hex(), "files_restored": result.files,
                    "bytes_restored": result.bytes, "files_skipped": result.skipped, "errors": result.errors})
    else:
        info(f"restored {counted(result.files, 'file')}, {human_size(result.bytes)} from snapshot {snapshot.short_id} to {fs(target)}"
             + (f"; {counted(result.skipped, 'existing file')} left alone" if result.skipped else ""))
        if verify:
            failed = result.files - result.verified
            info(f"verified: {counted(result.verified, 'file')} read back from disk match their chunk ids"
                 + (f"; {failed} did not (listed above)" if failed else ""))
    if result.errors:
        raise StasisError(f"restore incomplete: {len(result.errors)} files could not be restored (listed above)")


@click.command()
@click.option("--read-data", is_flag=True, help="Also read, decrypt and authenticate every pack.")
@click.option("--read-data-subset", metavar="N%|n/m", help="Read only a share of the packs.")
@click.option("--remote", "remote_name", metavar="NAME", help="Check the copy this remote holds instead of the local one.")
@global_options
def check(read_data: bool, read_data_subset: str | None, remote_name: str | None) -> None:
    """Verify the repository's structure, and with --read-data its data.

    With --remote NAME, check the copy that remote holds instead: every pack,
    index object and snapshot is there, and with --read-data each pack
    downloaded from it hashes to its id and decrypts.
    """
    if read_data and read_data_subset:
        raise UsageError("use either --read-data or --read-data-subset")
    with open_repository() as repo:
        remote = DeviceRemotes(repo.id).get(remote_name) if remote_name else None
        report = Checker(repo, say=info, remote=remote).run(read_data, read_data_subset)
    for note in report.notes:
        info(f"note: {note}")
    if not report.ok:
        raise StasisError(f"check found {counted(len(report.errors), 'problem')}")
    info(f"no errors were found ({report.snapshots} snapshots, {report.trees} trees"
         + (f", {report.packs_read} packs read)" if report.packs_read else ")"))


@click.group(invoke_without_command=True)
@click.option("--remote", "remote_name", metavar="NAME", help="Heal this remote's copy from the local one instead.")
@click.option("--read-data", is_flag=True, help="With --remote: download every pack to find bit rot, not just missing ones.")
@global_options
@click.pass_context
def repair(ctx: click.Context, remote_name: str | None, read_data: bool) -> None:
    """Heal damaged or missing packs from another copy; or `repair index`.

    
    stasisfs repair                 replace bad local packs with verified copies from the remotes
    stasisfs repair --remote NAME   re-upload what NAME lacks or holds damaged, from the local copy
    stasisfs repair index           rebuild the local index cache
    When no good copy exists anywhere, it names the files that are lost.
    """
    if ctx.invoked_subcommand is not None:
        return
    from stasisfs.ops.repair import heal_local, heal_metadata, heal_remote

    healed_objects: list[str] = []
    with open_repository() as repo, RepositoryLock(repo, "repair"):
        if remote_name:
            report = heal_remote(repo, DeviceRemotes(repo.id).get(remote_name), read_data, info)
        else:
            report = heal_local(repo, info)
            if report.healed:
                repo.sync_index()
            healed_objects = heal_metadata(repo, info)
    info(f"checked {report.checked} packs: {len(report.healed)} healed, {len(report.lost)} with no good copy anywhere"
         + (f"; {len(healed_objects)} snapshot and index objects healed" if healed_objects else ""))
    if report.lost:
        for line in report.lost_files:
            write_line("lost: ", line)
        raise StasisError(f"{len(report.lost)} packs could not be healed and {len(report.lost_files)} files are lost; "
                          "`stasisfs forget` the affected snapshots, or keep them for the files that remain")


@repair.command("snapshots")
@click.option("--forget", "forget_originals", is_flag=True, help="Remove the original snapshots once repaired copies are saved.")
@global_options
def repair_snapshots_command(forget_originals: bool) -> None:
    """Rewrite snapshots that need lost data, keeping everything that is still there.

    Run `stasisfs repair` first: it heals what any remote still holds. What
    remains lost is dropped: files that need a lost chunk, and the contents of
    directories whose listing is lost. Repaired snapshots are tagged `repaired`.
    """
    from stasisfs.ops.repair import repair_snapshots

    with open_repository() as repo, RepositoryLock(repo, "repair snapshots"):
        result = repair_snapshots(repo, forget_originals, info)
    for line in result.dropped_files:
        write_line("dropped: ", line)
    if result.snapshots_set_aside:
        info(f"{len(result.snapshots_set_aside)} damaged snapshot object(s) that no copy could heal set aside (renamed *.damaged)")
    for old, new in result.rewritten:
        info(f"snapshot {old} repaired as {new}" + (" (original removed)" if forget_originals else ""))
    if not result.rewritten:
        info("no snapshot needs lost data")


@repair.command("index")
@click.option("--read-all-packs", is_flag=True, help="Ignore index objects and read every pack header.")
@global_options
def repair_index(read_all_packs: bool) -> None:
    """Rebuild the local LMDB index from the repository's index objects and pack headers."""
    with open_repository() as repo, RepositoryLock(repo, "repair index"):
        chunks, recovered = repo.rebuild_index(from_packs=read_all_packs)
    info(f"index rebuilt: {chunks} chunks" + (f", {recovered} packs read from their headers" if recovered else ""))
