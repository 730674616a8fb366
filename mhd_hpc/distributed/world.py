"""MPI start-up, the rank -> client mapping, and the collectives the training loop needs.

With ``exchange.py`` and ``transfer.py`` beside it, the only module that imports mpi4py, and the
only place that knows global ranks: everything else talks about clients and client-local ranks.
A client is a contiguous block of ranks (``ClientLayout``) with its own communicator; client-local rank 0, the
leader, evaluates, checkpoints and speaks for the client where a message concerns all of it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mpi4py import MPI  # noqa: E402  (before any torch.distributed use: they coexist that way)

from mhd_hpc.distributed.p2p import new_status
from mhd_hpc.runtime.files import storage_full
from mhd_hpc.runtime.tensors import flatten, unflatten_into


@dataclass(frozen=True)
class ClientLayout:
    """Which global ranks form which client."""

    ranks_of_client: tuple[tuple[int, ...], ...]

    @classmethod
    def one_rank_per_client(cls, num_clients: int) -> "ClientLayout":
        return cls(tuple((c,) for c in range(num_clients)))

    @classmethod
    def contiguous(cls, ranks_per_client: Sequence[int]) -> "ClientLayout":
        """Client c gets the next ``ranks_per_client[c]`` ranks, so a client's ranks sit on as
        few nodes as possible (mpirun/srun fill nodes with consecutive ranks by default)."""
        out, start = [], 0
        for n in ranks_per_client:
            out.append(tuple(range(start, start + n)))
            start += n
        return cls(tuple(out))

    @property
    def num_clients(self) -> int:
        return len(self.ranks_of_client)

    def client_of(self, rank: int) -> int:
        for client, ranks in enumerate(self.ranks_of_client):
            if rank in ranks:
                return client
        raise KeyError(f"rank {rank} belongs to no client")

    def leader(self, client: int) -> int:
        """The rank that speaks for ``client`` when a message concerns the whole client."""
        return self.ranks_of_client[client][0]

    def size_of(self, client: int) -> int:
        return len(self.ranks_of_client[client])


class World:
    """This rank's view of the job: its client, and collectives over all ranks."""

    def __init__(self, comm: Any = None):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.layout: ClientLayout | None = None
        self.client = -1
        self.client_comm: Any = None  # the ranks of this rank's client
        self.local_rank, self.local_size = 0, 1
        self._slice_comm: Any = None  # ranks with the same client-local rank (FedMD)
        self._to_root: list = []  # non-blocking sends to the root still in flight
        self._root_own: dict[int, list] = {}  # what the root posted to itself, by tag

    # -- mapping -----------------------------------------------------------------------------
    def assign_clients(self, layout: ClientLayout) -> None:
        """Collective: every rank must call it with the same layout."""
        self.layout = layout
        self.client = layout.client_of(self.rank)
        self.client_comm = self.comm.Split(color=self.client, key=self.rank)
        self.local_rank, self.local_size = self.client_comm.Get_rank(), self.client_comm.Get_size()
        assert layout.ranks_of_client[self.client][self.local_rank] == self.rank

    @property
    def is_leader(self) -> bool:
        """Client-local rank 0: evaluates, checkpoints and speaks for the client."""
        return self.local_rank == 0

    def peer_rank(self, client: int, local_rank: int) -> int:
        """Global rank of ``client``'s client-local rank ``local_rank``."""
        assert self.layout is not None, "assign_clients() first"
        return self.layout.ranks_of_client[client][local_rank]

    def node_local_rank(self) -> int:
        """Rank among the ranks on this node (for GPU placement), from MPI itself rather than
        launcher-specific environment variables."""
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def rank_of_client(self, client: int) -> int:
        assert self.layout is not None, "assign_clients() first"
        return self.layout.leader(client)

    def where(self) -> str:
        """'rank 2 (client 1)' for messages."""
        return f"rank {self.rank}" + (f" (client {self.client})" if self.client >= 0 else "")

    # -- inside one client (blocking collectives over the client's ranks) ------------------------
    def client_bcast_array(self, array: np.ndarray) -> np.ndarray:
        """Leader's array to every rank of the client (same shape and dtype everywhere)."""
        if self.local_size > 1:
            self.client_comm.Bcast(array, root=0)
        return array

    def client_gather_bytes(self, buf: np.ndarray) -> np.ndarray | None:
        """Equal-size uint8 buffers of all client ranks, stacked on the leader (else None)."""
        out = np.empty((self.local_size, buf.size), dtype=np.uint8) if self.is_leader else None
        self.client_comm.Gather(buf, out, root=0)
        return out

    def client_scatter_bytes(self, bufs: np.ndarray | None, size: int) -> np.ndarray:
        """Row r of the leader's (local_size, size) uint8 array to client rank r."""
        out = np.empty(size, dtype=np.uint8)
        self.client_comm.Scatter(bufs, out, root=0)
        return out

    def client_bcast(self, obj: Any) -> Any:
        """Leader's (small, pickled) object to every rank of the client."""
        return self.client_comm.bcast(obj, root=0)

    def client_allgather(self, obj: Any) -> list:
        return self.client_comm.allgather(obj)

    # -- small collectives (pickled; never on the per-step hot path) -------------------------
    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list | None:
        return self.comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    # -- tensor collectives (contiguous buffers, no pickle) ----------------------------------
    def clients_mean_(self, tensors: Sequence[torch.Tensor]) -> int:
        """Make ``tensors`` (the same on every rank of a client, or its ranks' shares of one
        batch) the mean over *clients*, in place, on every rank: one MPI Allreduce of a flat
        float32 buffer (FedAvg weights, supervised-baseline gradients). Each rank contributes
        its value / its client's rank count, so a client weighs the same whatever its rank
        count. Returns the bytes this rank sent (see ``_mean_over``)."""
        return _mean_over(self.comm, tensors, share=1.0 / self.local_size,
                          divisor=self.layout.num_clients if self.layout else self.size)

    def across_clients_mean_(self, tensors: Sequence[torch.Tensor]) -> int:
        """Average ``tensors`` in place over the ranks with this rank's client-local rank, one
        per client (every client must have the same number of ranks): the mean over clients of
        each rank's slice of a common batch. Returns bytes sent."""
        if self._slice_comm is None:  # collective: every rank creates it at the same call
            self._slice_comm = self.comm.Split(color=self.local_rank, key=self.rank)
        return _mean_over(self._slice_comm, tensors)

    # -- to the root without waiting (clients at their own pace) ---------------------------
    def post_to_root(self, obj: Any, tag: int) -> None:
        """``obj`` (small, pickled) to the root without waiting for it to be received; the
        root keeps its own. (Log rows and evaluations of clients that run at their own pace.)"""
        if self.is_root:
            self._root_own.setdefault(tag, []).append(obj)
            return
        self._to_root = [r for r in self._to_root if not r.Test()]
        self._to_root.append(self.comm.isend(obj, dest=0, tag=tag))

    def root_collect(self, tag: int) -> list:
        """Root: everything posted with ``tag`` that has arrived (its own first)."""
        out = self._root_own.pop(tag, [])
        status = new_status(self.comm)
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
            out.append(self.comm.recv(source=status.Get_source(), tag=tag))
        return out

    def settle_posts(self, timeout_s: float) -> None:
        """Wait until every post to the root has left (the end of a run)."""
        from mhd_hpc.distributed.p2p import wait_until

        wait_until(lambda: all(r.Test() for r in self._to_root), timeout_s,
                   lambda: f"{self.where()}: log rows to the root still unsent after "
                           f"{timeout_s:.0f} s")
        self._to_root = []

    def max_over_ranks(self, value: float) -> float:
        return float(self.comm.allreduce(value, op=MPI.MAX))

    def stop_vote(self, within_client: bool) -> "StopVote":
        """Collective (over all ranks): a :class:`StopVote` among all ranks, or, for clients
        at their own pace (``within_client``), among each client's ranks."""
        return StopVote(self.client_comm if within_client else self.comm)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn an exception on any rank into a job-wide stop.

        A rank that dies while its peers sit in Recv/Allreduce would leave them waiting forever;
        ``MPI_Abort`` takes every rank down within seconds, after this rank printed who it is and
        what went wrong.
        """
        try:
            yield
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - report and abort on anything, Ctrl-C too
            sys.stdout.flush()
            full = storage_full(exc)
            if full is not None:  # not a bug: no traceback, what to do instead
                sys.stderr.write(
                    f"\n[mhd_hpc] FATAL on {self.where()} of {self.size}: the disk is full "
                    f"({full}). Files written before are intact (every write goes to a "
                    f"temporary file first): free space or raise the quota, then rerun the "
                    f"same command to resume from the last checkpoint.\n")
            else:
                sys.stderr.write(f"\n[mhd_hpc] FATAL on {self.where()} of {self.size}:\n"
                                 f"{traceback.format_exc()}")
            sys.stderr.flush()
            if self.size > 1:
                self.abort(1)
            raise


class StopVote:
    """The ranks agree on the step to stop at without waiting for each other every step: the
    vote of step t (any rank has a stop signal?) is a non-blocking allreduce started at step
    t and completed at step t + 1, by which time every rank has long entered it. So all ranks
    stop at the same step, one after the first signal was seen, for the cost of one tiny
    allreduce per step on a communicator of its own (it never meets the job's collectives)."""

    def __init__(self, comm) -> None:
        self.comm = comm.Dup()
        self._mine, self._any = np.zeros(1, np.int32), np.zeros(1, np.int32)
        self._pending = None

    def step(self, received: int | None) -> int:
        """Called once per step by every rank of the communicator with the stop signal it has
        received (its number, or None): the largest signal number the vote of the previous
        step found (0: none), the same on every rank, which then stops at this step (the root
        can name a signal that only another rank received)."""
        agreed = 0
        if self._pending is not None:
            self._pending.Wait()
            agreed = int(self._any[0])
        self._mine[0] = int(received or 0)
        self._pending = self.comm.Iallreduce(self._mine, self._any, op=MPI.MAX)
        return agreed

    def close(self) -> None:
        """Collective: complete the vote in flight and free the communicator (a clean end)."""
        if self._pending is not None:
            self._pending.Wait()
            self._pending = None
        self.comm.Free()


def _mean_over(comm, tensors: Sequence[torch.Tensor], share: float = 1.0,
               divisor: int | None = None) -> int:
    """``sum over comm of (tensors * share) / divisor`` (default: the plain mean over ``comm``)
    in place, with one Allreduce of a flat float32 buffer. Returns the bytes this rank sends
    with the bandwidth-optimal (ring) allreduce of N bytes over P ranks, 2 (P - 1) / P * N: the
    upload of its part and the download of the result, what a parameter server would also
    move per client."""
    if not tensors:
        return 0
    # Through host memory: MPI sees plain CPU buffers whatever device the tensors are on.
    flat = flatten(tensors, "cpu")
    if share != 1.0:
        flat *= share
    comm.Allreduce(MPI.IN_PLACE, [flat.numpy(), MPI.FLOAT], op=MPI.SUM)
    flat /= comm.Get_size() if divisor is None else divisor
    unflatten_into(flat, tensors)
    p = comm.Get_size()
    return int(2 * (p - 1) * flat.numel() * flat.element_size() / p)


def launcher_tasks() -> tuple[str, int | None]:
    """Who started this process and how many processes it started, from the launcher's
    environment: ``srun`` (a job step), ``sbatch`` (a batch script run without srun), ``mpirun``
    or unknown; for the world-size error's advice."""
    env = os.environ
    for var, name in (("SLURM_STEP_NUM_TASKS", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"),
                      ("PMIX_SIZE", "mpirun"), ("PMI_SIZE", "mpirun")):
        if env.get(var, "").isdigit():
            return name, int(env[var])
    if env.get("SLURM_NTASKS", "").isdigit():  # inside an allocation, but not in a step
        return "sbatch", None
    return "mpirun", None


def init_world() -> World:
    """Start MPI (mpi4py initialises it on import) and return this rank's view."""
    return World()
