"""Maintenance commands: forget (retention policies) and prune (reclaim space)."""

from __future__ import annotations

import click

from stasisfs import jobs
from stasisfs.cli.common import (
    counted,
    filter_options,
    fs,
    global_options,
    human_size,
    info,
    open_repository,
    print_json,
    read_maintenance_token,
    snapshot_filter,
    sync_after_change,
    write_line,
)
from stasisfs.errors import EXIT_INCOMPLETE, UsageError
from stasisfs.format.retention import Duration, Policy
from stasisfs.ops.prune import PrunePlan, forget_snapshots
from stasisfs.repo.locking import RepositoryLock
from stasisfs.repo.repository import Repository


def _prune(repo: Repository, dry_run: bool, max_unused: float, json_output: bool) -> dict[str, object]:
    say = jobs.quiet if json_output else info

    def announce(prune_plan: PrunePlan) -> None:
        if not json_output:
            info(f"{len(prune_plan.packs)} packs: {human_size(prune_plan.used_bytes)} used, {human_size(prune_plan.unused_bytes)} unused, "
                 f"{human_size(prune_plan.padding_bytes)} padding")
            if prune_plan.consolidate:
                info(f"{'would merge' if dry_run else 'merging'} {len(prune_plan.consolidate)} small packs into full ones")
            info(f"{'would delete' if dry_run else 'deleting'} {len(prune_plan.delete)} unused packs and "
                 f"{'would repack' if dry_run else 'repacking'} {len(prune_plan.repack)}; "
                 f"about {human_size(prune_plan.reclaimed_bytes)} {'could be' if dry_run else 'will be'} freed")

    outcome = jobs.prune(repo, max_unused, dry_run, say, before_execute=announce)
    prune_plan = outcome.plan
    summary: dict[str, object] = {
        "packs": len(prune_plan.packs), "packs_deleted": len(prune_plan.delete), "packs_repacked": len(prune_plan.repack),
        "used_bytes": prune_plan.used_bytes, "unused_bytes": prune_plan.unused_bytes, "reclaimable_bytes": prune_plan.reclaimed_bytes,
        "padding_bytes": prune_plan.padding_bytes, "packs_consolidated": len(prune_plan.consolidate),
        "dry_run": dry_run,
    }
    if outcome.report is not None:
        summary.update(bytes_freed=outcome.report.bytes_freed, packs_written=outcome.report.packs_written)
        if not json_output:
            info(f"prune done: {human_size(outcome.report.bytes_freed)} freed, {outcome.report.packs_written} new packs")
    return summary


@click.command()
@click.argument("snapshot_refs", nargs=-1, metavar="[SNAPSHOT]...")
@click.option("--keep-last", type=int, default=0, metavar="N", help="Keep the N newest snapshots.")
@click.option("--keep-hourly", type=int, default=0, metavar="N", help="Keep the newest snapshot of each of the last N hours with one (-1: all).")
@click.option("--keep-daily", type=int, default=0, metavar="N", help="... of each of the last N days.")
@click.option("--keep-weekly", type=int, default=0, metavar="N", help="... of each of the last N ISO weeks.")
@click.option("--keep-monthly", type=int, default=0, metavar="N", help="... of each of the last N months.")
@click.option("--keep-yearly", type=int, default=0, metavar="N", help="... of each of the last N years.")
@click.option("--keep-within", metavar="DURATION", help="Keep everything newer than this before the newest snapshot, e.g. 1y6m, 14d, 36h.")
@click.option("--keep-tag", "keep_tags", multiple=True, metavar="T", help="Keep snapshots with this tag (repeatable).")
@click.option("--dry-run", "-n", is_flag=True, help="Only print what would be kept and removed, and why.")
@click.option("--prune", "then_prune", is_flag=True, help="Prune afterwards, freeing the space of what was removed.")
@click.option("--max-unused", default=5.0, show_default=True, metavar="PCT", help="With --prune: unused space left in partly used packs.")
@click.option("--no-sync", is_flag=True, help="Do not apply the removals to the remotes now (the next sync does).")
@click.option("--maintenance-token-file", type=click.Path(exists=True, dir_okay=False), metavar="F",
              help="A token from `stasisfs-server user maintenance-token`: lets the removals through on an append-only remote.")
