"""Sync: push to a remote exactly the objects it lacks, in durable order; pull back what the local copy lacks.

Order matters as it does locally: packs, then the index objects that name
them, then snapshots, so a remote interrupted at any point never holds a
snapshot whose data is missing. Every object is content-addressed, so an
interrupted sync resumes by asking again what is missing.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stasisfs.errors import IntegrityError, StasisError
from stasisfs.progress import Counters
from stasisfs.remote.client import DeviceRetired, PerThread, RemoteClient, RemoteError
from stasisfs.remote.devices import DeviceRemotes, Remote
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import write_atomic

UPLOAD_THREADS = 4
OBJECT_KINDS = ("data", "index", "snapshots")


@dataclass
class SyncReport:
    remote: str
    uploaded: int = 0
    uploaded_bytes: int = 0
    already_there: int = 0
    deleted: int = 0
    warnings: list[str] = field(default_factory=list)


class RateLimit:
    """A token bucket shared by the upload threads (`--limit-upload`)."""

    def __init__(self, kib_per_s: int | None) -> None:
        self.rate = kib_per_s * 1024 if kib_per_s else None
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, nbytes: int) -> None:
        if self.rate is None:
            return
        with self._lock:
            start = max(self._next, time.monotonic())
            self._next = start + nbytes / self.rate
        time.sleep(max(0.0, start - time.monotonic()))


def config_object(repo: Repository) -> tuple[str, bytes]:
    data = (repo.path / "config").read_bytes()
    return hashlib.sha256(data).hexdigest(), data


def local_objects(repo: Repository, kind: str) -> list[str]:
    if kind == "data":
        return [p.hex() for p in repo.list_packs()]
    return repo.list_objects(kind)


def object_path(repo: Repository, kind: str, object_id: str) -> Path:
    return repo.pack_path(bytes.fromhex(object_id)) if kind == "data" else repo.path / kind / object_id


class Syncer:
    def __init__(self, repo: Repository, remotes: DeviceRemotes, counters: Counters | None = None,
                 limit_kib: int | None = None, say: Callable[[str], None] = lambda s: None,
                 maintenance_token: str | None = None) -> None:
        self.repo = repo
        self.maintenance_token = maintenance_token  # lets deletes through on an append-only account
        self.remotes = remotes
        self.counters = counters or Counters()
        self.limit = RateLimit(limit_kib)
        self.say = say

    def push(self, remote: Remote) -> SyncReport:
        report = SyncReport(remote.name)
        client: RemoteClient = remote.client()
        state = self.remotes.state(remote.name)
        config_id, config = config_object(self.repo)
        if client.missing(remote.device, "config", [config_id]):
            client.put_object(remote.device, "config", config_id, config)
        confirmed: dict[str, list[str]] = {}
        # Listed newest-kind first: a snapshot listed here already has its index object and packs on
        # disk (the local write order), so a backup running meanwhile can never make the remote
        # receive a snapshot without its data. No lock and no key are needed to sync.
        listed = {kind: local_objects(self.repo, kind) for kind in reversed(OBJECT_KINDS)}
        for kind in OBJECT_KINDS:
            ids = listed[kind]
            lacking = client.missing(remote.device, kind, ids)
            previously = set(state.get(kind, []))
            rolled_back = sorted(lacking & previously)
            if rolled_back:
                report.warnings.append(f"remote {remote.name} no longer has {len(rolled_back)} {kind} object(s) it held before "
                                       f"(e.g. {rolled_back[0][:16]}): it may have been rolled back or lost data; re-uploading them")
            self._upload(remote, kind, sorted(lacking), report)
            report.already_there += len(ids) - len(lacking)
            if kind != "data":
                confirmed[kind] = ids
        self._check_account(remote, client, state, report)
        self._apply_tombstones(remote, client, state, report)
        state.update(confirmed)
        state["last_sync"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.remotes.set_state(remote.name, state)
        return report

    def _upload(self, remote: Remote, kind: str, ids: list[str], report: SyncReport) -> None:
        if not ids:
            return
        sizes = {i: object_path(self.repo, kind, i).stat().st_size for i in ids}
        with self.counters.lock:
            self.counters.total_files += len(ids)
            self.counters.total_bytes += sum(sizes.values())
            self.counters.total_known = True
        clients = PerThread(remote.client)

        def one(object_id: str) -> None:
            client = clients()
            data = object_path(self.repo, kind, object_id).read_bytes()
            self.limit.take(len(data))
            try:
                stored = client.put_object(remote.device, kind, object_id, data)
            except RemoteError as exc:
                if exc.code == "hash_mismatch":
                    raise IntegrityError(f"local {kind} object {object_id[:16]} is damaged; run `stasisfs check`") from None
                raise
            self.counters.add(1, len(data))
            with self.counters.lock:
                if stored:
                    report.uploaded += 1
                    report.uploaded_bytes += len(data)
                else:
                    report.already_there += 1

        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix=f"sync-{kind}") as pool:
            for future in [pool.submit(one, i) for i in ids]:
                future.result()  # the first failure stops the sync; what arrived stays and is not sent again

    def _apply_tombstones(self, remote: Remote, client: RemoteClient, state: dict[str, Any], report: SyncReport) -> None:
        """Deletions forget and prune made here, applied after everything new has arrived.

        The remote's snapshot list decides what is live: packs and index objects are deleted only while
        every snapshot the remote holds is one this copy knows, because local prune kept exactly what
        those need. A snapshot only the remote has (another copy wrote it) holds pack and index deletions back.
        """
        pending: dict[str, list[str]] = state.get("delete", {})
        if self.maintenance_token and any(pending.values()):
            client = RemoteClient(remote.url, self.maintenance_token, remote.cacert, name=remote.name)
        self._delete(remote, client, "snapshots", pending, report)  # the reverse of the write order
        if pending.get("index") or pending.get("data"):
            unknown = sorted({i for i, _ in client.list_objects(remote.device, "snapshots")} - set(self.repo.list_objects("snapshots")))
            if unknown:
                report.warnings.append(f"remote {remote.name} holds {len(unknown)} snapshot(s) this copy does not (e.g. {unknown[0][:16]}); "
                                       f"{len(pending.get('index', [])) + len(pending.get('data', []))} pack and index deletion(s) wait "
                                       "so that nothing they use is lost")
            else:
                for kind in ("index", "data"):
                    self._delete(remote, client, kind, pending, report)
        state["delete"] = {k: v for k, v in pending.items() if v}

    @staticmethod
    def _delete(remote: Remote, client: RemoteClient, kind: str, pending: dict[str, list[str]], report: SyncReport) -> None:
        left = []
        for object_id in pending.get(kind, []):
            try:
                if client.delete_object(remote.device, kind, object_id):
                    report.deleted += 1
            except RemoteError as exc:
                if exc.code != "append_only":
                    raise
                left.append(object_id)
        if left:
            report.warnings.append(f"remote {remote.name} is append-only: {len(left)} {kind} object(s) this device deleted stay there "
                                   "until its operator runs maintenance with a maintenance token")
        pending[kind] = left

    def _check_account(self, remote: Remote, client: RemoteClient, state: dict[str, Any], report: SyncReport) -> None:
        """Tell the user when the account password changed elsewhere, so the local slots can follow."""
        account = client.account()
        if int(account.get("scheme", 2)) == 1:
            report.warnings.append(f"the account on remote {remote.name} still uses key scheme 1; upgrade it with "
                                   f"`stasisfs key passwd --from-remote {remote.name}` (it asks for the password)")
        elif int(account.get("password_version", 0)) > int(state.get("password_version", 0)):
            report.warnings.append(f"the password of {remote.user} on remote {remote.name} was changed on {account.get('password_changed')} "
                                   "(on another device); this device's key slots still use the old one. Take the new password with "
                                   f"`stasisfs key passwd --from-remote {remote.name}`")

    def pull(self, remote: Remote) -> int:
        """Fetch every object the local copy lacks (completes a thin repository). Returns how many."""
        client: RemoteClient = remote.client()
        fetched = 0
        for kind in OBJECT_KINDS:
            have = set(local_objects(self.repo, kind))
            wanted = [(i, size) for i, size in client.list_objects(remote.device, kind) if i not in have]
            with self.counters.lock:
                self.counters.total_files += len(wanted)
                self.counters.total_bytes += sum(size for _, size in wanted)
                self.counters.total_known = True
            clients = PerThread(remote.client)
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix=f"pull-{kind}") as pool:
                for future in [pool.submit(self._fetch_one, remote, clients, kind, i) for i, _ in wanted]:
                    future.result()
            fetched += len(wanted)
        return fetched

    def _fetch_one(self, remote: Remote, clients: PerThread, kind: str, object_id: str) -> None:
        data = clients().get_object(remote.device, kind, object_id)  # verified against its id
        write_atomic(object_path(self.repo, kind, object_id), data)
        self.counters.add(1, len(data))


def sync_all(repo: Repository, remotes: DeviceRemotes, names: list[str] | tuple[str, ...], counters: Counters | None = None,
             limit_kib: int | None = None, maintenance_token: str | None = None) -> tuple[list[SyncReport], dict[str, str]]:
    """Push to each remote; one failing remote does not stop the others. Returns reports and {remote: reason}."""
    syncer = Syncer(repo, remotes, counters, limit_kib, maintenance_token=maintenance_token)
    reports, failures = [], {}
    for remote in remotes.select(names):
        try:
            reports.append(syncer.push(remote))
        except DeviceRetired:
            raise  # never a quiet partial success: this copy may no longer write anywhere as that device
        except StasisError as exc:
            failures[remote.name] = str(exc)
    return reports, failures
