"""
``puppetha-enc CERTNAME``: puppetserver's external node classifier.

Asks the daemon over its UNIX socket and prints the YAML.  puppetserver runs it for every
catalog, so it starts as fast as Python can: it imports only modules compiled into the
interpreter or already loaded at start-up (``posix``, not ``os``, which costs more than the
rest of the script; ``_socket``, not ``socket``, which pulls in ``enum`` and ``selectors``),
and :mod:`puppetha.enc.launcher` has puppetserver run its compiled bytecode with ``-I -S``.
Socket path: ``--socket PATH``, else ``$PUPPETHA_ENC_SOCKET``, else ``/run/puppetha/enc.sock``.
"""

import posix
import sys


def _load_socket_module():  # type: ignore[no-untyped-def]
    """
    ``_socket``, the socket module's C core.  Built in on Debian's Python; elsewhere an
    extension in ``lib-dynload``, which ``import`` finds only after setting up the path finder
    and listing the standard library's directories: on a script this short that costs as much
    as the rest of it, so the extension is loaded from where the interpreter keeps it.
    """
    if "_socket" not in sys.builtin_module_names:
        import _imp

        class Spec:
            name = "_socket"
            origin = (f"{sys.base_exec_prefix}/{sys.platlibdir}/python{sys.version_info[0]}."
                      f"{sys.version_info[1]}/lib-dynload/_socket{_imp.extension_suffixes()[0]}")

        try:
            return _imp.create_dynamic(Spec)  # type: ignore[arg-type]  # a ModuleSpec in all but name
        except (ImportError, OSError):
            pass  # laid out otherwise: let import find it
    import _socket

    return _socket


_socket = _load_socket_module()
DEFAULT_SOCKET = "/run/puppetha/enc.sock"
TIMEOUT = 15.0
MAX_ANSWER = 8 * 1024 * 1024
_USAGE = "usage: puppetha-enc [--socket PATH] CERTNAME"


def _fail(message: str) -> int:
    sys.stderr.write(f"puppetha-enc: {message}\n")
    return 1


def _socket_from_environment() -> str:
    value = posix.environ.get(b"PUPPETHA_ENC_SOCKET", b"")
    return value.decode(sys.getfilesystemencoding(), "surrogateescape")


def _parse(argv: list[str]) -> tuple[str, str] | str:
    """``(socket path, certname)``, or a usage error."""
    path = _socket_from_environment() or DEFAULT_SOCKET
    names: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--socket":
            path = next(args, "")
            if not path:
                return "--socket needs a path"
        elif arg.startswith("--socket="):
            path = arg[len("--socket="):]
        elif arg in ("-h", "--help"):
            return _USAGE
        elif arg.startswith("-") and arg != "-":
            return f"unknown option {arg}"
        else:
            names.append(arg)
    if len(names) != 1:
        return _USAGE
    return path, names[0]


def classify(path: str, certname: str, timeout: float = TIMEOUT) -> bytes:
    """The daemon's answer, raw: ``OK <length>\\n<yaml>`` or ``ERR <code> <message>\\n``."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(certname.encode("ascii") + b"\n")
        conn.shutdown(_socket.SHUT_WR)
        chunks = []
        size = 0
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ValueError(f"answer larger than {MAX_ANSWER} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parsed = _parse(sys.argv[1:] if argv is None else argv)
    if isinstance(parsed, str):
        return _fail(parsed)
    path, certname = parsed
    # The daemon validates fully; this only keeps the one-line request one line.
    if not certname or len(certname) > 255 or not certname.isascii() or not certname.isprintable() \
            or " " in certname:
        return _fail(f"bad certname {certname!r}")
    try:
        answer = classify(path, certname)
    except (OSError, ValueError) as e:
        return _fail(f"{certname}: cannot ask the daemon at {path}: {e}")
    head, _, body = answer.partition(b"\n")
    if head.startswith(b"OK "):
        if head[3:] != b"%d" % len(body):
            # Cut short (the daemon stopped mid-answer): a partial classification is no answer.
            return _fail(f"{certname}: incomplete answer from the daemon at {path}")
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        return 0
    if head.startswith(b"ERR "):
        code, _, message = head[4:].decode("ascii", "replace").partition(" ")
        return _fail(f"{certname}: {message} ({code})")
    return _fail(f"{certname}: unexpected answer from the daemon at {path}")


if __name__ == "__main__":
    sys.exit(main())
