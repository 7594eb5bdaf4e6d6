"""Where this device keeps its own files, by the XDG base directory rules: never in a repository."""

from __future__ import annotations

import os
from pathlib import Path

XDG_DEFAULTS = {"XDG_CONFIG_HOME": ".config", "XDG_CACHE_HOME": ".cache", "XDG_STATE_HOME": os.path.join(".local", "state")}


def xdg_dir(name: str) -> Path:
    """An XDG base directory, absolute: the variable when set, else its default under the home directory."""
    return Path(os.path.abspath(os.environ.get(name) or os.path.join(os.path.expanduser("~"), XDG_DEFAULTS[name])))


def config_root() -> Path:
    """Remotes, tokens, profiles, schedules (secrets: files 0600)."""
    return xdg_dir("XDG_CONFIG_HOME") / "stasisfs"


def cache_root() -> Path:
    """The rebuildable LMDB index and a thin repository's fetched packs."""
    return xdg_dir("XDG_CACHE_HOME") / "stasisfs"


def state_root() -> Path:
    """Logs and run records, made 0700 on first use."""
    path = xdg_dir("XDG_STATE_HOME") / "stasisfs"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
