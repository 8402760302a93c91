"""
AWS for tests: boto3 finds the test credentials the way the daemon finds real ones (its chain),
and a real moto server answers.  Plain context managers; each test module wraps them in a
fixture of the scope it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from puppetha.testing.moto import TEST_CREDENTIALS, MotoServer


@contextmanager
def boto_test_credentials() -> Iterator[pytest.MonkeyPatch]:
    """
    The environment holds moto's test credentials and nothing else boto3 could fall back on:
    no profile, no config files, no instance metadata.  Yields the patch, undone on exit.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", TEST_CREDENTIALS["aws_access_key_id"])
        env.setenv("AWS_SECRET_ACCESS_KEY", TEST_CREDENTIALS["aws_secret_access_key"])
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("AWS_CONFIG_FILE", "/nonexistent")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield env


@contextmanager
def moto_with_test_credentials() -> Iterator[MotoServer]:
    """A moto server, reached with :func:`boto_test_credentials`."""
    with boto_test_credentials(), MotoServer() as server:
        yield server
