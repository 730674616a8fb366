"""How a run ends other than by finishing: stop signals, exit codes, and fault injection.

* SIGINT, SIGTERM and SIGUSR1 (Ctrl-C, ``scancel``, SLURM's warning before the time limit) ask
  for a clean stop: the job checkpoints at the next step boundary that all ranks agree on
  (``distributed.world.StopVote``) and exits with ``EXIT_RESUMABLE``, so that a person or a
  batch script reruns the same command. A second SIGINT ends the rank at once, without a
  checkpoint (``EXIT_INTERRUPTED``). Open MPI's ``mpirun`` does not pass SIGINT or SIGTERM on:
  it kills every rank within a second (SIGCONT, SIGTERM, SIGKILL); it does forward SIGUSR1,
  the clean stop under mpirun (docs/runs.md, Stopping a run).
* ``MHD_INJECT_FAULT=RANK:STEP[:MODE[:FACTOR]]`` (tests, benchmarks) makes that rank, at that
  step, raise an exception (``raise``, default), die by SIGKILL like ``kill -9`` (``kill``), die
  by SIGKILL in the middle of writing its checkpoint (``kill_in_checkpoint``, the step must be a
  checkpoint step), send itself SIGUSR1 like SLURM before a time limit (``signal``), stand still
  for FACTOR seconds like a process stopped by SIGSTOP or a node's hiccup (``pause``), or, from
  that step on, run FACTOR times slower than it would (``slow``: after each step it sleeps
  FACTOR - 1 times the step's own duration; a straggler, like a slower GPU or a busy node).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterator

__all__ = ["EXIT_CONFIG", "EXIT_RESUMABLE", "EXIT_INTERRUPTED", "FAULT_MODES", "STOP_SIGNALS",
           "StopSignal", "Fault", "children_shielded", "die", "under_mpirun"]

EXIT_CONFIG = 2  # a config error: every rank stopped before training
EXIT_RESUMABLE = 3  # stopped on a signal after a checkpoint: rerun the same command to continue
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, no checkpoint (128 + SIGINT)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
FAULT_MODES = ("raise", "kill", "kill_in_checkpoint", "signal", "slow", "pause")
_WITH_FACTOR = ("slow", "pause")
FAULT_ENV = "MHD_INJECT_FAULT"


def under_mpirun() -> bool:
    """Started by Open MPI's mpirun (its PRRTE runtime), not by srun or alone."""
    return os.environ.get("PRTE_LAUNCHED") == "1"


class StopSignal:
    """Remembers the first of SIGINT/SIGTERM/SIGUSR1; the loop's stop vote reads ``received``
    every step. ``announce`` (the root): say at once what will happen, in one line."""

    def __init__(self, announce: bool = False) -> None:
        self.received: int | None = None
        self.announce = announce
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    @property
    def name(self) -> str:
        """The signal's name (``SIGINT``), for the stop line."""
        return signal.Signals(self.received).name if self.received else "none"

    def _say(self, line: str) -> None:
        if self.announce:
            try:  # (mpirun, tearing the job down, may have closed the pipe already)
                os.write(sys.stderr.fileno(), f"mhd_hpc: {line}\n".encode())
            except OSError:
                pass

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: the person does not want to wait
                self._say(f"second {name}: stopping at once, without a checkpoint (exit "
                          f"{EXIT_INTERRUPTED}); rerun the same command to resume from the "
                          "last checkpoint")
                os._exit(EXIT_INTERRUPTED)
            return
        self.received = signum
        self._say(f"{name} received: stopping at the end of this step with a checkpoint"
                  + (" (Ctrl-C again: stop at once, without one)"
                     if signum == signal.SIGINT else ""))


@contextlib.contextmanager
def children_shielded() -> Iterator[None]:
    """Stop signals blocked while child processes (loader workers, their fork server) start:
    they inherit the blocked mask, so a Ctrl-C or ``scancel`` sent to every process of the job
    reaches the rank, which stops cleanly, and not its workers, which would die mid-batch.
    Signals that arrive meanwhile are delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die() -> None:
    """End this process the way ``kill -9`` or the OOM killer would: no cleanup at all."""
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Fault:
    """The fault this rank injects (``MHD_INJECT_FAULT``), if any."""

    step: int
    mode: str
    factor: float = 1.0  # mode slow: how many times slower; pause: seconds

    @classmethod
    def for_rank(cls, rank: int) -> "Fault | None":
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        parts = spec.split(":")
        mode = parts[2] if len(parts) > 2 else "raise"
        usage = f"{FAULT_ENV}={spec!r}: expected RANK:STEP[:{'|'.join(FAULT_MODES)}], " \
                "RANK:STEP:slow:FACTOR (FACTOR >= 1) or RANK:STEP:pause:SECONDS"
        with_factor = mode in _WITH_FACTOR
        if mode not in FAULT_MODES or len(parts) not in (2, 3, 4) \
                or (len(parts) == 4) != with_factor:
            raise ValueError(usage)
        factor = float(parts[3]) if with_factor else 1.0
        if factor < (1 if mode == "slow" else 0):
            raise ValueError(usage)
        return cls(int(parts[1]), mode, factor) if int(parts[0]) == rank else None

    def after_step(self, step: int, seconds: float) -> None:
        """``slow``: stretch a step that took ``seconds`` to FACTOR times that."""
        if self.mode == "slow" and step >= self.step:
            time.sleep((self.factor - 1.0) * seconds)

    def at_step_start(self, step: int) -> None:
        """Raise, die or signal now if this is the fault's step (all modes but the checkpoint
        one)."""
        if step != self.step:
            return
        if self.mode == "raise":
            raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
        if self.mode == "kill":
            die()
        if self.mode == "signal":
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.mode == "pause":
            time.sleep(self.factor)

    def in_checkpoint(self, step: int) -> bool:
        """True if this rank must die inside its checkpoint write of ``step``."""
        return self.mode == "kill_in_checkpoint" and step == self.step
