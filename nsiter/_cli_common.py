"""Pieces shared by the ``nsiter`` command and its sub-command modules, which it does not import
(so the CLI's imports run one way: ``cli -> _verify_cli -> _cli_common``, ``cli -> _stats_cli -> _cli_common`` and
``cli -> _cli_common``).
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_OUTPUT", "EXIT_INTERRUPTED", "_UsageError",
           "_Parser", "one_line", "write_stdout"]

EXIT_OK = 0  #: the command ran (and, where a tolerance was given, it was met)
EXIT_FAILED = 1  #: a requested tolerance was missed
EXIT_USAGE = 2  #: bad input or usage: one line on stderr, never a traceback
EXIT_INTERNAL = 3  #: an unexpected internal error (one line on stderr; ``NSITER_DEBUG=1`` shows the traceback)
EXIT_OUTPUT = 4  #: stdout closed or not writable (e.g. ``> /dev/full``): one line on stderr, never a traceback
EXIT_INTERRUPTED = 130  #: interrupted by Ctrl-C (128 + SIGINT)


class _UsageError(Exception):
    """Bad input or usage: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits 2; keep it to one line
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def one_line(message) -> str:
    """``message`` as text with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


def write_stdout(prog: str, text: str = "") -> int | None:
    """Write ``text`` to stdout and flush it; ``None`` when done, else ``EXIT_OUTPUT`` after one line on stderr.

    A broken pipe (``| head`` stopped reading) is no error: ``None``, and the exit status still gives the verdict.
    On any failure fd 1 is pointed at os.devnull, so that Python's own flush at exit stays quiet (the recipe of the
    Python docs' "Note on SIGPIPE"). A stdout closed at start-up (``>&-``) is refused by ``nsiter.cli.main``.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        if isinstance(exc, BrokenPipeError):
            return None
        print(f"{prog}: cannot write to stdout: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_OUTPUT
    return None


def internal_error(prog: str, exc: Exception) -> int:
    """An unexpected error of a subcommand: one line on stderr and :data:`EXIT_INTERNAL`
    (``NSITER_DEBUG=1`` re-raises it for the traceback)."""
    if os.environ.get("NSITER_DEBUG"):
        raise exc
    print(f"{prog}: internal error {type(exc).__name__}: {one_line(exc)} "
          "(set NSITER_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
    return EXIT_INTERNAL
