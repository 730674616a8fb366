"""Several whole clients in one MPI process (``clients.per_rank: N``).

Each hosted client runs the ordinary training loop in a thread of its own, with a
:class:`~mhd_hpc.distributed.world.World` over a :class:`VirtualComm`: a communicator whose
ranks are clients, not processes, and which answers the part of mpi4py's interface the
framework uses (point-to-point with buffers or objects, probes, blocking and non-blocking
collectives, Split and Dup). The rest of the code cannot tell a hosted client from a rank.

Why threads and not a rewritten loop: the loop, the exchange, the pool and the reports stay one
implementation. Why they still step in turn: a process-wide *baton* lets one hosted client run
at a time; a client gives it up only while it waits for a message (``Poller.pause`` and every
wait here call :meth:`HostedProcess.yield_turn`). So the clients of a process never compete for
its cores or the GIL, torch gets the process's threads, and what a client computes depends on
(seed, client) alone, never on how the threads were scheduled.

Messages between clients of one process are copied from mailbox to mailbox; messages to clients
of another process travel as one pickled envelope ``(communicator, source, destination, tag,
payload)`` over a duplicate of ``COMM_WORLD``, in order (MPI does not let two messages between
the same pair of processes overtake each other), and whoever waits moves them on (``progress``).
Calls into MPI happen with the baton held, so MPI sees one thread at a time.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from mpi4py import MPI

from mhd_hpc.distributed import p2p

__all__ = ["HostedProcess", "VirtualComm"]

_TAG = 23  # the MPI tag of every envelope between processes


def _own(payload: Any) -> Any:
    """A private copy, as a message through MPI would give the receiver."""
    if isinstance(payload, np.ndarray):
        return payload.copy()
    return pickle.loads(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def _as_bytes(spec: Any) -> np.ndarray:
    """The uint8 view of an mpi4py buffer spec ``[array, datatype]`` (or a bare array)."""
    array = spec[0] if isinstance(spec, (list, tuple)) else spec
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class HostedProcess:
    """What the hosted clients of one process share: the baton, the mailboxes, and the
    duplicate of the world communicator that carries envelopes between processes. Client
    ``v`` lives on process ``v // per_rank``."""

    def __init__(self, comm: Any, per_rank: int) -> None:
        self.real = comm.Dup()
        self.rank, self.per_rank = self.real.Get_rank(), per_rank
        self.num_clients = self.real.Get_size() * per_rank
        self.baton = threading.Lock()
        self._boxes: dict[tuple, list] = defaultdict(list)  # (comm id, vrank) -> messages
        self._sends: list = []  # envelopes still leaving
        self.posted: dict[tuple, list] = defaultdict(list)  # (comm id, vrank) -> receives
        self._status = MPI.Status()

    @property
    def hosted(self) -> range:
        """The virtual ranks (clients) of this process."""
        return range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)

    def world_comm(self, vrank: int) -> "VirtualComm":
        return VirtualComm(self, (), tuple(range(self.num_clients)), vrank)

    # -- messages ------------------------------------------------------------------------------
    def post(self, comm_id: tuple, src: int, dst: int, tag: Any, payload: Any) -> None:
        """Deliver (to a client of this process) or send (to another process's)."""
        process = dst // self.per_rank
        if process == self.rank:
            self._boxes[(comm_id, dst)].append((src, tag, _own(payload)))
        else:  # isend pickles at once: the payload may change after this returns
            self._sends.append(self.real.isend((comm_id, src, dst, tag, payload), dest=process,
                                               tag=_TAG))

    def progress(self) -> None:
        """Move arrived envelopes into their mailboxes; forget the sends that have left."""
        status = self._status
        while self.real.iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
            comm_id, src, dst, tag, payload = self.real.recv(source=status.Get_source(),
                                                             tag=_TAG)
            self._boxes[(comm_id, dst)].append((src, tag, payload))
        if self._sends:
            self._sends = [r for r in self._sends if not r.Test()]

    def find(self, comm_id: tuple, vrank: int, source: int, tag: Any, remove: bool = True,
             progress: bool = True) -> tuple | None:
        """The first message to ``vrank`` on ``comm_id`` from ``source`` with ``tag``
        (``MPI.ANY_SOURCE`` / ``MPI.ANY_TAG`` match any), or None. ``progress``: move arrived
        envelopes in first."""
        if progress:
            self.progress()
        box = self._boxes.get((comm_id, vrank))
        for i, (src, t, payload) in enumerate(box or ()):
            if (source == MPI.ANY_SOURCE or src == source) and (tag == MPI.ANY_TAG or t == tag):
                return box.pop(i) if remove else (src, t, payload)
        return None

    # -- taking turns ----------------------------------------------------------------------------
    def yield_turn(self, pause_s: float = 0.0) -> None:
        """Let the other hosted clients run while this one waits (the caller holds the baton)."""
        self.baton.release()
        try:
            if pause_s > 0:
                time.sleep(pause_s)
            else:
                os.sched_yield()
        finally:
            self.baton.acquire()

    @staticmethod
    def wait_for(done: Callable[[], bool]) -> None:
        """Until ``done()``, polling as every wait does (``p2p.Poller``, whose pauses hand the
        baton on while :meth:`run_clients` runs). Deadlines are the callers': a collective waits
        as MPI's would, the exchange polls with its own timeout."""
        poll = p2p.Poller()
        while not done():
            poll.pause()

    # -- the threads -----------------------------------------------------------------------------
    def run_clients(self, body: Callable[[int], int]) -> list[int]:
        """``body(vrank)`` for every hosted client, each in a thread, one at a time (the
        baton); returns their exit codes in client order. Waits in ``p2p`` give up the baton
        while the clients run. A client that raises has already brought the job down
        (``World.guard`` aborts)."""
        codes = [1] * self.per_rank

        def turn(i: int) -> None:
            with self.baton:
                codes[i] = body(self.hosted[i])

        threads = [threading.Thread(target=turn, args=(i,), name=f"client{v}", daemon=True)
                   for i, v in enumerate(self.hosted)]
        p2p.set_turn_yield(self.yield_turn)
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # (a bare join() would not see a signal's exception)
                    t.join(0.5)
        finally:
            p2p.set_turn_yield(None)
        return codes

    def close(self) -> None:
        """Collective over the processes: every envelope has left, then free the channel. A
        process enters a non-blocking barrier once its own sends are done and keeps receiving
        until every process has: a large envelope to it completes only when it is received."""
        barrier = None
        while barrier is None or not barrier.Test():
            self.progress()
            if barrier is None and not self._sends:
                barrier = self.real.Ibarrier()
            time.sleep(1e-4)
        self.real.Free()


