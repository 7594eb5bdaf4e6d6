"""Retention policies, with restic's bucket semantics exactly. Pure: no I/O, no clock.

Snapshots of a group are walked newest first. A snapshot is kept when it is
one of the newest `last` snapshots, or the newest in an hourly, daily, weekly
(ISO week), monthly or yearly bucket that still has room, or within
`within` of the group's newest snapshot, or has a kept tag. Buckets use local
time. A count of -1 means unlimited, as restic's `unlimited`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from stasisfs.format.snapshot import Snapshot


@dataclass(frozen=True)
class Duration:
    """restic's `--keep-within` duration: years, months, days, hours (`1y5m7d2h`)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        parts = re.fullmatch(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)d)?(?:(\d+)h)?", text.strip())
        if not text.strip() or parts is None:
            raise ValueError(f"invalid duration {text!r}: use a combination of NyNmNdNh, like 1y6m or 7d")
        return cls(*(int(p or 0) for p in parts.groups()))

    def before(self, moment: datetime) -> datetime:
        """`moment` minus this duration, normalising like Go's AddDate (Mar 31 - 1 month = Mar 3)."""
        month_index = moment.year * 12 + (moment.month - 1) - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        first = moment.replace(year=year, month=month + 1, day=1)
        return first + timedelta(days=moment.day - 1 - self.days, hours=-self.hours)

    def __str__(self) -> str:
        text = "".join(f"{n}{unit}" for n, unit in ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")) if n)
        return text or "0h"


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    tags: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly or self.yearly or self.within or self.tags)


def _iso_week(t: datetime) -> Hashable:
    year, week, _ = t.isocalendar()
    return (year, week)


BUCKETS: list[tuple[str, str, Callable[[datetime], Hashable]]] = [
    ("hourly", "hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", "daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", "weekly", _iso_week),
    ("monthly", "monthly", lambda t: (t.year, t.month)),
    ("yearly", "yearly", lambda t: t.year),
]


@dataclass
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: list[str]


def apply_policy(snapshots: Iterable[Snapshot], policy: Policy, local: Callable[[datetime], datetime] = lambda t: t.astimezone()) -> list[Decision]:
    """Keep or remove each snapshot of one group, newest first, with the reasons restic would give."""
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id), reverse=True)
    if not ordered:
        return []
    counts = {"last": policy.last, **{name: getattr(policy, attr) for name, attr, _ in BUCKETS}}
    last_seen: dict[str, Hashable] = {}
    kept_per_rule: dict[str, int] = {}
    newest = ordered[0].time
    within_since = policy.within.before(newest) if policy.within is not None else None
    decisions = []
    for position, snap in enumerate(ordered):
        reasons = []
        matched = [t for t in policy.tags if t in snap.tags]
        if matched:
            reasons.append(f"tag {','.join(matched)}")
        if within_since is not None and snap.time > within_since:
            reasons.append(f"within {policy.within}")
        moment = local(snap.time)
        rules: list[tuple[str, Hashable]] = [("last", position)] + [(name, bucket(moment)) for name, _, bucket in BUCKETS]
        for name, value in rules:
            if counts[name] != 0 and last_seen.get(name, object()) != value:
                last_seen[name] = value
                if counts[name] > 0:
                    counts[name] -= 1
                kept_per_rule[name] = kept_per_rule.get(name, 0) + 1
                reasons.append(f"{name} {kept_per_rule[name]}")
        decisions.append(Decision(snap, bool(reasons), reasons))
    return decisions


def group_key(snapshot: Snapshot) -> tuple[bytes, ...]:
    """Snapshots are grouped by their paths, as restic groups by host and paths (a repository is one device)."""
    return tuple(sorted(snapshot.paths))


def plan(snapshots: Iterable[Snapshot], policy: Policy, local: Callable[[datetime], datetime] = lambda t: t.astimezone()
         ) -> dict[tuple[bytes, ...], list[Decision]]:
    groups: dict[tuple[bytes, ...], list[Snapshot]] = {}
    for snap in snapshots:
        groups.setdefault(group_key(snap), []).append(snap)
    return {key: apply_policy(members, policy, local) for key, members in sorted(groups.items())}
