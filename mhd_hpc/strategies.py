"""What each ``method`` adds to the shared training step: how gradients are combined and which
collectives run between steps. Distillation targets come separately (``targets``).

* ``mhd`` and ``separate``: gradients averaged over the client's own replicas only.
* ``supervised`` (upper bound, one model on the union of all private batches): gradients averaged
  over all ranks every step.
* ``fedavg``: replicas average gradients; every ``fedavg.every`` steps all weights are averaged
  across clients (and once before the first step, so that every client starts identical).

Methods that share weights or gradients start every client from the same initialisation
(``shared_init``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # MPI-bound; config imports METHODS from here without starting MPI
    from mhd_hpc.distributed.intra import SingleRank
    from mhd_hpc.distributed.world import World

__all__ = ["METHODS", "Strategy", "make_strategy"]

METHODS = ("mhd", "separate", "fedavg", "supervised")


class Strategy:
    """``mhd`` / ``separate``: data parallelism inside the client, nothing across clients."""

    shared_init = False

    def __init__(self, world: World, intra: SingleRank):
        self.world, self.intra = world, intra
        self.bytes_sent = 0  # collective traffic across clients since the last take_bytes()

    def start(self, model: torch.nn.Module, resumed: bool) -> None:
        """Before the first step of this process (fresh or resumed)."""

    def reduce_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        self.intra.average_(grads)

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        """After the optimizer step of ``step``."""

    def take_bytes(self) -> int:
        out, self.bytes_sent = self.bytes_sent, 0
        return out


class Supervised(Strategy):
    """One model on the union of all private batches: gradients averaged over every rank."""

    shared_init = True

    def reduce_gradients(self, grads):
        self.bytes_sent += self.world.allreduce_mean_(grads)


class FedAvg(Strategy):
    """Weights averaged across all clients every ``every`` steps."""

    shared_init = True

    def __init__(self, world: World, intra: SingleRank, every: int):
        super().__init__(world, intra)
        self.every = every

    def start(self, model, resumed):
        if not resumed:
            self.bytes_sent += self.world.allreduce_mean_(list(model.state_dict().values()))

    def after_step(self, step, model):
        if step % self.every == 0:
            self.bytes_sent += self.world.allreduce_mean_(list(model.state_dict().values()))


def make_strategy(method: str, world: World, intra: SingleRank, fedavg_every: int) -> Strategy:
    if method == "supervised":
        return Supervised(world, intra)
    if method == "fedavg":
        return FedAvg(world, intra, fedavg_every)
    if method in ("mhd", "separate"):
        return Strategy(world, intra)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
