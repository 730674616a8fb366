"""What every point-to-point transport between clients shares: a wait with a deadline that
names the missing peer, the error it raises, and traffic counters (bytes, seconds waiting)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

__all__ = ["ExchangeError", "Poller", "TrafficCounters", "all_done", "new_status",
           "set_turn_yield", "wait_until"]

#: With hosted clients (``distributed.hosted``), how a waiting client lets the other clients of
#: its process run: ``yield_turn(pause_s)``. None: one client per process, waits just pause.
_turn_yield: Callable[[float], None] | None = None


def set_turn_yield(hook: Callable[[float], None] | None) -> None:
    global _turn_yield
    _turn_yield = hook


def all_done(requests: list) -> bool:
    """Whether every request is complete (MPI's or a hosted communicator's)."""
    return all(r.Test() for r in requests)


def new_status(comm) -> Any:
    """An empty status for ``comm.iprobe``/``Test`` (a hosted communicator has its own)."""
    make = getattr(comm, "new_status", None)
    if make is not None:
        return make()
    from mpi4py import MPI

    return MPI.Status()


class ExchangeError(RuntimeError):
    """A peer's message was missing, late or about different public samples."""


class Poller:
    """The pause between two tests of a request: the first ~0.5 ms spin (yielding the core),
    then sleeps that start at 20 us and grow to 200 us. A message is noticed at most 0.2 ms
    after it lands (the previous schedule slept up to 2 ms), and a rank waiting for a peer that
    runs on the same core still leaves it the core."""

    def __init__(self) -> None:
        self.t0, self.pause_s = time.perf_counter(), 20e-6

    def pause(self) -> None:
        spinning = time.perf_counter() - self.t0 < 5e-4
        if _turn_yield is not None:  # a hosted client: the others of its process run meanwhile
            _turn_yield(0.0 if spinning else self.pause_s)
        elif spinning:
            os.sched_yield()
        else:
            time.sleep(self.pause_s)
        if not spinning:
            self.pause_s = min(2e-4, self.pause_s * 1.5)


def wait_until(done: Callable[[], bool], timeout_s: float, describe: Callable[[], str]) -> None:
    """Poll ``done`` until it holds; after ``timeout_s`` raise with ``describe()``.

    Polling instead of a blocking Wait is what makes a deadline (and a message naming the peer)
    possible; :class:`Poller` keeps a waiting rank from stealing the core of the peer it waits
    for without sleeping long past an arrival.
    """
    deadline = time.monotonic() + timeout_s
    poll = Poller()
    while not done():
        if time.monotonic() > deadline:
            raise ExchangeError(describe())
        poll.pause()


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
