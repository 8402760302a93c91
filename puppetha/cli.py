"""
``puppetha``: the operator's command line.

Every command group lives with its domain (``puppetha.enc.commands`` adds ``classify``, ...)
and is listed here; the groups import only :mod:`puppetha.context`, never this module.  A handler
takes a :class:`Context` and the parsed arguments and returns the exit status; a refusal is a
:class:`CLIError`, printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from puppetha import commands
from puppetha.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, ConfigError, find_config
from puppetha.context import EXIT_FAILED, EXIT_REFUSED, CLIError, Context
from puppetha.enc import commands as enc_commands
from puppetha.ha import status
from puppetha.pki.vault import VaultError
from puppetha.store import StoreError


def _command_groups() -> list[Callable[[Any], None]]:
    return [commands.add_commands, enc_commands.add_commands, status.add_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puppetha",
        description="Operate a puppetha fleet: its CAs, nodes, CRLs, classifications and store.",
    )
    parser.add_argument("--config", metavar="PATH",
                        help=f"the daemon's configuration file (default: ${CONFIG_ENV}, else "
                        f"{DEFAULT_CONFIG_PATH} if it exists, else the embedded defaults)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="override [daemon] state_dir of the configuration")
    subparsers = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for add in _command_groups():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None, now: Callable[[], float] | None = None, *,
         environ: Mapping[str, str] | None = None, default_config: str = DEFAULT_CONFIG_PATH) -> int:
    import time

    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    overrides = {("daemon", "state_dir"): args.state_dir} if args.state_dir else {}
    config_path = find_config(args.config, os.environ if environ is None else environ, default_config)
    # Named on the command line: the operator knows which store; found otherwise: say it.
    named = bool(args.config or args.state_dir)
    ctx = Context(config_path, overrides, out, now or time.time, err=None if named else err)
    try:
        status: int = args.func(ctx, args)
        # Written out here, so that a reader who left is met below, not in Python's flush at exit.
        out.flush()
        return status
    except BrokenPipeError:
        # `puppetha node list | head`: the rest of the output is not wanted.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except CLIError as e:
        print(f"puppetha: {e}", file=err)
        return e.status
    except ConfigError as e:
        print(f"puppetha: {e}", file=err)
        return EXIT_REFUSED
    except (StoreError, VaultError) as e:
        print(f"puppetha: {e}", file=err)
        return EXIT_FAILED
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
