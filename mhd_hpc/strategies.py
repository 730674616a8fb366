"""What each ``method`` adds to the shared training step: how gradients are combined and which
collectives run between steps. Distillation targets come separately (``targets``).

* ``mhd`` and ``separate``: gradients averaged over the client's own replicas only.
* ``supervised`` (upper bound, one model on the union of all private batches): gradients averaged
  over all ranks every step.
* ``fedavg``: replicas average gradients; every ``fedavg.every`` steps all weights are averaged
  across clients (and once before the first step, so that every client starts identical).
* ``fedmd`` (Li & Wang, 2019, the paper's Table 2 comparison): consensus distillation. On a
  *digest* step, every client's main-head class probabilities on the public batch are averaged
  over all clients (one allreduce: the only method with a global step) and the main head is
  trained toward that consensus (soft cross-entropy, weight ``fedmd.weight``) without private
  data; the next ``fedmd.revisit_steps`` steps train on private data only (*revisit*). That is
  FedMD's digest/revisit alternation, with rounds of steps instead of epochs.

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

METHODS = ("mhd", "separate", "fedavg", "supervised", "fedmd")


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

    def trains_private(self, step: int) -> bool:
        """Whether ``step`` trains on the private batch (every method but FedMD's digest)."""
        return True

    def consensus(self, step: int, pub_main_logits: torch.Tensor) -> torch.Tensor | None:
        """A target for the main head on the public batch at ``step`` (FedMD), else None."""
        return None

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


class FedMD(Strategy):
    """Digest (train the main head toward the clients' consensus on the public batch) every
    ``revisit_steps + 1`` steps, revisit (private data) in between."""

    def __init__(self, world: World, intra: SingleRank, revisit_steps: int):
        super().__init__(world, intra)
        self.revisit_steps = revisit_steps

    def _digest(self, step: int) -> bool:
        return step % (self.revisit_steps + 1) == 0

    def trains_private(self, step):
        return not self._digest(step)

    def consensus(self, step, pub_main_logits):
        if not self._digest(step):
            return None
        probs = torch.softmax(pub_main_logits.detach().float(), dim=1)
        # Rank r of every client holds the same slice of the public batch: average over them.
        self.bytes_sent += self.world.across_clients_mean_([probs])
        return probs


def make_strategy(method: str, world: World, intra: SingleRank, fedavg_every: int,
                  fedmd_revisit_steps: int = 1) -> Strategy:
    if method == "fedmd":
        return FedMD(world, intra, fedmd_revisit_steps)
    if method == "supervised":
        return Supervised(world, intra)
    if method == "fedavg":
        return FedAvg(world, intra, fedavg_every)
    if method in ("mhd", "separate"):
        return Strategy(world, intra)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
