"""The `stasisfs` command: a click group, one module per command group."""

from __future__ import annotations

import errno
import os
import sys

import click

from .. import __version__
from ..errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE, StasisError
from . import key as key_commands
from . import maintenance as maintenance_commands
from . import mount as mount_commands
from . import remote as remote_commands
from . import repo as repo_commands
from . import unattended as unattended_commands
from .common import global_options

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
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


for command in (repo_commands.init, repo_commands.backup, repo_commands.snapshots, repo_commands.ls, repo_commands.find,
                repo_commands.dump, repo_commands.diff, repo_commands.restore, repo_commands.check, repo_commands.repair,
                key_commands.key, mount_commands.mount, mount_commands.umount, remote_commands.remote, remote_commands.sync,
                remote_commands.recover, remote_commands.devices, maintenance_commands.forget, maintenance_commands.prune,
                unattended_commands.schedule, unattended_commands.status):
    cli.add_command(command)


def main() -> None:
    try:
        cli.main(prog_name="stasisfs", standalone_mode=False)
    except StasisError as exc:
        click.echo(f"stasisfs: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
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
