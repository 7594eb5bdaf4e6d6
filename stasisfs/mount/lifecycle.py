"""Mount lifecycle: detach, serve, report readiness, unmount cleanly on SIGINT/SIGTERM.

The parent reads the password and unlocks the key, then forks before any LMDB
environment or thread exists. The child starts a new session, drops the inherited
stdin/stdout/stderr (so `$(stasisfs mount ...)` never hangs), mounts, and writes one
status line to a pipe. The parent returns 0 only once the mount answers.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from stasisfs.errors import IntegrityError, StasisError
from stasisfs.format.snapshot import Snapshot
from stasisfs.format.tree import Node
from stasisfs.mount.pagepush import PagePusher, fuse_device_fd
from stasisfs.repo.repository import Repository
from stasisfs.repo.trees import TreeReader
from stasisfs.system import mountinfo
from stasisfs.system.paths import state_root

MOUNT_OPTIONS = {"fsname=stasisfs", "subtype=stasisfs", "ro", "default_permissions"}
READY_TIMEOUT = 60.0


class RepositorySource:
    """The vfs's view of a repository: snapshots, trees, chunk sizes and chunks."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        # Decoded trees are the mount's largest cache (a 100-entry tree is ~30 KB of nodes): 512 cover a
        # walk's read-ahead and the directories around it, and keep memory flat in the number of files.
        self.reader = TreeReader(repo, cache_size=512)

    def snapshots(self) -> list[Snapshot]:
        self.repo.sync_index()
        return self.repo.snapshots()

    def tree(self, tree_id: bytes) -> list[Node]:
        return self.reader.tree(tree_id)

    def chunk_sizes(self, chunk_ids: list[bytes]) -> list[int]:
        sizes = []
        for chunk_id in chunk_ids:
            location = self.repo.index.lookup(chunk_id)
            if location is None:
                raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is not in the index")
            sizes.append(location.raw_length)
        return sizes

    def chunk(self, chunk_id: bytes) -> bytes:
        return self.repo.blobs.load(chunk_id)

    def tree_if_cached(self, tree_id: bytes) -> list[Node] | None:
        return self.reader.tree_if_cached(tree_id)

    def chunk_if_cached(self, chunk_id: bytes, max_length: int) -> bytes | None:
        return self.repo.blobs.load_if_cached(chunk_id, max_length)

    def advise(self, chunk_ids: list[bytes]) -> None:
        self.repo.blobs.advise(chunk_ids)


class MultiSource:
    """This repository plus other devices' (thin) repositories: every object goes to the one whose index holds it.

    Chunk and tree ids are keyed by each repository's own key, so they never collide across devices.
    """

    def __init__(self, own: RepositorySource, others: list[RepositorySource]) -> None:
        self.own = own
        self.sources = [own, *others]
        self._routes: dict[bytes, RepositorySource] = {}

    def _route(self, object_id: bytes) -> RepositorySource:
        if self.own.repo.index.lookup(object_id) is not None:
            return self.own
        found = self._routes.get(object_id)
        if found is None:
            found = next((s for s in self.sources[1:] if s.repo.index.lookup(object_id) is not None), self.own)
            if len(self._routes) > 100_000:
                self._routes.clear()
            self._routes[object_id] = found
        return found

    def snapshots(self) -> list[Snapshot]:
        return [snap for source in self.sources for snap in source.snapshots()]

    def tree(self, tree_id: bytes) -> list[Node]:
        return self._route(tree_id).tree(tree_id)

    def chunk_sizes(self, chunk_ids: list[bytes]) -> list[int]:
        return self._route(chunk_ids[0]).chunk_sizes(chunk_ids) if chunk_ids else []

    def chunk(self, chunk_id: bytes) -> bytes:
        return self._route(chunk_id).chunk(chunk_id)

    def tree_if_cached(self, tree_id: bytes) -> list[Node] | None:
        return self._route(tree_id).tree_if_cached(tree_id)

    def chunk_if_cached(self, chunk_id: bytes, max_length: int) -> bytes | None:
        return self._route(chunk_id).chunk_if_cached(chunk_id, max_length)

    def advise(self, chunk_ids: list[bytes]) -> None:
        if chunk_ids:
            self._route(chunk_ids[0]).advise(chunk_ids)


state_dir = state_root  # where a detached mount logs


