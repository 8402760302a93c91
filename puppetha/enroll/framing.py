"""
HTTP/1.1 request framing, checked before Twisted's parser sees it.

Twisted's :class:`~twisted.web.http.HTTPChannel` answers what it cannot parse with a bare
``400`` in plain text, and offers no public way to change that answer.  The enrollment channel
therefore checks each line of a request head (:class:`RequestHead`) and each byte of a chunked
body (:class:`ChunkedBody`) itself, at least as strictly as Twisted does, and refuses with its
own JSON answer; what it lets through Twisted always parses.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import re

#: Longest request line or header line, and the most bytes of request line and headers
#: together (line ends not counted, as Twisted counts them).
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 16 * 1024
#: Most header lines (Twisted refuses past 500).
MAX_HEADER_LINES = 100

#: Longest chunk-size line (Twisted refuses from 1024 bytes) and most bytes of trailers.
MAX_CHUNK_LINE = 1000
MAX_TRAILERS = MAX_HEADERS

_TOKEN = rb"[A-Za-z0-9!#$%&'*+\-.^_`|~]+"
# RFC 9112 section 3: method SP request-target SP HTTP-version; the target printable ASCII.
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/1\.[01]")
_HEADER_NAME = re.compile(_TOKEN)
# A field value holds visible characters, spaces, tabs and obs-text, nothing else.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
# A chunk extension: what Twisted accepts there (no control character but tab, no backslash).
_BAD_EXTENSION = re.compile(rb"[\x00-\x08\x0a-\x1f\\\x7f]")


class BadFraming(Exception):
    """A request that is not well-formed HTTP/1.1: answered ``status`` and closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _malformed(message: str) -> BadFraming:
    return BadFraming(400, "bad-framing", message)


class RequestHead:
    """
    The head of one request, checked line by line (each without its CRLF) as it arrives.

    :meth:`line` raises :class:`BadFraming` for anything Twisted would refuse, and more:
    obsolete line folding, a length given twice or both ways, a transfer coding other than
    ``chunked``.  After the blank line ending the head, :attr:`done` is true and
    :attr:`chunked` says whether a chunked body follows.
    """

    def __init__(self) -> None:
        self.lines = 0  # lines of the head so far, the request line included
        self.size = 0  # their bytes
        self.started = False
        self.done = False
        self.chunked = False
        self._blank_skipped = False
        self._length_seen = False

    def line(self, line: bytes) -> None:
        if self.size + len(line) > MAX_HEADERS:
            raise BadFraming(431, "headers-too-large",
                             f"the request line and headers pass {MAX_HEADERS} bytes")
        if self.lines > MAX_HEADER_LINES:
            raise BadFraming(431, "headers-too-large", f"more than {MAX_HEADER_LINES} header lines")
        self.size += len(line)
        if not self.started:
            if line == b"" and not self._blank_skipped:
                # One empty line before a request is tolerated (RFC 9112 section 2.2), as Twisted does.
                self._blank_skipped = True
                return
            self.lines += 1
            self.started = True
            if not _REQUEST_LINE.fullmatch(line):
                raise _malformed("the request line is not a method, a target and HTTP/1.0 or HTTP/1.1")
            return
        self.lines += 1
        if line == b"":
            self.done = True
        elif line[:1] in (b" ", b"\t"):
            raise _malformed("a header is folded over lines")
        else:
            self._header(line)

    def _header(self, line: bytes) -> None:
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise _malformed("a header line is not a name, a colon and a value")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _malformed("a header value holds a control character")
        name = name.lower()
        if name == b"content-length":
            if not value.isdigit():
                raise _malformed("Content-Length is not a number")
            self._length(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise _malformed("the only transfer coding taken is chunked")
            self._length(value)
            self.chunked = True

    def _length(self, value: bytes) -> None:
        # Two ways of framing one body are how requests are smuggled past a proxy.
        if self._length_seen:
            raise _malformed("the body's length is given more than once")
        self._length_seen = True


class ChunkedBody:
    """
    A chunked body (RFC 9112 section 7.1), checked as its bytes arrive.

    :meth:`feed` takes the bytes read after the head, raises :class:`BadFraming` for a malformed
    chunk, and returns how many of them belonged to the body once its last chunk and trailers
    have come (``None`` while more is to come): what follows is the next request.  Only the
    chunk-size lines and trailers are kept, never the data.
    """

    def __init__(self) -> None:
        self._state = "size"  # "size", "data", "crlf", "trailer", "done"
        self._line = bytearray()
        self._left = 0  # bytes of chunk data still to come
        self._trailers = 0

    def feed(self, data: bytes) -> int | None:
        at = 0
        while at < len(data):
            if self._state == "data":
                taken = min(self._left, len(data) - at)
                self._left -= taken
                at += taken
                if self._left == 0:
                    self._state = "crlf"
                continue
            byte = data[at:at + 1]
            at += 1
            self._line += byte
            if self._state == "crlf":
                if not b"\r\n".startswith(bytes(self._line)):
                    raise _malformed("a chunk does not end with CRLF")
                if len(self._line) == 2:
                    self._line.clear()
                    self._state = "size"
            elif byte == b"\n":
                if not self._line.endswith(b"\r\n"):
                    raise _malformed("lines must end with CRLF")
                line = bytes(self._line[:-2])
                self._line.clear()
                if self._state == "size":
                    self._size(line)
                elif line == b"":
                    self._state = "done"
                    return at
                else:
                    self._trailers += len(line) + 2
            elif self._state == "size" and len(self._line) > MAX_CHUNK_LINE + 1:
                raise _malformed(f"a chunk-size line passes {MAX_CHUNK_LINE} bytes")
            elif self._state == "trailer" and self._trailers + len(self._line) > MAX_TRAILERS:
                raise _malformed(f"the trailers pass {MAX_TRAILERS} bytes")
        return None

    def _size(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            raise _malformed(f"a chunk-size line passes {MAX_CHUNK_LINE} bytes")
        size, _, extension = line.partition(b";")
        if not _HEX.fullmatch(size):
            raise _malformed("a chunk size is not a hexadecimal number")
        if _BAD_EXTENSION.search(extension):
            raise _malformed("a chunk extension holds a control character or a backslash")
        self._left = int(size, 16)
        self._state = "data" if self._left else "trailer"
