"""How long a login attempt must wait, from the recent failures: growing delays, never a hard lock.

Pure policy, no I/O: the service counts failures in the database (so the limits hold
across instances) and asks `wait_seconds`. Three counts are kept over WINDOW:

- this user name from this address: the usual single-source guesser;
- any user name from this address: one source spraying many names;
- this user name from every address: a distributed guesser. This one slows only
  addresses that have themselves failed for the name, so the owner, logging in
  from a clean address, is never held up by someone else's guessing.

Each rule allows `free` failures, then doubles a delay per further failure, up to
MAX_DELAY, counted from the newest failure that rule saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

WINDOW = timedelta(minutes=15)
MAX_DELAY = 15 * 60.0
FREE_PER_NAME_AND_ADDRESS = 5
FREE_PER_ADDRESS = 20
FREE_PER_NAME = 20


@dataclass(frozen=True)
class Failures:
    """Failures within WINDOW, and when the newest of them happened (None when there were none)."""

    count: int
    newest: datetime | None


def delay_after(failures: int, free: int) -> float:
    if failures < free:
        return 0.0
    return min(2.0 ** (failures - free), MAX_DELAY)


def wait_seconds(now: datetime, pair: Failures, address: Failures, name: Failures) -> float:
    """Seconds until this name may be tried from this address; 0 when it may be tried now."""
    rules = [(pair, FREE_PER_NAME_AND_ADDRESS), (address, FREE_PER_ADDRESS)]
    if pair.count > 0:  # the name-wide rule never touches an address that has not failed for this name
        rules.append((name, FREE_PER_NAME))
    wait = 0.0
    for seen, free in rules:
        if seen.newest is not None:
            until = seen.newest + timedelta(seconds=delay_after(seen.count, free))
            wait = max(wait, (until - now).total_seconds())
    return wait
