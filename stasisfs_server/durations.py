"""Durations as operators type them: `90s`, `10m`, `2h`, `3d`, `1w`."""

from __future__ import annotations

import re
from datetime import timedelta

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """A positive number and one unit of s, m, h, d or w; ValueError with a sentence otherwise."""
    match = re.fullmatch(r"(\d{1,9})([smhdw])", text.strip())
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a duration: use a number and s, m, h, d or w, like 90s, 30m, 2h or 3d")
    return timedelta(**{UNITS[match[2]]: int(match[1])})


def format_duration(seconds: float) -> str:
    """The largest whole unit that fits: 172800 -> `2d`, 5400 -> `90m`."""
    whole = int(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"
