"""What each ``method`` adds to the shared training step: how gradients are combined and which
collectives run between steps. Distillation targets come separately (``targets``).

* ``mhd`` and ``separate``: gradients averaged over the client's own replicas only;
  ``separate`` (the paper's Separate) trains on the private batch alone unless
  ``separate.self_distill`` lets its aux chain self-distill on the public batch.
* ``supervised`` (upper bound, one model on the union of all private batches): gradients averaged
  over all clients every step, BatchNorm statistics before every evaluation and checkpoint.
* ``fedavg``: replicas average gradients; every ``fedavg.every`` steps, and after the last one,
  all weights and BatchNorm statistics are averaged across clients (and once before the first
  step, so that every client starts identical).

Averages across clients weigh every client the same whatever its rank count
(``World.clients_mean_``).
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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from mhd_hpc.method.losses import soft_cross_entropy
from mhd_hpc.config.choices import METHODS  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # MPI-bound; config imports METHODS from here without starting MPI
    from mhd_hpc.distributed.intra import IntraBackend
    from mhd_hpc.distributed.world import World

__all__ = ["METHODS", "ExtraLoss", "Strategy", "make_strategy"]



@dataclass
class ExtraLoss:
    """A method's own loss term for one step: ``parts`` (weighted, with their graphs) are added
    to the objective, ``terms`` (detached) are logged."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Strategy:
    """``separate``: data parallelism inside the client, nothing across clients (the base every
    method builds on)."""

    shared_init = False  # every client starts from the same initialisation
    one_model = False  # the clients train one model on the union of their data (health: pooled)
    exchanges_targets = False  # the clients distill from each other's outputs (MHD)
    uses_public = True  # the step forwards the public batch (aux chain, distillation)

    def __init__(self, world: World, intra: IntraBackend):
        self.world, self.intra = world, intra
        self.bytes_sent = 0  # collective traffic across clients since the last take_bytes()

    def start(self, model: torch.nn.Module, resumed: bool) -> None:
        """Before the first step of this process (fresh or resumed)."""

    def reduce_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        self.intra.average_(grads)

    def settle_buffers(self, buffers: Sequence[torch.Tensor]) -> None:
        """Before an evaluation or a checkpoint: make the BatchNorm statistics what the method's
        model has (the mean over the client's replicas)."""
        self.intra.average_(buffers)

    def after_step(self, step: int, model: torch.nn.Module) -> None:
        """After the optimizer step of ``step``."""

    def trains_private(self, step: int) -> bool:
        """Whether ``step`` trains on the private batch (every method but FedMD's digest)."""
        return True

    def extra_loss(self, step: int, pub_logits: list[torch.Tensor]) -> ExtraLoss | None:
        """The method's own loss terms on the public outputs at ``step`` (FedMD), else None."""
        return None

    def take_bytes(self) -> int:
        out, self.bytes_sent = self.bytes_sent, 0
        return out


class Separate(Strategy):
    """``separate``, the paper's Separate: each client alone on its private labels, main head
    only (``self_distill``: the aux chain also learns by self-distillation on the public batch,
    an ablation and what this method did before ``separate.self_distill`` existed)."""

    def __init__(self, world: World, intra: IntraBackend, self_distill: bool = False):
        super().__init__(world, intra)
        self.uses_public = self_distill


class MHD(Strategy):
    """``mhd``: the clients distill from each other's outputs (``targets``); otherwise as
    ``separate``."""

    exchanges_targets = True


class Supervised(Strategy):
    """One model on the union of all private batches: gradients averaged over all clients
    (each client's batch weighs the same) every step. BatchNorm normalises each rank's batch
    with that batch's statistics while training (as data parallelism without synchronised
    BatchNorm does); the running statistics, which the evaluated model uses, are averaged over
    all clients before every evaluation and checkpoint. Running statistics are exponential
    moving averages, linear in the batch statistics, so that average equals averaging at every
    step: every client holds the one model."""

    shared_init = True
    one_model = True

    def reduce_gradients(self, grads):
        self.bytes_sent += self.world.clients_mean_(grads)

    def settle_buffers(self, buffers):
        self.bytes_sent += self.world.clients_mean_(buffers)


class FedAvg(Strategy):
    """All weights and BatchNorm statistics averaged across clients every ``every`` steps and
    after the last step, so that the run ends with the global model (between rounds, and at
    evaluations that do not fall on a round, each client holds its local model)."""

    shared_init = True
    one_model = True

    def __init__(self, world: World, intra: IntraBackend, every: int, total_steps: int):
        super().__init__(world, intra)
        self.every, self.total_steps = every, total_steps

    def start(self, model, resumed):
        if not resumed:
            self.bytes_sent += self.world.clients_mean_(list(model.state_dict().values()))

    def after_step(self, step, model):
        if step % self.every == 0 or step == self.total_steps:
            self.bytes_sent += self.world.clients_mean_(list(model.state_dict().values()))


class FedMD(Strategy):
    """Digest (train the main head toward the clients' consensus on the public batch, weight
    ``weight``) every ``revisit_steps + 1`` steps, revisit (private data) in between."""

    def __init__(self, world: World, intra: IntraBackend, revisit_steps: int, weight: float):
        super().__init__(world, intra)
        self.revisit_steps, self.weight = revisit_steps, weight

    def _digest(self, step: int) -> bool:
        return step % (self.revisit_steps + 1) == 0

    def trains_private(self, step):
        return not self._digest(step)

    def extra_loss(self, step, pub_logits):
        if not self._digest(step):
            return None
        consensus = torch.softmax(pub_logits[0].detach().float(), dim=1)
        # Rank r of every client holds the same slice of the public batch: average over them.
        self.bytes_sent += self.world.across_clients_mean_([consensus])
        unweighted = soft_cross_entropy(pub_logits[0], consensus)[0]
        return ExtraLoss(parts={"consensus": self.weight * unweighted},
                         terms={"loss_consensus": unweighted.detach()})


def make_strategy(method: str, world: World, intra: IntraBackend, *, total_steps: int = 0,
                  fedavg_every: int = 10, fedmd_revisit_steps: int = 1,
                  fedmd_weight: float = 1.0, separate_self_distill: bool = False) -> Strategy:
    if method == "fedmd":
        return FedMD(world, intra, fedmd_revisit_steps, fedmd_weight)
    if method == "supervised":
        return Supervised(world, intra)
    if method == "fedavg":
        return FedAvg(world, intra, fedavg_every, total_steps)
    if method == "mhd":
        return MHD(world, intra)
    if method == "separate":
        return Separate(world, intra, separate_self_distill)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
