"""
How puppetserver runs the ENC script fast: ``<python> -IS <the script's compiled bytecode>``.

puppetserver starts the script for every catalog, so its start-up is the ENC's cost.  Three
things make it slow, and the fast command avoids each:

- the console-script wrapper (``puppetha-enc``) runs with site processing and imports the
  script through the package: ``-I -S`` skips both (``-I``: no environment, no user site, no
  script directory on ``sys.path``; ``-S``: no ``site``);
- running a ``.py`` compiles it on every start; running its ``.pyc`` does not;
- the script itself imports only what the interpreter already holds (:mod:`puppetha.enc.script`).

A shebang cannot name bytecode, and pip's installer rewrites a ``#!python -IS`` shebang and
drops its arguments, so the command has three words: Puppet's exec node terminus splits
``external_nodes`` on whitespace and runs the words as the command (``Puppet::Node::Exec``).
The bytecode is the standard ``__pycache__`` file of the installed script: pip writes it on
install (and removes it on uninstall); :func:`compile_script` writes it where it is missing
or older than the script (an editable install, or ``pip install --no-compile``).
"""

from __future__ import annotations

import importlib.util
import py_compile
import sys
from pathlib import Path

#: The ENC script's source, beside this module.
SCRIPT = Path(__file__).with_name("script.py")


def compiled_script(script: Path = SCRIPT) -> Path:
    """The ``.pyc`` the running interpreter writes and runs for ``script``."""
    return Path(importlib.util.cache_from_source(str(script)))


def fast_command(python: str = sys.executable, script: Path = SCRIPT) -> str:
    """``external_nodes`` for the script: the interpreter, isolated and without site, on its bytecode."""
    return f"{python} -IS {compiled_script(script)}"


def _stale(script: Path, compiled: Path) -> bool:
    """Whether ``compiled`` is missing, from another interpreter, or not of ``script`` as it is now."""
    try:
        header = compiled.read_bytes()[:16]
    except FileNotFoundError:
        return True
    source = script.stat()
    flags = int.from_bytes(header[4:8], "little")
    return (
        header[:4] != importlib.util.MAGIC_NUMBER
        or flags != 0  # hash-based: rewrite it as a timestamp one we can check here
        or int.from_bytes(header[8:12], "little") != int(source.st_mtime) & 0xFFFFFFFF
        or int.from_bytes(header[12:16], "little") != source.st_size & 0xFFFFFFFF
    )


def compile_script(script: Path = SCRIPT) -> Path:
    """
    Writes the script's bytecode if it is missing or stale, and returns its path.  Raises
    :class:`OSError` when it cannot be written, or :class:`py_compile.PyCompileError`.
    """
    compiled = compiled_script(script)
    if _stale(script, compiled):
        py_compile.compile(str(script), cfile=str(compiled), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return compiled
