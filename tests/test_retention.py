"""The retention policy engine: table-driven, and against restic itself as the oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from stasisfs.format.retention import Duration, Policy, apply_policy, plan
from stasisfs.format.snapshot import Snapshot

NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")


def snap(when: str, tags: list[str] | None = None, paths: list[bytes] | None = None) -> Snapshot:
    moment = datetime.fromisoformat(when)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return Snapshot(time=moment, device="d", paths=paths or [b"/home"], root=b"\0" * 32, tags=tags or [], id=os.urandom(32))


def kept(times: list[str], policy: Policy, zone: ZoneInfo = UTC_ZONE) -> list[str]:
    snaps = [snap(t) for t in times]
    decisions = apply_policy(snaps, policy, local=lambda t: t.astimezone(zone))
    return sorted(d.snapshot.time.astimezone(UTC).isoformat(timespec="minutes")[:16] for d in decisions if d.keep)


def utc(text: str) -> str:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).isoformat(timespec="minutes")[:16]


CASES = [
    ("last 3 of 5", ["2026-01-01T10:00", "2026-01-02T10:00", "2026-01-03T10:00", "2026-01-04T10:00", "2026-01-05T10:00"],
     Policy(last=3), ["2026-01-03T10:00", "2026-01-04T10:00", "2026-01-05T10:00"]),
    ("daily keeps the newest of each day", ["2026-01-01T08:00", "2026-01-01T20:00", "2026-01-02T09:00", "2026-01-02T23:59", "2026-01-03T00:00"],
     Policy(daily=2), ["2026-01-02T23:59", "2026-01-03T00:00"]),
    ("ISO weeks across the year boundary", ["2024-12-28T12:00", "2024-12-30T12:00", "2025-01-03T12:00", "2025-01-06T12:00"],
     Policy(weekly=3), ["2024-12-28T12:00", "2025-01-03T12:00", "2025-01-06T12:00"]),
    ("monthly and yearly together", ["2024-11-15T00:00", "2024-12-31T23:00", "2025-01-01T00:30", "2025-02-10T00:00"],
     Policy(monthly=2, yearly=2), ["2024-12-31T23:00", "2025-01-01T00:30", "2025-02-10T00:00"]),
    ("unlimited daily", ["2026-01-01T01:00", "2026-01-01T02:00", "2026-01-02T01:00", "2026-01-03T01:00"],
     Policy(daily=-1), ["2026-01-01T02:00", "2026-01-02T01:00", "2026-01-03T01:00"]),
    ("within is relative to the newest snapshot, exclusive", ["2026-03-01T12:00", "2026-03-02T12:00", "2026-03-03T11:00", "2026-03-04T12:00"],
     Policy(within=Duration(days=2)), ["2026-03-03T11:00", "2026-03-04T12:00"]),
    ("within a month normalises like Go", ["2026-03-02T12:00", "2026-03-03T12:01", "2026-03-31T12:00"],
     Policy(within=Duration(months=1)), ["2026-03-03T12:01", "2026-03-31T12:00"]),
]


@pytest.mark.parametrize("title,times,policy,expected", CASES, ids=[c[0] for c in CASES])
def test_policy_table(title: str, times: list[str], policy: Policy, expected: list[str]) -> None:
    assert kept(times, policy) == [utc(t) for t in expected]


def test_dst_fall_back_shares_a_local_hour() -> None:
    # 2026-11-01 01:30 happens twice in New York: 05:30 UTC (EDT) and 06:30 UTC (EST)
    times = ["2026-11-01T05:30", "2026-11-01T06:30", "2026-11-01T07:30"]
    assert kept(times, Policy(hourly=10), NEW_YORK) == [utc("2026-11-01T06:30"), utc("2026-11-01T07:30")]
    assert kept(times, Policy(hourly=10)) == [utc(t) for t in times]  # in UTC they are three hours


def test_dst_spring_forward_day_is_one_day() -> None:
    times = ["2026-03-08T06:30", "2026-03-08T07:30", "2026-03-09T03:00"]  # 01:30 EST, 03:30 EDT, then 23:00 EDT on the 8th
    assert kept(times, Policy(daily=5), NEW_YORK) == [utc("2026-03-09T03:00")]


def test_reasons_and_tags() -> None:
    snaps = [snap("2026-01-01T10:00", ["keep"]), snap("2026-01-02T10:00"), snap("2026-01-03T10:00")]
    decisions = {d.snapshot.time.day: d for d in apply_policy(snaps, Policy(last=1, daily=2, tags=["keep"]))}
    assert decisions[3].reasons == ["last 1", "daily 1"]
    assert decisions[2].reasons == ["daily 2"]
    assert decisions[1].keep and decisions[1].reasons == ["tag keep"]


def test_groups_by_paths() -> None:
    a = [snap("2026-01-01T10:00", paths=[b"/a"]), snap("2026-01-02T10:00", paths=[b"/a"])]
    b = [snap("2026-01-01T11:00", paths=[b"/b"])]
    groups = plan(a + b, Policy(last=1))
    assert {k: [d.keep for d in v] for k, v in groups.items()} == {(b"/a",): [True, False], (b"/b",): [True]}


def test_duration_parsing() -> None:
    assert Duration.parse("1y5m7d2h") == Duration(1, 5, 7, 2)
    assert Duration.parse("36h") == Duration(hours=36)
    for bad in ("", "5", "1w", "d3"):
        with pytest.raises(ValueError):
            Duration.parse(bad)


# --- restic as the oracle -------------------------------------------------------------------------

def restic_timeline(end: datetime) -> list[datetime]:
    """Irregular snapshots ending at `end`: several a day near it, sparser further back, across DST and new years.

    All in the past: restic treats snapshots from the future specially.
    """
    times: list[datetime] = []
    t, step = end, timedelta(hours=5)
    while len(times) < 70:
        times.append(t)
        t -= step
        step = min(step * 1.25, timedelta(days=30))
    return sorted(times)


ORACLE_ZONE = ZoneInfo("America/New_York")


@pytest.fixture(scope="module")
def restic_history(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], list[datetime]]:
    """One restic repository with ~70 snapshots at constructed times, shared by the oracle tests."""
    restic = shutil.which("restic")
    assert restic, "restic is installed by scripts/setup: it is the oracle for retention"
    tmp = tmp_path_factory.mktemp("restic")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RESTIC_PASSWORD": "oracle", "RESTIC_REPOSITORY": str(tmp / "r"),
           "TZ": "America/New_York", "RESTIC_CACHE_DIR": str(tmp / "cache"), "HOME": str(tmp)}
    subprocess.run([restic, "init"], env=env, check=True, capture_output=True)
    data = tmp / "data"
    data.mkdir()
    (data / "f").write_text("x")
    times = restic_timeline(datetime(2025, 11, 3, 1, 30, tzinfo=ORACLE_ZONE))
    for moment in times:
        local = moment.astimezone(ORACLE_ZONE).strftime("%Y-%m-%d %H:%M:%S")
        subprocess.run([restic, "backup", "-q", "--host", "h", "--time", local, str(data)], env=env, check=True, capture_output=True)
    return env, times


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags,policy", [
    (["--keep-last", "3", "--keep-daily", "4", "--keep-weekly", "3", "--keep-monthly", "6", "--keep-yearly", "2"],
     Policy(last=3, daily=4, weekly=3, monthly=6, yearly=2)),
    (["--keep-hourly", "5", "--keep-within", "2m10d"], Policy(hourly=5, within=Duration(months=2, days=10))),
    (["--keep-weekly", "10", "--keep-hourly", "3"], Policy(weekly=10, hourly=3)),
])
def test_matches_restic(restic_history: tuple[dict[str, str], list[datetime]], flags: list[str], policy: Policy) -> None:
    env, times = restic_history
    done = subprocess.run(["restic", "forget", "--dry-run", "--json", *flags], env=env, check=True, capture_output=True, text=True)
    [group] = json.loads(done.stdout)
    restic_kept = sorted(datetime.fromisoformat(s["time"]).astimezone(UTC).replace(microsecond=0) for s in group["keep"])
    ours = [snap(t.astimezone(UTC).isoformat()) for t in times]
    decisions = apply_policy(ours, policy, local=lambda t: t.astimezone(ORACLE_ZONE))
    our_kept = sorted(d.snapshot.time.replace(microsecond=0) for d in decisions if d.keep)
    assert our_kept == restic_kept
    assert len(our_kept) < len(times)
