"""Pieces shared by the ``nsiter`` command and its sub-command modules, which it does not import
(so the CLI's imports run one way: ``cli -> _verify_cli -> _cli_common`` and ``cli -> _cli_common``).
"""
from __future__ import annotations

import argparse

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "_UsageError", "_Parser",
           "one_line"]

EXIT_OK = 0  #: the command ran (and, where a tolerance was given, it was met)
EXIT_FAILED = 1  #: a requested tolerance was missed
EXIT_USAGE = 2  #: bad input or usage: one line on stderr, never a traceback
EXIT_INTERNAL = 3  #: an unexpected internal error (one line on stderr; ``NSITER_DEBUG=1`` shows the traceback)
EXIT_INTERRUPTED = 130  #: interrupted by Ctrl-C (128 + SIGINT)


class _UsageError(Exception):
    """Bad input or usage: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits 2; keep it to one line
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def one_line(message) -> str:
    """``message`` as text with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())
