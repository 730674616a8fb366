"""MPI start-up, the rank -> client mapping, and the collectives the training loop needs.

This is the only module (with ``exchange.py``) that imports mpi4py, and the only place that knows
global ranks: everything else talks about clients. Today a client is one rank; the mapping lives
in ``ClientLayout`` so that multi-rank clients change this file, not the loop.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from mpi4py import MPI  # noqa: E402  (imported before any torch.distributed use, see environment.md)


@dataclass(frozen=True)
class ClientLayout:
    """Which global ranks form which client."""

    ranks_of_client: tuple[tuple[int, ...], ...]

    @classmethod
    def one_rank_per_client(cls, num_clients: int) -> "ClientLayout":
        return cls(tuple((c,) for c in range(num_clients)))

    @property
    def num_clients(self) -> int:
        return len(self.ranks_of_client)

    def client_of(self, rank: int) -> int:
        for client, ranks in enumerate(self.ranks_of_client):
            if rank in ranks:
                return client
        raise KeyError(f"rank {rank} belongs to no client")

    def leader(self, client: int) -> int:
        """The rank that speaks for ``client`` in the inter-client exchange."""
        return self.ranks_of_client[client][0]


class World:
    """This rank's view of the job: its client, and collectives over all ranks."""

    def __init__(self, comm: Any = None):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.layout: ClientLayout | None = None
        self.client = -1

    # -- mapping -----------------------------------------------------------------------------
    def assign_clients(self, layout: ClientLayout) -> None:
        self.layout = layout
        self.client = layout.client_of(self.rank)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def rank_of_client(self, client: int) -> int:
        assert self.layout is not None, "assign_clients() first"
        return self.layout.leader(client)

    def where(self) -> str:
        """'rank 2 (client 2)' for messages."""
        return f"rank {self.rank}" + (f" (client {self.client})" if self.client >= 0 else "")

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
    def allreduce_mean_(self, tensors: Sequence[torch.Tensor]) -> int:
        """Average ``tensors`` in place over all ranks with one MPI Allreduce of a flat float32
        buffer (FedAvg weights, supervised-baseline gradients). Returns bytes sent."""
        if not tensors:
            return 0
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]).numpy()
        self.comm.Allreduce(MPI.IN_PLACE, [flat, MPI.FLOAT], op=MPI.SUM)
        flat /= self.size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(torch.from_numpy(flat[offset:offset + n]).view_as(t))
            offset += n
        return flat.nbytes

    def max_over_ranks(self, value: float) -> float:
        return float(self.comm.allreduce(value, op=MPI.MAX))

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
        except BaseException:  # noqa: BLE001 - report and abort on anything, KeyboardInterrupt too
            sys.stdout.flush()
            sys.stderr.write(f"\n[mhd_hpc] FATAL on {self.where()} of {self.size}:\n"
                             f"{traceback.format_exc()}")
            sys.stderr.flush()
            if self.size > 1:
                self.abort(1)
            raise


def init_world() -> World:
    """Start MPI (mpi4py initialises it on import) and return this rank's view."""
    return World()
