"""
What both HTTP peers of the instance (the metadata service and the enrollment server) share: an
answer read with a bound on its size, and a failure described in one line.
"""

from __future__ import annotations

import http.client
import socket

#: Far above any answer we expect (a CA bundle of many masters); refuse to buffer more.
MAX_ANSWER = 4 * 1024 * 1024


def read_limited(response: http.client.HTTPResponse) -> bytes:
    body = response.read(MAX_ANSWER + 1)
    if len(body) > MAX_ANSWER:
        raise http.client.HTTPException(f"answer larger than {MAX_ANSWER} bytes")
    return body


def describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    return " ".join(text.split())
