"""The error every layer may raise for a bad job setting: it names the dotted config key, and
the entry point turns it into one message and exit code 2 on every rank. Its own module, so that
the domain modules (which ``config`` imports for their rules) can raise it without importing
``config``."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A job configuration problem, always naming the dotted key at fault."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config error at '{key}': {message}")