class _Done:
    """A request complete when posted (sends: the payload was copied or pickled)."""

    def Test(self) -> bool:  # noqa: N802 - mpi4py's names
        return True

    def Wait(self) -> None:  # noqa: N802
        return None


class _Receive:
    """A posted receive: complete once a matching message is in the mailbox (copied into the
    buffer, or kept as the object). As in MPI, receives match messages in the order they were
    posted: a receive left behind (a late peer) takes the older message, not a newer one."""

    def __init__(self, comm: "VirtualComm", source: int, tag: Any, buf: np.ndarray | None):
        self.comm, self.source, self.tag, self.buf = comm, source, tag, buf
        self.done, self.value, self.got_from = False, None, -1
        self._queue = comm.proc.posted[(comm.id, comm.me)]
        self._queue.append(self)

    def Test(self, status: "_Status | None" = None) -> bool:  # noqa: N802
        if not self.done:
            proc = self.comm.proc
            proc.progress()  # once: a message must not arrive between two receives' turns
            for r in self._queue:  # the receives posted before this one match first
                if not r.done:
                    found = proc.find(self.comm.id, self.comm.me, r.source, r.tag,
                                      progress=False)
                    if found is not None:
                        r._fill(found)
                if r is self:
                    break
            self._queue[:] = [r for r in self._queue if not r.done]
        if self.done and status is not None:
            status.source = self.got_from
            status.nbytes = getattr(self.value, "nbytes", 0)
        return self.done

    def _fill(self, found: tuple) -> None:
        self.got_from, _, payload = found
        if self.buf is not None:
            self.buf[:payload.size] = payload
        self.value, self.done = payload, True

    def Wait(self) -> Any:  # noqa: N802
        self.comm.proc.wait_for(self.Test)
        return self.value

    def Cancel(self) -> None:  # noqa: N802
        """Nothing will match any more (the caller agreed on that with every sender)."""
        self.done = True
        if self in self._queue:
            self._queue.remove(self)


