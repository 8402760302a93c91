"""
The enrollment channel frames requests itself (``puppetha.enroll.framing``) before Twisted's
parser sees them: whatever Twisted would refuse with its bare plain-text 400 is answered in JSON
like every other error, what is well-formed still passes, and no private Twisted name is used
to get there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http import HTTPChannel

from puppetha.enroll.api import EnrollmentChannel
from puppetha.enroll.framing import MAX_CHUNK_LINE, BadFraming, ChunkedBody, RequestHead

pytest.register_assert_rewrite("tests.enroll_fixtures")

from tests.enroll_fixtures import World  # noqa: E402 - after the rewrite hook
from tests.test_faults_clients import Client, refused  # noqa: E402

pytest_plugins = ["tests.enroll_fixtures"]

ROOT = Path(__file__).resolve().parent.parent

HEAD = b"POST /v1/enroll HTTP/1.1\r\nHost: puppet\r\nContent-Type: application/json\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"G(T /v1/ca HTTP/1.1\r\nHost: puppet\r\n\r\n",
        b"GET /v1/ca HTTP/2.0\r\nHost: puppet\r\n\r\n",
        b"GET  /v1/ca HTTP/1.1\r\nHost: puppet\r\n\r\n",
        b"GET /v1/\x7fca HTTP/1.1\r\nHost: puppet\r\n\r\n",
        b"\r\n\r\nGET /v1/ca HTTP/1.1\r\nHost: puppet\r\n\r\n",
        b"GET /v1/ca HTTP/1.1\r\nHost : puppet\r\n\r\n",
        b"GET /v1/ca HTTP/1.1\r\nHost puppet\r\n\r\n",
        b"GET /v1/ca HTTP/1.1\r\nHost: pup\x00pet\r\n\r\n",
        b"GET /v1/ca HTTP/1.1\r\nHost: pup\rpet\r\n\r\n",
        b"GET /v1/ca HTTP/1.1\r\nHost: puppet\r\nX-A: 1\r\n  folded\r\n\r\n",
        HEAD + b"Content-Length: 5x\r\n\r\nhello",
        HEAD + b"Content-Length: -5\r\n\r\nhello",
        HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
        CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n",
        CHUNKED + b"5\r\nhelloX\r\n0\r\n\r\n",
        CHUNKED + b"5;a=\\b\r\nhello\r\n0\r\n\r\n",
        CHUNKED + b"5;" + b"a" * MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n",
        CHUNKED + b"5" * (MAX_CHUNK_LINE + 10),
        CHUNKED + b"5\nhello\r\n0\r\n\r\n",
        CHUNKED + b"0\r\n" + b"X-Trailer: " + b"a" * 20_000 + b"\r\n\r\n",
    ],
    ids=["method-not-a-token", "http-2", "two-spaces", "target-with-DEL", "two-blank-lines-first",
         "space-before-colon", "no-colon", "NUL-in-value", "CR-in-value", "folded-header",
         "length-not-a-number", "negative-length", "length-and-chunked", "chunked-and-length",
         "chunked-twice", "gzip", "chunk-size-0x", "chunk-size-space", "chunk-not-ending-CRLF",
         "backslash-in-extension", "long-extension", "endless-size-line", "bare-LF-in-size-line",
         "long-trailers"],
)
def test_malformed_framing_is_answered_in_json(world: World, raw: bytes) -> None:
    # ``refused`` checks the JSON answer, the closed connection and that nothing was stored.
    assert refused(world, raw) == (400, "bad-framing")


@pytest.mark.parametrize("pieces", [1, 2, 3, 7, 1000], ids=lambda n: f"{n}-byte-reads")
def test_a_well_formed_chunked_body_passes_in_any_reads(world: World, pieces: int) -> None:
    body = b'{\n"role": "agent"\n}'
    raw = (b"\r\n" + CHUNKED + b"4;name=value\r\n" + body[:4] + b"\r\n%x\r\n" % (len(body) - 4) + body[4:]
           + b"\r\n0\r\nX-Trailer: yes\r\n\r\n")
    client = Client(world)
    for at in range(0, len(raw), pieces):
        client.send(raw[at:at + pieces])
    assert client.answer() == (400, {"error": "missing-field", "message": "document is missing"})
    assert not client.transport.disconnecting


def test_requests_after_a_chunked_one_on_the_same_read_are_framed_as_heads(world: World) -> None:
    client = Client(world)
    client.send(CHUNKED + b"2\r\n{}\r\n0\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: puppet\r\n\r\n"
                b"GET /v1/health HTTP/1.1\r\nHost : puppet\r\n\r\n")
    raw = client.transport.value()
    assert raw.count(b"HTTP/1.1 ") == 3, raw
    assert raw.startswith(b"HTTP/1.1 400 ")  # the enrollment's missing fields
    assert b"HTTP/1.1 200 " in raw
    message = b"a header line is not a name, a colon and a value"
    assert raw.endswith(b'{"error":"bad-framing","message":"%s"}\n' % message)
    assert client.transport.disconnecting


@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       after=st.binary(max_size=20))
def test_a_chunked_body_ends_where_its_last_chunk_does_in_any_reads(
    chunks: list[bytes], cuts: list[int], after: bytes
) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    raw = body + after
    edges = sorted({0, len(raw), *(cut % (len(raw) + 1) for cut in cuts)})
    checked = ChunkedBody()
    for start, end in itertools.pairwise(edges):
        ended = checked.feed(raw[start:end])
        if ended is not None:
            assert start + ended == len(body)
            return
    raise AssertionError("the body's end was never found")


def test_a_chunked_body_reports_where_it_ends() -> None:
    chunks = ChunkedBody()
    assert chunks.feed(b"3\r\nab") is None
    assert chunks.feed(b"c\r\n0\r\n\r\nGET /") == len(b"c\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    ("lines", "chunked"),
    [
        ([b"GET / HTTP/1.1", b"Host: a", b""], False),
        ([b"", b"GET / HTTP/1.0", b""], False),
        ([b"POST / HTTP/1.1", b"transfer-encoding: Chunked", b""], True),
        ([b"POST / HTTP/1.1", b"Content-Length: 0", b"X-Obs: caf\xe9\tau lait", b""], False),
    ],
)
def test_well_formed_heads_are_taken(lines: list[bytes], chunked: bool) -> None:
    head = RequestHead()
    for line in lines:
        head.line(line)
    assert (head.done, head.chunked) == (True, chunked)


def test_too_many_header_lines_is_431() -> None:
    head = RequestHead()
    head.line(b"GET / HTTP/1.1")
    for n in range(100):
        head.line(b"X-%d: 1" % n)
    with pytest.raises(BadFraming) as refusal:
        head.line(b"X-One-Too-Many: 1")
    assert (refusal.value.status, refusal.value.code) == (431, "headers-too-large")


def test_the_channel_overrides_no_private_twisted_method() -> None:
    # What Twisted keeps private may change under us in any release.
    twisted_names = {name for base in HTTPChannel.__mro__ for name in vars(base)}
    ours = {name for name in vars(EnrollmentChannel) if name.startswith("_") and not name.startswith("__")}
    assert ours & twisted_names == set()


def _twisted_classes_in_puppetha() -> list[type]:
    found = []
    for path in sorted((ROOT / "puppetha").rglob("*.py")):
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts)
                                         .removesuffix(".__init__"))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(
                    base.__module__.startswith("twisted.") for base in cls.__mro__[1:]):
                found.append(cls)
    return found


def test_no_class_of_puppetha_overrides_a_private_twisted_name() -> None:
    classes = _twisted_classes_in_puppetha()
    assert EnrollmentChannel in classes
    overrides = []
    for cls in classes:
        twisted_names = {name for base in cls.__mro__ if base.__module__.startswith("twisted.")
                         for name in vars(base)}
        overrides += [f"{cls.__qualname__}.{name}" for name in vars(cls)
                      if name.startswith("_") and not name.startswith("__") and name in twisted_names]
    assert overrides == []


def test_puppetha_imports_nothing_private_of_twisted() -> None:
    private = []
    for path in (ROOT / "puppetha").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            private += [f"{path.name}: {name}" for name in names if name.startswith("twisted.")
                        and any(part.startswith("_") for part in name.split("."))]
    assert private == []
