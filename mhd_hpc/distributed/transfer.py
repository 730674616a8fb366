"""Background point-to-point transfer of flat weight vectors between clients (pool mode, the
paper's Algorithm 2): ``Isend``/``Irecv`` of one contiguous buffer per checkpoint, progressed by a
test call each step and completed at fixed steps so that runs are reproducible."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mhd_hpc.distributed.p2p import (ExchangeError, TrafficCounters, all_done, new_status,
                                     wait_until)
from mhd_hpc.distributed.world import World

__all__ = ["AsyncWeightTransfer", "LeadBound", "WeightTransfer"]

_WEIGHTS_TAG = 18
_WEIGHTS_HEADER = np.dtype([("step", "<i8"), ("sender", "<i8"), ("count", "<i8")])


@dataclass
class _PendingReceive:
    source: int
    due: int  # the step at which the receiver waits for it and inserts it
    buffer: np.ndarray
    request: object | None  # None: arrived already (settled, or restored from a checkpoint)


class WeightTransfer(TrafficCounters):
    """Background (non-blocking) point-to-point transfer of flat weight vectors for pool mode.

    A message is a header (sender's step, sender client, value count) followed by float32
    weights, one contiguous buffer. Transfers are posted at a refresh step and completed no later
    than their ``due`` step, so the receiver's pool changes at steps that do not depend on network
    timing, and an interrupted run resumes into exactly the same pool.
    """

    def __init__(self, world: World, timeout_s: float):
        super().__init__()
        self.world = world
        self.timeout_s = timeout_s
        self._sends: list[tuple[object, np.ndarray, int]] = []
        self._receives: list[_PendingReceive] = []

    def post_send(self, step: int, flat: np.ndarray, to_clients: list[int]) -> None:
        header = np.array([(step, self.world.client, flat.size)], dtype=_WEIGHTS_HEADER)
        buf = np.concatenate([header.view(np.uint8), flat.astype(np.float32).view(np.uint8)])
        for dest in to_clients:
            request = self.world.comm.Isend([buf, MPI.BYTE], dest=self.world.rank_of_client(dest),
                                            tag=_WEIGHTS_TAG)
            self._sends.append((request, buf, dest))  # the buffer must outlive the send
            self.bytes_sent += buf.nbytes

    def post_receive(self, source: int, count: int, due: int) -> None:
        buf = np.empty(_WEIGHTS_HEADER.itemsize + 4 * count, dtype=np.uint8)
        request = self.world.comm.Irecv([buf, MPI.BYTE], source=self.world.rank_of_client(source),
                                        tag=_WEIGHTS_TAG)
        self._receives.append(_PendingReceive(source, due, buf, request))

    def poll(self) -> None:
        """Let MPI progress the transfers (large messages advance only inside MPI calls) and
        release finished sends."""
        requests = [r.request for r in self._receives if r.request is not None]
        if requests:
            all_done(requests)
        self._sends = [s for s in self._sends if not s[0].Test()]

    def settle(self, step: int) -> None:
        """Wait until everything in flight has arrived or left (before a checkpoint), without
        handing anything over: an arrival still falls due at its own step, so when the pool
        changes does not depend on when checkpoints are taken."""
        t0 = time.perf_counter()
        for r in self._receives:
            if r.request is not None:
                self._wait(r.request, f"receive a checkpoint from client {r.source} "
                                      f"(rank {self.world.rank_of_client(r.source)})", step)
                r.request = None
        for request, _, dest in self._sends:
            self._wait(request, f"send a checkpoint to client {dest} "
                                f"(rank {self.world.rank_of_client(dest)})", step)
        self._sends = []
        self.wait_seconds += time.perf_counter() - t0

    def state(self) -> list[dict]:
        """The arrived, not yet due transfers (after ``settle``), for the checkpoint."""
        assert all(r.request is None for r in self._receives), "settle() first"
        return [{"source": r.source, "due": r.due, "buffer": r.buffer} for r in self._receives]

    def load_state(self, pending: list[dict]) -> None:
        """Restore the transfers that had arrived but were not due when the checkpoint was
        taken; they fall due at their own steps."""
        self._receives = [_PendingReceive(int(p["source"]), int(p["due"]),
                                          np.asarray(p["buffer"], dtype=np.uint8), None)
                          for p in pending]

    def complete(self, step: int) -> list[tuple[int, int, np.ndarray]]:
        """Wait for the receives due by ``step``; returns (source client, source step, weights)
        in a deterministic order."""
        due = [r for r in self._receives if r.due <= step]
        self._receives = [r for r in self._receives if r not in due]
        t0 = time.perf_counter()
        for r in due:
            if r.request is not None:
                self._wait(r.request, f"receive a checkpoint from client {r.source} "
                                      f"(rank {self.world.rank_of_client(r.source)})", step)
        self.wait_seconds += time.perf_counter() - t0
        out = []
        for r in sorted(due, key=lambda r: (r.due, r.source)):
            header = r.buffer[:_WEIGHTS_HEADER.itemsize].view(_WEIGHTS_HEADER)[0]
            if int(header["sender"]) != r.source:
                raise ExchangeError(f"{self.world.where()}: checkpoint from client "
                                    f"{int(header['sender'])}, expected client {r.source}")
            flat = r.buffer[_WEIGHTS_HEADER.itemsize:].view(np.float32)
            if flat.size != int(header["count"]):
                raise ExchangeError(f"{self.world.where()}: checkpoint from client {r.source} "
                                    f"has {int(header['count'])} values, expected {flat.size} "
                                    "(different architecture?)")
            self.bytes_received += r.buffer.nbytes
            out.append((r.source, int(header["step"]), flat))
        return out

    def _wait(self, request, what: str, step: int) -> None:
        wait_until(request.Test, self.timeout_s,
                    lambda: f"{self.world.where()} timed out after {self.timeout_s:.0f} s at "
                            f"step {step} waiting to {what} (exchange.timeout_s)")


_ASYNC_TAG = 19
_ASYNC_HEADER = np.dtype([("step", "<i8"), ("sender", "<i8"), ("count", "<i8"),
                          ("sent_at", "<f8")])


class AsyncWeightTransfer(TrafficCounters):
    """Pool mode at every client's own pace (``exchange.pool_async``): a sender posts its
    weights at its own refresh steps and never waits for them to leave (a destination whose
    previous checkpoint is still in flight is skipped this time, ``skipped``); a receiver keeps
    one receive from any client posted and takes whatever has arrived at each step. A message
    carries the sender's step and the wall-clock time it was sent, for the teachers' age."""

    def __init__(self, world: World, timeout_s: float, max_values: int):
        """``max_values``: the largest flat state any peer may send (the receive buffer)."""
        super().__init__()
        self.world, self.timeout_s = world, timeout_s
        self._buf = np.empty(_ASYNC_HEADER.itemsize + 4 * max_values, dtype=np.uint8)
        self._recv = None
        self._sends: dict[int, tuple[object, np.ndarray]] = {}  # destination -> in flight
        self.skipped = 0

    def _post(self) -> None:
        self._recv = self.world.comm.Irecv([self._buf, MPI.BYTE], source=MPI.ANY_SOURCE,
                                           tag=_ASYNC_TAG)

    def send(self, step: int, flat: np.ndarray, to_clients: list[int]) -> None:
        header = np.array([(step, self.world.client, flat.size, time.time())],
                          dtype=_ASYNC_HEADER)
        buf = np.concatenate([header.view(np.uint8), flat.astype(np.float32).view(np.uint8)])
        for dest in to_clients:
            busy = self._sends.get(dest)
            if busy is not None and not busy[0].Test():
                self.skipped += 1  # the last one has not even left: this one would queue
                continue
            request = self.world.comm.Isend([buf, MPI.BYTE], dest=self.world.rank_of_client(dest),
                                            tag=_ASYNC_TAG)
            self._sends[dest] = (request, buf)  # the buffer must outlive the send
            self.bytes_sent += buf.nbytes

    def arrived(self) -> list[tuple[int, int, float, np.ndarray]]:
        """Every checkpoint that has arrived since the last call: (sender, its step, seconds
        since it was sent, weights), in arrival order; never waits."""
        if self._recv is None:
            self._post()
        out = []
        status = new_status(self.world.comm)
        while self._recv.Test(status):
            nbytes = status.Get_count(MPI.BYTE)
            header = self._buf[:_ASYNC_HEADER.itemsize].view(_ASYNC_HEADER)[0]
            count = int(header["count"])
            if nbytes != _ASYNC_HEADER.itemsize + 4 * count:
                raise ExchangeError(f"{self.world.where()}: a checkpoint from client "
                                    f"{int(header['sender'])} has {nbytes} bytes, its header "
                                    f"says {count} values")
            flat = self._buf[_ASYNC_HEADER.itemsize:nbytes].view(np.float32).copy()
            out.append((int(header["sender"]), int(header["step"]),
                        time.time() - float(header["sent_at"]), flat))
            self.bytes_received += nbytes
            self._post()
        self._sends = {d: s for d, s in self._sends.items() if not s[0].Test()}
        return out

    def sends_done(self) -> bool:
        self._sends = {d: s for d, s in self._sends.items() if not s[0].Test()}
        return not self._sends

    def close(self) -> None:
        """The last receive, which nobody will match any more, is cancelled (every sender is
        done: the caller agreed on that with everyone)."""
        if self._recv is not None:
            self._recv.Cancel()
            self._recv.Wait()
            self._recv = None


_PROGRESS_TAG = 20


class LeadBound:
    """Bounded staleness for ``exchange.pool_async`` (``exchange.pool_max_lead``): leaders tell
    every other leader their step (16 bytes, every ``every`` steps and whenever they are about
    to wait), and a client at step ``s`` waits while ``s > ratio * m + every``, ``m`` the
    lowest step it has heard of from any other client. Fast clients then stay within ``ratio``
    times the slowest one's progress, so their teachers are never much less trained than they
    are; the slowest client never waits (every peer is ahead of it), so there is no deadlock.

    ``ratio`` bounds the speed-up over lock-step as well: it is the trade the option makes."""

    def __init__(self, world: World, ratio: float, every: int, timeout_s: float):
        self.world, self.ratio, self.every, self.timeout_s = world, ratio, every, timeout_s
        others = [c for c in range(world.layout.num_clients) if c != world.client]
        self.known = {c: 0 for c in others}  # the latest step heard of, per client
        self._buf = np.empty(2, dtype=np.int64)
        self._recv = None
        self._sends: list = []
        self._told = -1  # the last step this client reported
        self.wait_seconds = 0.0

    def _tell(self, step: int) -> None:
        if step == self._told:
            return
        self._told = step
        msg = np.array([self.world.client, step], dtype=np.int64)
        for c in self.known:
            self._sends.append((self.world.comm.Isend([msg, MPI.INT64_T],
                                                      dest=self.world.rank_of_client(c),
                                                      tag=_PROGRESS_TAG), msg))
        self._sends = [s for s in self._sends if not s[0].Test()]

    def _hear(self) -> None:
        if self._recv is None:
            self._recv = self.world.comm.Irecv([self._buf, MPI.INT64_T], source=MPI.ANY_SOURCE,
                                               tag=_PROGRESS_TAG)
        while self._recv.Test():
            client, step = int(self._buf[0]), int(self._buf[1])
            self.known[client] = max(self.known[client], step)
            self._recv = self.world.comm.Irecv([self._buf, MPI.INT64_T],
                                               source=MPI.ANY_SOURCE, tag=_PROGRESS_TAG)

    def slowest(self) -> int:
        """The lowest step heard of from any other client (0 before the first report)."""
        return min(self.known.values(), default=0)

    def allows(self, step: int) -> bool:
        return step <= self.ratio * self.slowest() + self.every

    def begin_step(self, step: int) -> None:
        """Report at refresh steps, then wait (polling, never past ``timeout_s``) until the
        slowest client is close enough. Leaders only: a client's other ranks follow it through
        their gradient all-reduce."""
        if step % self.every == 0 or self._told < 0:
            self._tell(step)
        self._hear()
        if self.allows(step) or not self.known:
            return
        self._tell(step)  # a waiting client's step must be known: the others may wait on it
        t0 = time.perf_counter()

        def near() -> bool:
            self._hear()
            return self.allows(step)

        def late() -> str:
            c = min(self.known, key=self.known.get)
            return (f"{self.world.where()} waited {self.timeout_s:.0f} s at step {step} for "
                    f"client {c} (last heard at step {self.known[c]}) to come within "
                    f"exchange.pool_max_lead={self.ratio:g} (exchange.timeout_s)")
        wait_until(near, self.timeout_s, late)
        self.wait_seconds += time.perf_counter() - t0

    def sends_done(self) -> bool:
        self._hear()  # keep draining: the others may still report while they finish
        self._sends = [s for s in self._sends if not s[0].Test()]
        return not self._sends

    def close(self) -> None:
        """After every rank agreed that all sends have left: drain, then cancel the receive."""
        self._hear()
        if self._recv is not None:
            self._recv.Cancel()
            self._recv.Wait()
            self._recv = None