class _Allreduce:
    """A non-blocking allreduce: contributions go to rank 0, which reduces once it has all of
    them (when it next tests) and sends the result back."""

    def __init__(self, comm: "VirtualComm", mine: np.ndarray, out: np.ndarray, op: Any):
        self.comm, self.out, self.op, self.done = comm, out, op, False
        self.tag = comm.next_tag()
        self.parts: dict[int, np.ndarray] = {0: mine.copy()} if comm.rank == 0 else {}
        if comm.rank != 0:
            comm.send_to(0, self.tag, mine.copy())

    def Test(self) -> bool:  # noqa: N802
        c = self.comm
        if self.done:
            return True
        if c.rank != 0:
            found = c.proc.find(c.id, c.me, 0, self.tag)
            if found is None:
                return False
            self.out[...] = found[2]
        else:
            for i in range(1, c.size):
                if i not in self.parts:
                    found = c.proc.find(c.id, c.me, i, self.tag)
                    if found is None:
                        return False
                    self.parts[i] = found[2]
            result = _reduce([self.parts[i] for i in range(c.size)], self.op)
            for i in range(1, c.size):
                c.send_to(i, self.tag, result)
            self.out[...] = result
        self.done = True
        return True

    def Wait(self) -> None:  # noqa: N802
        self.comm.proc.wait_for(self.Test)


class _Status:
    """What ``iprobe`` fills in: the source and the size of the message."""

    def __init__(self) -> None:
        self.source, self.nbytes = -1, 0

    def Get_source(self) -> int:  # noqa: N802
        return self.source

    def Get_count(self, datatype: Any = MPI.BYTE) -> int:  # noqa: N802
        return self.nbytes // datatype.Get_size()


def _reduce(parts: list, op: Any) -> Any:
    """``op`` over ``parts`` in rank order (the same order on every run)."""
    if op == MPI.SUM:
        out = parts[0].copy() if isinstance(parts[0], np.ndarray) else parts[0]
        for p in parts[1:]:
            out = out + p
        return out
    if op == MPI.MAX:
        return np.maximum.reduce(parts) if isinstance(parts[0], np.ndarray) else max(parts)
    if op == MPI.MIN:
        return np.minimum.reduce(parts) if isinstance(parts[0], np.ndarray) else min(parts)
    raise NotImplementedError(f"hosted clients: reduction {op} is not supported")


