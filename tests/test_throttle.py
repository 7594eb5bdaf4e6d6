"""The login throttle's policy, alone: growing delays, never a hard lock, and never the owner's address."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from stasisfs_server.throttle import MAX_DELAY, Failures, delay_after, wait_seconds

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
NONE = Failures(0, None)


def test_free_failures_then_doubling_delays_up_to_a_cap() -> None:
    assert [delay_after(n, 5) for n in (0, 4, 5, 6, 7)] == [0.0, 0.0, 1.0, 2.0, 4.0]
    assert delay_after(1000, 5) == MAX_DELAY


def test_a_guesser_waits_from_its_newest_failure() -> None:
    pair = Failures(7, NOW - timedelta(seconds=1))  # seven failures of this name from this address: 4 s after the last
    assert wait_seconds(NOW, pair, pair, pair) == 3.0
    assert wait_seconds(NOW + timedelta(seconds=5), pair, pair, pair) == 0


def test_the_name_wide_count_never_slows_an_address_that_has_not_failed() -> None:
    name = Failures(500, NOW)  # a distributed guesser has hammered the name
    assert wait_seconds(NOW, NONE, NONE, name) == 0  # the owner, from a clean address
    assert wait_seconds(NOW, Failures(1, NOW), Failures(1, NOW), name) > 0  # an address that guessed too