def serve(repo: Repository, mountpoint: Path, cache_bytes: int, on_ready: Callable[[], None], others: list[Repository] | None = None) -> None:
    """Mount and serve until unmounted or signalled. Blocks."""
    import pyfuse3
    import trio

    from stasisfs.mount.fuse import SnapshotFs
    from stasisfs.mount.vfs import Vfs

    repo.index  # noqa: B018 - open (and if needed rebuild) the index before serving
    # Requests wait on the GIL whenever a worker thread decodes a tree; a short switch
    # interval keeps that wait far below the default 5 ms, which would dominate latency.
    sys.setswitchinterval(0.0002)
    # Entries and tree nodes are long-lived and acyclic; frequent full collections over
    # hundreds of thousands of them would pause every request.
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    total = sum(size for size, _ in repo.index.packs().values())
    source: RepositorySource | MultiSource = RepositorySource(repo)
    if others:
        assert isinstance(source, RepositorySource)
        source = MultiSource(source, [RepositorySource(other) for other in others])
    vfs = Vfs(source, uid=os.getuid(), gid=os.getgid(), cache_bytes=cache_bytes, own_device=repo.device if others else None)
    from stasisfs.format.chunker import zero_run_lengths

    holes = {repo.master_keys.chunk_id_of(bytes(n)): n for n in zero_run_lengths(repo.master_keys.chunker_seed)}
    ops = SnapshotFs(vfs, total_bytes=total, hole_chunks=holes, storage=str(repo.path))
    try:
        pyfuse3.init(ops, str(mountpoint), set(MOUNT_OPTIONS))
    except RuntimeError as exc:
        raise StasisError(f"cannot mount on {mountpoint}: {exc}") from None
    ops.pusher = start_page_pusher(repo) if not others else None  # other devices: reads as usual

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ops.attach(nursery)

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop_on_signal)

            async def widen_once_initialised() -> None:
                await trio.sleep(0.5)  # the kernel sets readahead while it processes FUSE's INIT, which main() answers
                await trio.to_thread.run_sync(widen_readahead, mountpoint)

            nursery.start_soon(widen_once_initialised)
            on_ready()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        if ops.pusher is not None:
            logging.getLogger("stasisfs.mount.lifecycle").info("read-ahead helper: %s", ops.pusher.close())
        pyfuse3.close(unmount=True)


def start_page_pusher(repo: Repository) -> PagePusher | None:
    """The helper that pushes small files into the page cache for sequential readers (local packs only)."""
    fuse_fd = fuse_device_fd()
    if fuse_fd is None or repo.remote_packs is not None:
        return None
    try:
        return PagePusher(repo.path, repo.master_keys.master, fuse_fd)
    except OSError as exc:
        logging.getLogger("stasisfs.mount.lifecycle").warning("no read-ahead helper (%s); reads are served one by one", exc)
        return None


READAHEAD_KB = 1024


def widen_readahead(mountpoint: Path) -> None:
    """Let the kernel read ahead 1 MiB instead of FUSE's 128 KiB: fewer, larger reads for `cp` and `tar`.

    Only root may change it (through the mount's bdi in sysfs); for others it stays as it was.
    """
    # Never stat the mountpoint here: that would ask this very process, which is not serving yet.
    entry = mountinfo.mount_at(os.fsencode(mountpoint))
    if entry is not None:
        with contextlib.suppress(OSError):  # not root: readahead stays as it was
            Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb").write_text(f"{READAHEAD_KB}\n")


def mount_detached(repo: Repository, mountpoint: Path, cache_bytes: int, others: list[Repository] | None = None) -> None:
    """Fork a server for the mount; return once it answers, or raise with its reason."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(read_end)
        _become_daemon()
        status = os.fdopen(write_end, "w")

        def ready() -> None:
            status.write("ok\n")
            status.flush()

        code = 0
        try:
            serve(repo, mountpoint, cache_bytes, ready, others)
        except StasisError as exc:
            logging.getLogger("stasisfs.mount.lifecycle").error("%s", exc)
            with contextlib.suppress(OSError):
                status.write(f"error {exc}\n")
                status.flush()
            code = 1
        except BaseException as exc:
            logging.getLogger("stasisfs.mount.lifecycle").exception("mount failed")
            with contextlib.suppress(OSError):
                status.write(f"error {exc}\n")
                status.flush()
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as status:
        line = status.readline().strip()
    if not line.startswith("ok"):
        os.waitpid(pid, 0)
        reason = line[len("error ") :] if line.startswith("error ") else "the mount process exited without a word (see the log in ~/.local/state/stasisfs)"
        raise StasisError(reason)
    wait_until_serving(mountpoint, pid)


def wait_until_serving(mountpoint: Path, pid: int) -> None:
    """Readiness means content is visible, not just that the mount table says so."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.path.ismount(mountpoint) and "snapshots" in os.listdir(mountpoint):
                return
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            raise StasisError("the mount process exited before it was serving (see the log in ~/.local/state/stasisfs)")
        time.sleep(0.05)
    raise StasisError(f"{mountpoint} did not start serving within {READY_TIMEOUT:.0f}s")


