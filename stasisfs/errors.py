"""User-facing errors, each carrying its exit code (restic's table, listed in README.md).

    StasisError                 exit 1, fatal: nothing was saved
    ├── UsageError              exit 2
    ├── RepositoryMissing       exit 10
    ├── RepositoryLocked        exit 11
    ├── WrongKey                exit 12
    ├── IndexDamaged            exit 1, the LMDB cache needs `repair index`
    └── IntegrityError          exit 1, stored bytes failed authentication

The CLI prints `str(error)` as one line and exits with `exit_code`; no traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_NO_REPO = 10
EXIT_LOCKED = 11
EXIT_WRONG_KEY = 12
EXIT_INTERRUPTED = 130


class StasisError(Exception):
    exit_code = EXIT_FATAL


class UsageError(StasisError):
    exit_code = EXIT_USAGE


class RepositoryMissing(StasisError):
    exit_code = EXIT_NO_REPO


class RepositoryLocked(StasisError):
    exit_code = EXIT_LOCKED


class WrongKey(StasisError):
    exit_code = EXIT_WRONG_KEY


class IndexDamaged(StasisError):
    """The local LMDB cache is unreadable; the repository itself is fine."""


class IntegrityError(StasisError):
    """Bytes read back do not authenticate or do not match their id."""
