"""
How a run of ``puppetha-enroll`` fails: one line for the operator and an exit code that tells
whoever runs it (cloud-init, a retry loop) whether trying again can help.  See docs/client.md.
"""

from __future__ import annotations

EXIT_OK = 0
#: Something on this host: bad arguments, unwritable files, an ssldir already enrolled.
EXIT_LOCAL = 1
#: The server refused (4xx); retrying the same request will not help.
EXIT_REFUSED = 2
#: The server, one of its dependencies, or the metadata service is unavailable; retry later.
EXIT_UNAVAILABLE = 3
#: The server is not the one pinned, or answered something that does not verify.
EXIT_UNTRUSTED = 4


class EnrollError(Exception):
    """A failure reported as one line; ``exit_code`` tells a caller whether to retry."""

    exit_code = EXIT_LOCAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalError(EnrollError):
    exit_code = EXIT_LOCAL


class WriteFailed(LocalError):
    """The answer checked out but the puppet files could not be written: the key is kept, and
    ``--wait`` tries again with it (the server answers again with the same certificate)."""


class Refused(EnrollError):
    exit_code = EXIT_REFUSED


class Unavailable(EnrollError):
    exit_code = EXIT_UNAVAILABLE


class Untrusted(EnrollError):
    exit_code = EXIT_UNTRUSTED