def _become_daemon() -> None:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    log_path = state_dir() / "mount.log"
    handler = logging.FileHandler(log_path)
    os.chmod(log_path, 0o600)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    logging.getLogger("stasisfs").addHandler(handler)
    logging.getLogger("stasisfs").setLevel(logging.INFO)
    logging.getLogger("pyfuse3").addHandler(handler)
    faulthandler.register(signal.SIGUSR1, file=open(log_path, "a"), all_threads=True)  # noqa: SIM115 - stacks for a hung mount


def check_mountpoint(mountpoint: Path) -> str | None:
    """Refuse a mount point that cannot take a mount; clear a dead stasisfs mount there first. Returns what it cleared."""
    cleared = None
    if is_mounted(mountpoint) and mount_is_dead(mountpoint):
        problem = _run_unmount(shutil.which("fusermount3") or shutil.which("fusermount"), mountpoint, lazy=True)
        if problem is not None:
            raise StasisError(f"{mountpoint} holds a dead mount (its process ended) that cannot be cleared: {problem}; "
                              f"try `stasisfs umount {mountpoint}`")
        cleared = f"cleared a dead mount at {mountpoint} (its process had ended)"
    if not mountpoint.is_dir():
        raise StasisError(f"{mountpoint} is not a directory; create it first")
    if os.path.ismount(mountpoint):
        raise StasisError(f"{mountpoint} is already a mount point; `stasisfs umount {mountpoint}` first")
    if any(os.scandir(mountpoint)):
        raise StasisError(f"{mountpoint} is not empty; mount on an empty directory")
    return cleared


def umount(mountpoint: Path, lazy: bool = False) -> str:
    """Unmount, and say what was done. A busy mount stays (StasisError naming who uses it) unless `lazy`;
    a dead one (its process killed) is cleared."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if not is_mounted(mountpoint):
        raise StasisError(f"{mountpoint} is not mounted")
    if mount_is_dead(mountpoint):
        _run_unmount(fusermount, mountpoint, lazy=True)
        return "cleared a dead mount (its process had ended)"
    done = _run_unmount(fusermount, mountpoint, lazy=False)
    if done is None:
        return "unmounted"
    users = processes_using(mountpoint)
    if lazy:
        if _run_unmount(fusermount, mountpoint, lazy=True) is None:
            return f"detached; it goes once {_who(users)} let go" if users else "detached"
        raise StasisError(f"cannot unmount {mountpoint}: {done}")
    if users or "busy" in done.lower():
        raise StasisError(f"{mountpoint} is busy: {_who(users) if users else 'something'} use{'s' if len(users) == 1 else ''} it; "
                          "it keeps serving. Close them, or detach it anyway with `stasisfs umount --lazy`")
    raise StasisError(f"cannot unmount {mountpoint}: {done}")


def _run_unmount(fusermount: str | None, mountpoint: Path, lazy: bool) -> str | None:
    """None on success, else the tool's complaint."""
    command = [fusermount, "-u", *(["-z"] if lazy else []), str(mountpoint)] if fusermount else ["umount", *(["-l"] if lazy else []), str(mountpoint)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else (done.stderr.strip() or f"{command[0]} exited with {done.returncode}")


def _who(users: list[tuple[int, str]]) -> str:
    names = ", ".join(f"{name} ({pid})" for pid, name in users[:5]) + (", ..." if len(users) > 5 else "")
    return f"{len(users)} process{'es' if len(users) != 1 else ''}: {names}"


def processes_using(mountpoint: Path) -> list[tuple[int, str]]:
    """(pid, command name) of processes whose working directory, root or an open file is under the mount point."""
    inside = os.fsencode(os.path.abspath(mountpoint))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        links = [f"{entry.path}/cwd", f"{entry.path}/root"]
        with contextlib.suppress(OSError):
            links += [f"{entry.path}/fd/{fd}" for fd in os.listdir(f"{entry.path}/fd")]
        for link in links:
            try:
                target = os.readlink(os.fsencode(link))
            except OSError:
                continue
            if target == inside or target.startswith(inside + b"/"):
                try:
                    name = Path(f"{entry.path}/comm").read_text().strip()
                except OSError:
                    name = "?"
                found.append((int(entry.name), name))
                break
    return found


def mount_is_dead(mountpoint: Path) -> bool:
    try:
        os.statvfs(mountpoint)  # stat of the root may come from the kernel's cache; statfs always asks the server
    except OSError as exc:
        return exc.errno == errno.ENOTCONN  # "Transport endpoint is not connected": the server is gone
    return False


def is_mounted(mountpoint: Path) -> bool:
    return mountinfo.mount_at(os.fsencode(os.path.abspath(mountpoint))) is not None


def log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stasisfs: %(levelname)s %(message)s"))
    logging.getLogger("stasisfs").addHandler(handler)
    logging.getLogger("stasisfs").setLevel(logging.INFO)
