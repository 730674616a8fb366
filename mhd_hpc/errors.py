"""The error every layer may raise for a bad job setting: it names the dotted config key, and
the entry point turns it into one message and exit code 2 on every rank. Its own module, so that
the domain modules (which ``config`` imports for their rules) can raise it without importing
``config``. Beside it, the one way every command ends when its reader goes away
(:func:`command`: ``mhd-report RUN | head``)."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

__all__ = ["ConfigError", "command", "EXIT_BROKEN_PIPE"]

#: Exit code of a command whose output pipe was closed: 128 + SIGPIPE, what the shell reports
#: for a program that the signal ended (``yes | head``).
EXIT_BROKEN_PIPE = 141


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's ``main(argv=None) -> exit code`` so that a closed output pipe ends it
    quietly (no traceback, exit code :data:`EXIT_BROKEN_PIPE`). The output is flushed inside,
    so a reader that leaves early is noticed here and not in the interpreter's exit."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            # Point stdout at /dev/null so that the interpreter's own flush at exit is silent.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE

    return wrapped


class ConfigError(ValueError):
    """A job configuration problem, always naming the dotted key at fault."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config error at '{key}': {message}")
