"""The `stasisfs` command: a click group, one module per command group."""

from __future__ import annotations

import errno
import gc
import importlib
import os
import signal
import sys

import click

from stasisfs import __version__
from stasisfs.cli.common import damage_exit, global_options
from stasisfs.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE, StasisError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# command -> the module defining it; loaded on use, so `backup` under cron does not import the mount or the server client
COMMANDS = {
    "init": "repo", "backup": "repo", "snapshots": "repo", "ls": "repo", "find": "repo", "dump": "repo", "diff": "repo",
    "restore": "repo", "check": "repo", "repair": "repo", "key": "key", "mount": "mount", "umount": "mount",
    "remote": "remote", "sync": "remote", "recover": "remote", "devices": "remote", "forget": "maintenance",
    "prune": "maintenance", "schedule": "unattended", "status": "unattended",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs (or help lists it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"{__name__}.{module}"), cmd_name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="stasisfs")
@global_options
def cli() -> None:
    """stasisfs: encrypted, deduplicated backups that never trust the storage side.

    \b
    Start here:
      export STASISFS_REPO=/media/usb/backup
      stasisfs init                      # asks for a password
      stasisfs key export --paper        # print this, keep it safe
      stasisfs backup ~/                 # unchanged files are never re-read
      stasisfs snapshots
      stasisfs restore latest:/home/me/Documents --target ~/restored
      stasisfs mount ~/backups           # browse every snapshot

    \b
    Redundancy, recovery, cron:
      stasisfs remote add home https://host:8443 --user me --enrol-code CODE
      stasisfs recover https://host:8443 --user me   # a new machine: URL, user, password
      stasisfs schedule add nightly --cron '15 3 * * *' -- ~/
      stasisfs forget --keep-daily 7 --keep-within 14d --prune

    Exit codes: 0 ok, 1 fatal, 2 usage, 3 snapshot incomplete, 10 no repository,
    11 locked, 12 wrong password or key, 130 interrupted.
    """


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# The cyclic collector's young generation, in container objects allocated. A backup's walk makes
# a few short-lived containers per file (tuples, lists, a node's xattrs dict), nearly all freed by
# reference counting: at the default of 700 the parent ran 611 collections, 0.32 s of its 2.6 s of
# CPU, on 120k small files. Cycles are rare here; at worst this many objects wait for a collection.
GC_YOUNG_THRESHOLD = 20_000


def main() -> None:
    # SIGTERM (a service manager, `kill`) stops a command the way Ctrl-C does: one line, exit 130, no traceback.
    signal.signal(signal.SIGTERM, _interrupt)
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
    try:
        cli.main(prog_name="stasisfs", standalone_mode=False)
        code = damage_exit()
        if code:
            sys.exit(code)
    except StasisError as exc:
        click.echo(f"stasisfs: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click's form of a KeyboardInterrupt (or EOF at a prompt)
        click.echo("stasisfs: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_FATAL)
    except KeyboardInterrupt:
        click.echo("stasisfs: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FATAL)
    except OSError as exc:
        where = f" ({exc.filename!r})" if exc.filename else ""
        hint = "; free some space and run again" if exc.errno == errno.ENOSPC else ""
        click.echo(f"stasisfs: error: {exc.strerror or exc}{where}{hint}", err=True)
        sys.exit(EXIT_FATAL)
    sys.exit(0)