@click.option("--json", "json_output", is_flag=True, help="Print JSON.")
@filter_options
@global_options
def forget(snapshot_refs: tuple[str, ...], keep_last: int, keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
           keep_yearly: int, keep_within: str | None, keep_tags: tuple[str, ...], dry_run: bool, then_prune: bool, max_unused: float,
           no_sync: bool, maintenance_token_file: str | None, json_output: bool) -> None:
    """Remove snapshots by a retention policy (restic's rules), or name them.

    \b
    Snapshots are grouped by their paths; in each group the newest snapshot of
    each hour/day/ISO week/month/year bucket (local time, TZ) is kept, up to the
    counts given. --keep-within counts back from the group's newest snapshot,
    so a burst of junk snapshots cannot push good ones out (see docs/security.md).
    Data is freed only by prune (or --prune).
      stasisfs forget --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-within 3d --prune
    """
    try:
        within = Duration.parse(keep_within) if keep_within else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, within, list(keep_tags))
    if policy.empty() and not snapshot_refs:
        raise UsageError("no policy and no snapshots given: nothing would be removed (see --help)")
    if snapshot_refs and not policy.empty():
        raise UsageError("give either snapshots to remove or a policy, not both")
    with open_repository() as repo, RepositoryLock(repo, "forget"):
        forget_plan = jobs.plan_forget(repo, snapshot_filter(), list(snapshot_refs), policy)
        groups, removed = forget_plan.groups, forget_plan.removed
        if json_output:
            print_json([{"paths": [fs(p) for p in key],
                         "keep": [{"id": s.id.hex(), "time": s.time.isoformat(), "reasons": r} for s, k, r in members if k],
                         "remove": [{"id": s.id.hex(), "time": s.time.isoformat()} for s, k, _ in members if not k]}
                        for key, members in groups.items()])
        else:
            for key, members in groups.items():
                if key:
                    write_line(b"snapshots of ", b", ".join(key), b":")
                for s, keep, reasons in sorted(members, key=lambda m: m[0].time, reverse=True):
                    when = s.time.astimezone().strftime("%Y-%m-%d %H:%M:%S")
                    write_line(f"  {'keep  ' if keep else 'remove'} {s.short_id}  {when}  {', '.join(reasons) if keep else ''}".rstrip())
            info(f"{'would remove' if dry_run else 'removing'} {len(removed)} of {counted(forget_plan.considered, 'snapshot')}")
        if dry_run:
            return
        forget_snapshots(repo, [s.id for s in removed])
        if then_prune:
            _prune(repo, False, max_unused, json_output)
        failures = {} if no_sync else sync_after_change(repo, json_output, read_maintenance_token(maintenance_token_file))
    if failures:
        raise SystemExit(EXIT_INCOMPLETE)


@click.command()
@click.option("--dry-run", "-n", is_flag=True, help="Only print what would be deleted and repacked.")
@click.option("--max-unused", default=5.0, show_default=True, metavar="PCT",
              help="Leave up to this much unused space (as a share of used space) in partly used packs instead of repacking them.")
@click.option("--no-sync", is_flag=True, help="Do not apply the deletions to the remotes now (the next sync does).")
@click.option("--maintenance-token-file", type=click.Path(exists=True, dir_okay=False), metavar="F",
              help="A token from `stasisfs-server user maintenance-token`: lets the deletions through on an append-only remote.")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON summary.")
@global_options
def prune(dry_run: bool, max_unused: float, no_sync: bool, maintenance_token_file: str | None, json_output: bool) -> None:
    """Free the space of data no snapshot uses any more.

    Deletes packs nothing uses and repacks partly used ones. It holds the
    repository lock (a backup waits or exits 11) and is safe to kill at any
    moment. Remotes delete the same objects at their next sync. An
    append-only remote refuses: prune then cleans locally and says what the
    remote needs, a maintenance token from its operator, used on a trusted host.
    """
    if not 0 <= max_unused <= 100:
        raise UsageError("--max-unused is a percentage between 0 and 100")
    with open_repository() as repo, RepositoryLock(repo, "prune"):
        summary = _prune(repo, dry_run, max_unused, json_output)
        failures = {} if dry_run or no_sync else sync_after_change(repo, json_output, read_maintenance_token(maintenance_token_file))
    if json_output:
        print_json({**summary, "sync_failed": failures})
    if failures:
        raise SystemExit(EXIT_INCOMPLETE)