class VirtualComm:
    """A communicator of hosted clients with mpi4py's names. Blocking collectives gather at
    rank 0 and send the result back (they are never on a step's hot path); every call waits
    through :meth:`HostedProcess.wait_for`, so the other clients of the process run meanwhile."""

    def __init__(self, proc: HostedProcess, comm_id: tuple, members: tuple[int, ...], me: int):
        self.proc, self.id, self.members, self.me = proc, comm_id, members, me
        self.rank, self.size = members.index(me), len(members)
        self._calls = 0  # collectives so far: every member counts the same

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def next_tag(self) -> tuple:
        self._calls += 1
        return ("collective", self._calls)

    def send_to(self, dest: int, tag: Any, payload: Any) -> None:
        self.proc.post(self.id, self.rank, self.members[dest], tag, payload)

    def _receive(self, source: int, tag: Any) -> Any:
        return _Receive(self, source, tag, None).Wait()

    # -- point to point --------------------------------------------------------------------------
    def Isend(self, spec: Any, dest: int, tag: int) -> _Done:  # noqa: N802
        self.send_to(dest, tag, _as_bytes(spec))
        return _Done()

    def Irecv(self, spec: Any, source: int, tag: int) -> _Receive:  # noqa: N802
        return _Receive(self, source, tag, _as_bytes(spec))

    def isend(self, obj: Any, dest: int, tag: int) -> _Done:
        self.send_to(dest, tag, obj)
        return _Done()

    def iprobe(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
               status: _Status | None = None) -> bool:
        found = self.proc.find(self.id, self.me, source, tag, remove=False)
        if found is not None and status is not None:
            status.source = found[0]
            status.nbytes = found[2].nbytes if isinstance(found[2], np.ndarray) else 0
        return found is not None

    def recv(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Any:
        return self._receive(source, tag)

    @staticmethod
    def new_status() -> _Status:
        return _Status()

    # -- collectives -----------------------------------------------------------------------------
    def gather(self, obj: Any, root: int = 0) -> list | None:
        tag = self.next_tag()
        if self.rank != root:
            self.send_to(root, tag, obj)
            return None
        return [obj if i == root else self._receive(i, tag) for i in range(self.size)]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        tag = self.next_tag()
        if self.rank != root:
            return self._receive(root, tag)
        for i in range(self.size):
            if i != root:
                self.send_to(i, tag, obj)
        return obj

    def allgather(self, obj: Any) -> list:
        return self.bcast(self.gather(obj))

    def allreduce(self, value: Any, op: Any = MPI.SUM) -> Any:
        parts = self.gather(value)
        return self.bcast(_reduce(parts, op) if parts is not None else None)

    def Barrier(self) -> None:  # noqa: N802
        self.allgather(None)

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM) -> None:  # noqa: N802
        out = recvbuf[0] if isinstance(recvbuf, (list, tuple)) else recvbuf
        mine = out if sendbuf is MPI.IN_PLACE else (
            sendbuf[0] if isinstance(sendbuf, (list, tuple)) else sendbuf)
        out[...] = self.allreduce(np.array(mine, copy=True), op)

    def Iallreduce(self, sendbuf: np.ndarray, recvbuf: np.ndarray,  # noqa: N802
                   op: Any = MPI.SUM) -> _Allreduce:
        return _Allreduce(self, sendbuf, recvbuf, op)

    def Bcast(self, array: np.ndarray, root: int = 0) -> None:  # noqa: N802
        array[...] = self.bcast(array if self.rank == root else None, root)

    def Gather(self, buf: np.ndarray, out: np.ndarray | None, root: int = 0) -> None:  # noqa: N802
        parts = self.gather(buf, root)
        if parts is not None:
            out[...] = np.stack(parts)

    def Scatter(self, bufs: np.ndarray | None, out: np.ndarray,  # noqa: N802
                root: int = 0) -> None:
        tag = self.next_tag()
        if self.rank == root:
            for i in range(self.size):
                if i != root:
                    self.send_to(i, tag, np.ascontiguousarray(bufs[i]))
            out[...] = bufs[root]
        else:
            out[...] = self._receive(root, tag)

    def Split(self, color: int, key: int = 0) -> "VirtualComm":  # noqa: N802
        chosen = self.allgather((color, key))
        members = tuple(self.members[i] for i in sorted(range(self.size),
                                                        key=lambda i: (chosen[i][1], i))
                        if chosen[i][0] == color)
        return VirtualComm(self.proc, (*self.id, ("split", self._calls, color)), members,
                           self.me)

    def Dup(self) -> "VirtualComm":  # noqa: N802
        self.Barrier()  # collective, as MPI's: every member counts the same calls
        return VirtualComm(self.proc, (*self.id, ("dup", self._calls)), self.members, self.me)

    def Free(self) -> None:  # noqa: N802
        return None

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        self.proc.real.Abort(code)
