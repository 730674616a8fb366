"""Data parallelism inside a client: Horovod or torch.distributed behind one small interface.

A client with several ranks is one model replicated over them. Each rank computes gradients on
its slice of the client's batches; ``average_`` makes the gradients (and, before evaluation and
checkpoints, the BatchNorm statistics) equal to their mean over the client's ranks, and
``broadcast_`` makes everything start from the leader's values. Replicas therefore stay
identical, which ``check_in_sync`` verifies at every checkpoint.

Backends (``backend.intra``), imported lazily so that a job that does not use one never needs it:

- ``horovod``: one Horovod process set per client (``hvd.init(process_sets=...)`` on every rank),
  ``grouped_allreduce_`` with ``op=Average`` and per-tensor ``broadcast_`` (0.28.1 has no
  ``process_set`` in ``broadcast_parameters``; its ``root_rank`` is a global rank), a global
  ``barrier`` before ``shutdown`` so that no set shuts Horovod down under another.
- ``torch``: ``torch.distributed`` over all ranks (rendezvous address and port chosen by rank 0
  and sent by MPI), one ``new_group`` per client; NCCL on GPU, gloo on CPU; gradients go in one
  flat buffer per allreduce.
- ``auto``: torch.distributed. Horovod is unmaintained in practice (last release 0.28.1, June
  2023; it builds against torch >= 2.1 only with the C++17 patch of tools/install_horovod.sh;
  Ray, Lightning and Databricks moved to torch.distributed), so it is used only when named.
  The choice is printed.

The gradient average is called explicitly after ``backward`` rather than hidden in a wrapped
optimizer (Horovod's ``DistributedOptimizer``, DDP): the supervised baseline averages again over
all clients after it, and every backend then keeps the same plain optimizer and checkpoints.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from mhd_hpc.runtime.tensors import flatten, unflatten_into
from mhd_hpc.config.choices import INTRA_BACKENDS  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # the world arrives as an argument; config imports INTRA_BACKENDS from here
    from mhd_hpc.distributed.world import World



class IntraBackend(Protocol):
    """What the training loop asks of data parallelism inside a client."""

    name: str

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make ``tensors`` equal to their mean over the client's ranks, in place."""

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make ``tensors`` equal to the leader's, in place."""

    def check_in_sync(self, model: torch.nn.Module, step: int) -> None:
        """Raise if the client's replicas hold different parameters."""

    def shutdown(self) -> None:
        """Release the backend (collective)."""


class SingleRank:
    """Clients of one rank: nothing to synchronise."""

    name = "none"

    def __init__(self, world: World):
        self.world = world

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def check_in_sync(self, model: torch.nn.Module, step: int) -> None:
        """Raise if the replicas of this client hold different parameters."""
        if self.world.local_size == 1:
            return
        sums = self.world.client_allgather(
            [float(p.detach().double().sum()) for p in model.parameters()])
        if any(s != sums[0] for s in sums[1:]):
            raise RuntimeError(f"{self.world.where()}: the {self.world.local_size} replicas of "
                               f"client {self.world.client} diverged by step {step} "
                               f"({self.name} data parallelism)")

    def shutdown(self) -> None:
        pass


class HorovodIntra(SingleRank):
    name = "horovod"

    def __init__(self, world: World):
        super().__init__(world)
        import horovod.torch as hvd  # after mpi4py: Horovod then reuses MPI and never finalises it

        assert world.layout is not None
        everyone = list(range(world.size))
        sets, mine = [], None
        for client, ranks in enumerate(world.layout.ranks_of_client):
            if list(ranks) == everyone:  # Horovod refuses a duplicate of the global set
                ps = hvd.global_process_set
            else:
                ps = hvd.ProcessSet(list(ranks))
                sets.append(ps)
            if client == world.client:
                mine = ps
        hvd.init(process_sets=sets)
        self.hvd, self.process_set = hvd, mine
        self.root = world.peer_rank(world.client, 0)  # Horovod's root_rank is a global rank
        self._calls = 0

    def average_(self, tensors):
        if self.world.local_size == 1 or not tensors:
            return
        self._calls += 1  # identical sequence on every rank of the client: names match up
        self.hvd.grouped_allreduce_(list(tensors), name=f"mhd.avg.{self._calls}",
                                    op=self.hvd.Average, process_set=self.process_set)

    def broadcast_(self, tensors):
        if self.world.local_size == 1:
            return
        self._calls += 1
        for n, t in enumerate(tensors):
            self.hvd.broadcast_(t, self.root, name=f"mhd.bcast.{self._calls}.{n}",
                                process_set=self.process_set)

    def shutdown(self):
        self.hvd.barrier()  # all sets done before any rank shuts Horovod down
        self.hvd.shutdown()


