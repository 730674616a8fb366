"""What every point-to-point transport between clients shares: a wait with a deadline that
names the missing peer, the error it raises, and traffic counters (bytes, seconds waiting)."""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["ExchangeError", "TrafficCounters", "wait_until"]


class ExchangeError(RuntimeError):
    """A peer's message was missing, late or about different public samples."""


def wait_until(done: Callable[[], bool], timeout_s: float, describe: Callable[[], str]) -> None:
    """Poll ``done`` until it holds; after ``timeout_s`` raise with ``describe()``.

    Polling instead of a blocking Wait is what makes a deadline (and a message naming the peer)
    possible; the back-off keeps a waiting rank from stealing the core of the peer it waits for.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.0
    while not done():
        if time.monotonic() > deadline:
            raise ExchangeError(describe())
        time.sleep(pause)
        pause = min(0.002, pause + 0.0001)


class TrafficCounters:
    """Bytes sent and received and seconds spent waiting, reported per log interval."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_seconds = 0.0

    def take_counters(self) -> tuple[int, int, float]:
        """(bytes sent, bytes received, seconds waiting) since the previous call."""
        out = (self.bytes_sent, self.bytes_received, self.wait_seconds)
        self.bytes_sent = self.bytes_received = 0
        self.wait_seconds = 0.0
        return out
