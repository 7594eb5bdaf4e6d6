"""The use cases, one function each: what a command does, with no argument parsing and no printing.

The CLI parses, calls one of these and prints what it returns; the scheduler and any other
front end call the same functions, so a workflow (the steps before a backup, forget then prune,
sync after a change) exists once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stasisfs.errors import UsageError
from stasisfs.format import keyslots
from stasisfs.format.retention import Policy, plan
from stasisfs.format.snapshot import Snapshot, SnapshotFilter, resolve
from stasisfs.ops.prune import PrunePlan, PruneReport, execute, forget_snapshots, plan_prune
from stasisfs.remote.client import DeviceRetired
from stasisfs.remote.devices import DeviceRemotes
from stasisfs.remote.sync import SyncReport, sync_all
from stasisfs.repo.packer import salvage_open_packs
from stasisfs.repo.repository import Repository
from stasisfs.repo.storage import write_atomic
from stasisfs.repo.trees import Change, TreeReader, diff_trees

Say = Callable[[str], None]


def quiet(_: str) -> None:
    """The `say` of a command run with --json or --quiet: progress lines go nowhere."""


def prepare_backup(repo: Repository) -> None:
    """Before a backup writes: reuse what a killed run packed, even in its open packs; sweep its temp files; index its orphan packs."""
    salvage_open_packs(repo)
    repo.sweep()
    repo.index_orphan_packs()


@dataclass
class PruneOutcome:
    plan: PrunePlan
    report: PruneReport | None  # None for a dry run


def prune(repo: Repository, max_unused_percent: float, dry_run: bool = False, say: Say = quiet,
          before_execute: Callable[[PrunePlan], None] | None = None) -> PruneOutcome:
    """Plan, and unless `dry_run` carry out, freeing the space no snapshot uses."""
    prune_plan = plan_prune(repo, max_unused_percent, say)
    if before_execute is not None:
        before_execute(prune_plan)
    return PruneOutcome(prune_plan, None if dry_run else execute(repo, prune_plan, say))


@dataclass
class ForgetPlan:
    """Per group of snapshots (by paths; one unnamed group for named snapshots): (snapshot, keep, reasons)."""

    groups: dict[tuple[bytes, ...], list[tuple[Snapshot, bool, list[str]]]]
    considered: int

    @property
    def removed(self) -> list[Snapshot]:
        return [s for members in self.groups.values() for s, keep, _ in members if not keep]


def plan_forget(repo: Repository, only: SnapshotFilter, refs: list[str], policy: Policy | None) -> ForgetPlan:
    """Which snapshots a policy (or a list of names) removes, and why each kept one stays."""
    snapshots = [s for s in repo.snapshots() if only.admits(s)]
    if refs:
        try:
            doomed = [resolve(snapshots, ref) for ref in refs]
        except LookupError as exc:
            raise UsageError(str(exc)) from None
        return ForgetPlan({(): [(s, False, ["named"]) for s in doomed]}, len(snapshots))
    assert policy is not None
    return ForgetPlan({key: [(d.snapshot, d.keep, d.reasons) for d in decisions] for key, decisions in plan(snapshots, policy).items()},
                      len(snapshots))


def apply_retention(repo: Repository, policy: Policy, then_prune: bool, max_unused_percent: float, say: Say = quiet) -> int:
    """A profile's retention after its backup: forget what the policy drops, prune if asked. Returns how many snapshots went."""
    removed = plan_forget(repo, SnapshotFilter(), [], policy).removed
    if removed:
        forget_snapshots(repo, [s.id for s in removed])
        if then_prune:
            prune(repo, max_unused_percent, say=say)
    return len(removed)


@dataclass
class SyncOutcome:
    reports: list[SyncReport] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # remote name -> why; the command exits 3


def sync_after_change(repo: Repository, names: list[str] | None = None, maintenance_token: str | None = None) -> SyncOutcome:
    """Sync to every remote, or to `names`, after backup, forget or prune."""
    remotes = DeviceRemotes(repo.id)
    if not remotes.all():
        return SyncOutcome()
    try:
        reports, failures = sync_all(repo, remotes, names or [], maintenance_token=maintenance_token)
    except DeviceRetired as exc:
        raise DeviceRetired(f"{exc}. What this command wrote is in the local repository only", exc.code, exc.status) from None
    return SyncOutcome(reports, failures)


def diff_snapshots(repo: Repository, first: Snapshot, second: Snapshot) -> list[Change]:
    """What changed from `first` to `second`, in path order; identical subtrees are skipped unread."""
    changes: list[Change] = []
    diff_trees(TreeReader(repo), first.root, second.root, b"/", changes)
    return changes


def add_machine_key(repo: Repository, key_file: Path, label: str) -> keyslots.KeySlot:
    """A random machine key slot, its key written to `key_file` (0600): what cron uses instead of the password."""
    if key_file.exists():
        raise UsageError(f"{key_file} already exists; choose a new file name")
    secret = os.urandom(32)
    slot = keyslots.wrap(repo.master_keys.master, repo.id, secret, keyslots.SLOT_MACHINE, {"name": "none"}, label)
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(key_file, keyslots.format_machine_key(repo.id, slot.id, secret).encode(), mode=0o600)
    repo.add_slot(slot)
    return slot