class TorchIntra(SingleRank):
    name = "torch"

    def __init__(self, world: World, device: torch.device, backend: str):
        """``backend``: ``nccl`` (GPUs, one per rank) or ``gloo`` (CPU, or ranks of a client
        sharing a GPU: tensors are staged through host memory)."""
        super().__init__(world)
        import torch.distributed as dist

        assert world.layout is not None
        hosts = world.allgather(socket.gethostname())
        addr, port = rendezvous(world.is_root, hosts)
        addr, port = world.bcast((addr, port))
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=world.rank,
                                world_size=world.size)
        mine = None
        for client, ranks in enumerate(world.layout.ranks_of_client):
            group = dist.new_group(list(ranks))  # collective: all ranks create every group
            if client == world.client:
                mine = group
        self.dist, self.group = dist, mine
        self.device = device if backend == "nccl" else torch.device("cpu")  # where buffers go
        self.root = world.peer_rank(world.client, 0)  # torch's src is a global rank too

    def average_(self, tensors):
        if self.world.local_size == 1 or not tensors:
            return
        flat = flatten(tensors, self.device)
        self.dist.all_reduce(flat, group=self.group)
        flat /= self.world.local_size
        unflatten_into(flat, tensors)

    def broadcast_(self, tensors):
        if self.world.local_size == 1 or not tensors:
            return
        flat = flatten(tensors, self.device)
        self.dist.broadcast(flat, src=self.root, group=self.group)
        unflatten_into(flat, tensors)

    def shutdown(self):
        self.dist.barrier()
        self.dist.destroy_process_group()


def rendezvous(is_root: bool, hosts: list[str]) -> tuple[str | None, int | None]:
    """Root: where torch.distributed's ranks meet. ``MASTER_ADDR`` / ``MASTER_PORT`` when set
    (torch's own names: the address of an interface every node reaches, a port the site's
    firewall allows); otherwise loopback on one node, rank 0's host name on several (it must
    resolve to a reachable interface everywhere), and a free port found by binding (a small
    race window: set MASTER_PORT where other jobs share the node)."""
    if not is_root:
        return None, None
    env_addr, env_port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    addr = env_addr or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
    if env_port:
        return addr, int(env_port)
    with socket.socket() as s:
        s.bind(("", 0))
        return addr, s.getsockname()[1]


def horovod_import_error() -> str | None:
    """None when ``horovod.torch`` imports, else why not."""
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def make_intra(kind: str, world: World, device: torch.device,
               gpus: Sequence[tuple[str, str]] = ()) -> tuple[IntraBackend, str]:
    """The data-parallel backend for this job, and a line saying what was chosen and why.
    ``gpus``: per rank, the host and identity of the GPU it uses (``devices.place``): NCCL
    refuses two ranks of one group on one GPU, so such clients average with gloo instead."""
    from mhd_hpc.runtime.devices import clients_sharing_a_gpu
    from mhd_hpc.errors import ConfigError

    assert world.layout is not None
    if max(len(r) for r in world.layout.ranks_of_client) == 1:
        return SingleRank(world), "one rank per client: no intra-client data parallelism"
    shared = (clients_sharing_a_gpu([list(r) for r in world.layout.ranks_of_client], gpus)
              if device.type == "cuda" else [])
    if kind == "auto":  # the maintained backend; Horovod only when asked for by name
        kind, why = "torch", "backend.intra=auto"
    else:
        why = f"backend.intra={kind}"
    if kind == "horovod":
        if shared:
            raise ConfigError("backend.intra", f"clients {shared} have several ranks on one GPU "
                              "(more ranks than GPUs on a node), which Horovod's NCCL "
                              "allreduce cannot serve: use backend.intra=torch (it falls back "
                              "to gloo), or give each rank its own GPU")
        return HorovodIntra(world), f"{why} -> Horovod process sets"
    if device.type != "cuda":
        return TorchIntra(world, device, "gloo"), f"{why} -> torch.distributed (gloo) subgroups"
    if shared:
        return TorchIntra(world, device, "gloo"), (
            f"{why} -> torch.distributed with gloo, not NCCL: the ranks of clients {shared} "
            "share a GPU (NCCL refuses duplicate GPUs); gradients are averaged through host "
            "memory, slower: give each rank its own GPU for NCCL")
    return TorchIntra(world, device, "nccl"), f"{why} -> torch.distributed (nccl) subgroups"
