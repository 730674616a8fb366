"""How every rank's log rows and evaluations reach the root's :class:`Recorder`, chosen once per
run so that the training loop never branches on ``exchange.pool_async``:

- :class:`LockstepReports`: all ranks reach a log or evaluation step together, and the root
  gathers the rows there (a collective over all ranks);
- :class:`AsyncReports`: clients at their own pace post their rows to the root, which records a
  step once every rank (rows) or every client (evaluations) has reported it, in step order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from mhd_hpc.run.progress import Recorder

if TYPE_CHECKING:  # MPI-bound: imported where they are used
    from mhd_hpc.distributed.world import World

__all__ = ["LockstepReports", "AsyncReports", "AsyncRecords", "make_reports"]

ROWS_TAG, EVALS_TAG = 41, 42  # posts to the root when clients run at their own pace

HopsAt = Callable[[int], "np.ndarray | None"]  # step -> hop distances of its graph (or None)


def make_reports(world: World, recorder: Recorder | None, *, asynchronous: bool,
                 num_clients: int, hops_at: HopsAt,
                 timeout_s: float) -> "LockstepReports | AsyncReports":
    """The reports of ``exchange.pool_async`` (``recorder``: the root's, None elsewhere)."""
    if asynchronous:
        return AsyncReports(world, recorder, num_clients, hops_at, timeout_s)
    return LockstepReports(world, recorder, hops_at)


class LockstepReports:
    """Collective: every rank reaches the same log and evaluation steps; the root records."""

    def __init__(self, world: World, recorder: Recorder | None, hops_at: HopsAt):
        self.world, self.recorder, self.hops_at = world, recorder, hops_at

    def train_row(self, step: int, row: dict) -> None:
        """Collective: gather every rank's interval row; the root records and prints."""
        rows = self.world.gather((self.world.client, row))
        if self.recorder is not None:
            self.recorder.train_rows(step, rows)

    def evaluation(self, step: int, result: tuple | None) -> None:
        """Collective: ``result`` (a leader's (accuracies, probe), None elsewhere) to the root."""
        results = [r for r in self.world.gather(result) or [] if r is not None]  # per client
        if self.recorder is not None:
            self.recorder.evaluation(step, [a for a, _ in results], [p for _, p in results],
                                     self.hops_at(step))

    def finish(self) -> None:
        """Nothing is in flight: every row was recorded at its step."""


class AsyncReports:
    """``exchange.pool_async``: no collective over all ranks while training. Leaders post their
    rows and evaluations; the root takes what has arrived whenever it reports itself."""

    def __init__(self, world: World, recorder: Recorder | None, num_clients: int,
                 hops_at: HopsAt, timeout_s: float):
        self.world, self.timeout_s = world, timeout_s
        self.records = (AsyncRecords(recorder, world.size, num_clients, hops_at)
                        if recorder is not None else None)

    def train_row(self, step: int, row: dict) -> None:
        self.world.post_to_root((step, (self.world.client, row)), ROWS_TAG)
        self._collect()

    def evaluation(self, step: int, result: tuple | None) -> None:
        if result is not None:
            self.world.post_to_root((step, self.world.client, *result), EVALS_TAG)
        self._collect()

    def finish(self) -> None:
        """Collective: every post has arrived, and the root has recorded the last steps."""
        self.world.settle_posts(self.timeout_s)
        self._collect(until_complete=True)

    def _collect(self, until_complete: bool = False) -> None:
        """Root: record what the ranks have posted (at the end: until all is in)."""
        if self.records is None:
            return
        from mhd_hpc.distributed.p2p import Poller

        poll = Poller()
        while True:
            self.records.take(self.world.root_collect(ROWS_TAG),
                              self.world.root_collect(EVALS_TAG))
            if not until_complete or self.records.complete:
                return
            poll.pause()


class AsyncRecords:
    """The root's side of ``exchange.pool_async``: log rows and evaluations arrive from each
    rank (leader) when it reaches the step, at its own pace; a step is recorded once every rank
    (rows) or every client (evaluations) has reported it, in step order, through the same
    :class:`Recorder` the lock-step loop uses."""

    def __init__(self, recorder: Recorder, num_ranks: int, num_clients: int, hops_at):
        self.recorder, self.num_ranks, self.num_clients = recorder, num_ranks, num_clients
        self.hops_at = hops_at  # step -> hop distances (or None)
        self.rows: dict[int, list] = {}
        self.evals: dict[int, list] = {}

    def take(self, rows: list, evals: list) -> None:
        """``rows``: (step, (client, row)); ``evals``: (step, client, accuracies, probe)."""
        for step, row in rows:
            self.rows.setdefault(step, []).append(row)
        for step, client, acc, probe in evals:
            self.evals.setdefault(step, []).append((client, acc, probe))
        for step in sorted(s for s, got in self.rows.items() if len(got) == self.num_ranks):
            self.recorder.train_rows(step, self.rows.pop(step))
        for step in sorted(s for s, got in self.evals.items() if len(got) == self.num_clients):
            results = sorted(self.evals.pop(step))
            self.recorder.evaluation(step, [a for _, a, _ in results], [p for _, _, p in results],
                                     self.hops_at(step))

    @property
    def complete(self) -> bool:
        return not self.rows and not self.evals
