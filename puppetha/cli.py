"""
``puppetha``: the operator's command line.

Every command group lives with its domain (``puppetha.enc.commands`` adds ``classify``, ...)
and registers itself here.  A handler takes a :class:`Context` and the parsed arguments and
returns the exit status; a refusal is a :class:`CLIError`, printed as one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, TextIO

from puppetha.config import Config, ConfigError, load_config
from puppetha.pki.vault import VaultError
from puppetha.store import StoreError

if TYPE_CHECKING:
    from puppetha.pki.authority import CertificateAuthority
    from puppetha.store import IStore
    from puppetha.store.records import Records

#: Exit status of a refused command (bad input, not found, conflict).
EXIT_REFUSED = 2
#: Exit status when a dependency (store, AWS) failed.
EXIT_FAILED = 1


class CLIError(Exception):
    """A refusal: its message is the one line the operator sees."""

    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.status = status


class Context:
    """What a command may use; everything is opened on first use, so ``--help`` touches nothing."""

    def __init__(self, config_path: str | None, overrides: dict[tuple[str, str], str],
                 out: TextIO, now: Callable[[], float]) -> None:
        self._config_path = config_path
        self._overrides = overrides
        self.out = out
        self.now = now
        self._opened: list[IStore] = []

    @cached_property
    def config(self) -> Config:
        return load_config(self._config_path, self._overrides)

    @cached_property
    def store(self) -> IStore:
        from puppetha.build import open_store

        store = open_store(self.config)
        self._opened.append(store)
        return store

    @cached_property
    def records(self) -> Records:
        from puppetha.store.records import Records

        return Records(self.store)

    @cached_property
    def authority(self) -> CertificateAuthority:
        from puppetha.build import make_authority, open_vault

        return make_authority(self.config, self.records, open_vault(self.config), self.now)

    def close(self) -> None:
        for store in self._opened:
            store.close()


Handler = Callable[[Context, argparse.Namespace], int]


def _command_groups() -> list[Callable[[Any], None]]:
    from puppetha import commands
    from puppetha.enc import commands as enc_commands
    from puppetha.ha import status

    return [commands.add_commands, enc_commands.add_commands, status.add_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puppetha",
        description="Operate a puppetha fleet: its CAs, nodes, CRLs, classifications and store.",
    )
    parser.add_argument("--config", metavar="PATH",
                        help="the daemon's configuration file (default: the embedded defaults)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="override [daemon] state_dir of the configuration")
    subparsers = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for add in _command_groups():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None, now: Callable[[], float] | None = None) -> int:
    import time

    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    overrides = {("daemon", "state_dir"): args.state_dir} if args.state_dir else {}
    ctx = Context(args.config, overrides, out, now or time.time)
    try:
        status: int = args.func(ctx, args)
        return status
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
