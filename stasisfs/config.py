"""Profiles in `~/.config/stasisfs/config.toml`: what to back up, where, with which password source and policy.

    [profiles.laptop]
    repository = "/media/usb/backup"
    key-file = "~/.config/stasisfs/keys/laptop.key"     # or password-file / password-command; never a password
    paths = ["~/"]
    exclude = ["*.iso", "~/.cache"]
    exclude-caches = true
    one-file-system = false
    tags = ["auto"]
    remotes = ["home"]                                   # sync after backup to these (default: every remote)
    on-success = "notify-send 'backup done'"
    on-failure = "mail -s 'backup failed' me@example.org"

    [profiles.laptop.retention]                          # applied after each backup
    keep-within = "14d"
    keep-daily = 7
    prune = true

Errors name the file and line. Options override the profile, then the environment does.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stasisfs.errors import UsageError
from stasisfs.format.retention import Duration, Policy
from stasisfs.system.paths import config_root

STRING_KEYS = {"repository", "password-file", "password-command", "key-file", "on-success", "on-failure"}
LIST_KEYS = {"paths", "exclude", "tags", "remotes"}
BOOL_KEYS = {"exclude-caches", "one-file-system"}
RETENTION_INTS = {"keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"}
RETENTION_KEYS = RETENTION_INTS | {"keep-within", "keep-tag", "prune", "max-unused"}


@dataclass
class Profile:
    name: str
    repository: str | None = None
    password_file: str | None = None
    password_command: str | None = None
    key_file: str | None = None
    paths: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    remotes: list[str] = field(default_factory=list)  # which remotes a backup syncs to; empty: all
    exclude_caches: bool = False
    one_file_system: bool = False
    on_success: str | None = None
    on_failure: str | None = None
    retention: Policy | None = None
    prune: bool = False
    max_unused: float = 5.0


def config_path() -> Path:
    return config_root() / "config.toml"


def _line_of(text: str, section: str, key: str | None) -> int:
    """The line a key (or its section) is on, for error messages; tomllib keeps no positions."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^\s*\[\s*{re.escape(section)}\s*\]", line)), None)
    if start is None:
        return 1
    if key is None:
        return start + 1
    for i in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", lines[i]):
            return i + 1
    return start + 1


def _expand(value: str) -> str:
    return os.path.expandvars(os.path.expanduser(value))


def load_profiles(path: Path | None = None) -> dict[str, Profile]:
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from None  # tomllib's message names the line and column
    unknown_top = set(doc) - {"profiles"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise UsageError(f"{path}:{_line_of(text, key, None) if isinstance(doc[key], dict) else 1}: unknown top-level entry {key!r}; "
                         "profiles go under [profiles.NAME]")
    profiles = {}
    for name, table in (doc.get("profiles") or {}).items():
        if not isinstance(table, dict):
            raise UsageError(f"{path}:{_line_of(text, 'profiles', None)}: profiles.{name} must be a table")
        profiles[name] = _profile(name, table, lambda section, key: f"{path}:{_line_of(text, section, key)}")
    return profiles


Locate = Callable[[str, str | None], str]


def _profile(name: str, table: dict[str, Any], locate: Locate) -> Profile:
    profile = Profile(name)

    def where(key: str | None) -> str:
        return locate(f"profiles.{name}", key)

    for key, value in table.items():
        if key == "retention":
            if not isinstance(value, dict):
                raise UsageError(f"{where(key)}: retention must be a table ([profiles.{name}.retention])")
            _retention(profile, value, lambda k: locate(f"profiles.{name}.retention", k))
            continue
        attr = key.replace("-", "_")
        if key in STRING_KEYS:
            if not isinstance(value, str):
                raise UsageError(f"{where(key)}: {key} must be a string")
            setattr(profile, attr, _expand(value) if key.endswith(("file", "repository")) else value)
        elif key in LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where(key)}: {key} must be a list of strings")
            setattr(profile, attr, [_expand(v) for v in value] if key == "paths" else value)
        elif key in BOOL_KEYS:
            if not isinstance(value, bool):
                raise UsageError(f"{where(key)}: {key} must be true or false")
            setattr(profile, attr, value)
        elif key == "password":
            raise UsageError(f"{where(key)}: a password never goes in the config file; use key-file, password-file or password-command")
        else:
            raise UsageError(f"{where(key)}: unknown setting {key!r} in profile {name}")
    if sum(x is not None for x in (profile.password_file, profile.password_command, profile.key_file)) > 1:
        raise UsageError(f"{where(None)}: profile {name} gives more than one of key-file, password-file, password-command")
    return profile


def _retention(profile: Profile, table: dict[str, Any], where: Callable[[str], str]) -> None:
    policy = Policy()
    for key, value in table.items():
        if key in RETENTION_INTS:
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise UsageError(f"{where(key)}: {key} must be a whole number (-1 for unlimited)")
            setattr(policy, key.removeprefix("keep-"), value)
        elif key == "keep-within":
            try:
                policy.within = Duration.parse(str(value))
            except ValueError as exc:
                raise UsageError(f"{where(key)}: {exc}") from None
        elif key == "keep-tag":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where(key)}: keep-tag must be a list of strings")
            policy.tags = value
        elif key == "prune":
            if not isinstance(value, bool):
                raise UsageError(f"{where(key)}: prune must be true or false")
            profile.prune = value
        elif key == "max-unused":
            if not isinstance(value, int | float) or not 0 <= value <= 100:
                raise UsageError(f"{where(key)}: max-unused must be a percentage")
            profile.max_unused = float(value)
        else:
            raise UsageError(f"{where(key)}: unknown retention setting {key!r}")
    profile.retention = None if policy.empty() else policy


def get_profile(name: str) -> Profile:
    profiles = load_profiles()
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or f"none ({config_path()} defines none)"
        raise UsageError(f"no profile {name!r}; known profiles: {known}")
    return profiles[name]
