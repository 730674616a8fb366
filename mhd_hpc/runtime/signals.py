"""How a run ends other than by finishing: stop signals, exit codes, and fault injection.

* SIGUSR1/SIGTERM (SLURM's warning before the time limit, ``scancel``) ask for a clean stop: the
  job checkpoints at the next log step that all ranks agree on and exits with
  ``EXIT_RESUMABLE``, so that a batch script can requeue it.
* ``MHD_INJECT_FAULT=RANK:STEP[:MODE[:FACTOR]]`` (tests, benchmarks) makes that rank, at that
  step, raise an exception (``raise``, default), die by SIGKILL like ``kill -9`` (``kill``), die
  by SIGKILL in the middle of writing its checkpoint (``kill_in_checkpoint``, the step must be a
  checkpoint step), send itself SIGUSR1 like SLURM before a time limit (``signal``), stand still
  for FACTOR seconds like a process stopped by SIGSTOP or a node's hiccup (``pause``), or, from
  that step on, run FACTOR times slower than it would (``slow``: after each step it sleeps
  FACTOR - 1 times the step's own duration; a straggler, like a slower GPU or a busy node).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

__all__ = ["EXIT_CONFIG", "EXIT_RESUMABLE", "FAULT_MODES", "StopSignal", "Fault", "die"]

EXIT_CONFIG = 2  # a config error: every rank stopped before training
EXIT_RESUMABLE = 3  # stopped on a signal after a checkpoint: rerun the same command to continue
FAULT_MODES = ("raise", "kill", "kill_in_checkpoint", "signal", "slow", "pause")
_WITH_FACTOR = ("slow", "pause")
FAULT_ENV = "MHD_INJECT_FAULT"


class StopSignal:
    """Remembers the last SIGUSR1/SIGTERM; the loop polls ``received`` at log steps."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum


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
