"""The checkpoint pool of the paper's Algorithm 2 (``exchange.mode: pool``), without MPI.

Each client keeps up to N_P peer checkpoints. Every S_P steps it receives a fresh checkpoint of
one in-neighbour (``refresh_sources`` says whom, from the shared seed, so senders know their
receivers without negotiation); the checkpoint fills a free slot or replaces a random entry.
Each step the client draws Delta entries and runs them on the public batch to get distillation
targets, so clients never wait for each other step by step (the transfers run in the
background, see ``exchange.WeightTransfer``).

Weights travel as one flat float32 vector; the receiver rebuilds the peer's model from its
architecture name (``clients.arch``), which also makes heterogeneous peers work. The pool is
saved to HDF5 with every checkpoint (``pools/client_NNN/step_*.h5``: per entry the tensors as
datasets plus source client, source step and architecture), so a resumed run continues with the
pool it had at that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mhd_hpc.runtime.seeds import POOL_DRAW, POOL_REFRESH, POOL_SLOT
from mhd_hpc.runtime.tensors import flatten, total_numel, unflatten_into


def flatten_state(model: torch.nn.Module) -> np.ndarray:
    """All of a model's state (parameters and buffers) as one contiguous float32 vector."""
    return flatten(list(model.state_dict().values()), "cpu").numpy()


def state_size(model: torch.nn.Module) -> int:
    """Length of ``flatten_state(model)``, without copying."""
    return total_numel(list(model.state_dict().values()))


def load_flat_state(model: torch.nn.Module, flat: np.ndarray) -> None:
    """Inverse of ``flatten_state``: shapes and dtypes come from ``model`` itself."""
    if flat.size != state_size(model):
        raise ValueError(f"flat state has {flat.size} values, {type(model).__name__} needs "
                         f"{state_size(model)}")
    unflatten_into(torch.from_numpy(flat), list(model.state_dict().values()))


@dataclass
class PoolEntry:
    """One peer checkpoint: a ready-to-run model plus where and when it came from."""

    source_client: int
    source_step: int
    arch: str
    model: torch.nn.Module
    made_at: float = float("nan")  # wall-clock time the sender sent it (pool_async)


def refresh_sources(in_neighbours: list[list[int]], step: int, seed: int) -> list[int]:
    """For every client, the in-neighbour whose checkpoint it receives at refresh ``step``
    (-1 when it has none). Pure and identical on every rank."""
    out = []
    for i, nbrs in enumerate(in_neighbours):
        rng = np.random.default_rng([seed, POOL_REFRESH, i, step])
        out.append(int(nbrs[rng.integers(len(nbrs))]) if nbrs else -1)
    return out


class CheckpointPool:
    """A client's rolling pool of at most ``capacity`` peer checkpoints."""

    def __init__(self, capacity: int, client: int, seed: int,
                 build: Callable[[str], torch.nn.Module]):
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        self.capacity, self.client, self.seed = capacity, client, seed
        self.build = build  # arch name -> fresh model of that architecture
        self.entries: list[PoolEntry] = []

    def insert(self, step: int, source_client: int, source_step: int, arch: str,
               flat: np.ndarray, made_at: float = float("nan"), same_source: bool = False
               ) -> int:
        """Add a checkpoint received at ``step``; returns the slot it went to.

        ``same_source`` (``pool_async``): a full pool replaces this source's oldest entry when
        it holds one, else a random entry. Clients at their own pace send at different rates;
        with random replacement a fast sender's checkpoints would crowd a slow one's out of the
        pool (its share of the entries is its share of the arrivals), and with it what only the
        slow client knows. Lock-step senders send equally often: the paper's random rule."""
        model = self.build(arch)
        load_flat_state(model, flat)
        model.eval()  # targets come from the peer's inference mode (BN running statistics)
        entry = PoolEntry(source_client, source_step, arch, model, made_at)
        if len(self.entries) < self.capacity:
            self.entries.append(entry)
            return len(self.entries) - 1
        own = ([n for n, e in enumerate(self.entries) if e.source_client == source_client]
               if same_source else [])
        if own:
            slot = min(own, key=lambda n: self.entries[n].source_step)
        else:
            slot = int(np.random.default_rng([self.seed, POOL_SLOT, self.client, step])
                       .integers(self.capacity))
        self.entries[slot] = entry
        return slot

    def draw(self, step: int, count: int) -> list[PoolEntry]:
        """``count`` distinct entries for this step (fewer while the pool is filling)."""
        if not self.entries:
            return []
        rng = np.random.default_rng([self.seed, POOL_DRAW, self.client, step])
        picks = rng.choice(len(self.entries), size=min(count, len(self.entries)), replace=False)
        return [self.entries[int(p)] for p in sorted(picks)]

    # -- persistence (same atomic HDF5 files and rotation as the checkpoints) ----------------
    def state(self) -> dict:
        return {"entries": [{"source_client": e.source_client, "source_step": e.source_step,
                             "arch": e.arch, "weights": torch.from_numpy(flatten_state(e.model))}
                            for e in self.entries]}

    def load_state(self, state: dict) -> None:
        self.entries = []
        for n, e in enumerate(state["entries"]):
            model = self.build(e["arch"])
            try:
                load_flat_state(model, e["weights"].numpy())
            except ValueError as exc:
                raise ValueError(f"pool entry {n} (client {e['source_client']}, "
                                 f"{e['arch']}): {exc}") from None
            model.eval()
            self.entries.append(PoolEntry(e["source_client"], e["source_step"], e["arch"], model))

