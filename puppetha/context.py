"""
What a ``puppetha`` command is given and how it refuses: the :class:`Context` it may use, and
:class:`CLIError` with the exit statuses.  The command groups depend on this module, and
:mod:`puppetha.cli` on them, never the other way round.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, TextIO

from puppetha.config import Config, load_config

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
                 out: TextIO, now: Callable[[], float], err: TextIO | None = None) -> None:
        self._config_path = config_path
        self._overrides = overrides
        self.out = out
        self.now = now
        #: Where to say which store a command opened; None when the operator named it already.
        self._say_store = err
        self._opened: list[IStore] = []

    @cached_property
    def config(self) -> Config:
        return load_config(self._config_path, self._overrides)

    @cached_property
    def store(self) -> IStore:
        from puppetha.build import open_store

        store = open_store(self.config)
        self._opened.append(store)
        if self._say_store is not None:
            # A command on the wrong store exits 0 too: say which one, on stderr (stdout stays data).
            print(f"puppetha: store {describe_store(self.config)} (config: {self.config.source})",
                  file=self._say_store)
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


def describe_store(config: Config) -> str:
    if config[("store", "backend")] == "sqlite":
        return f"sqlite:{config[('store', 'path')]}"
    return f"dynamodb:{config[('store', 'table')]} ({config[('aws', 'region')]})"


Handler = Callable[[Context, argparse.Namespace], int]
