"""Where a client's distillation targets come from, one class per ``exchange.mode``.

``NoTargets`` (baselines, or nothing to teach), ``LiveTargets`` (mode ``predictions``): peers
chosen for this step send their outputs on the public batch right now (``ClientExchange``).
Pool mode (the paper's Algorithm 2) is :mod:`mhd_hpc.method.pool_targets`: peers' checkpoints
arrive in the background and the client runs Delta of them on the public batch itself, in
lock-step or at every client's own pace. All hand the training step the same ``PeerOutputs``,
so losses, heads and metrics are identical between the modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch

from mhd_hpc.method import losses, topology
from mhd_hpc.data.read.batches import Batch, key_hash
from mhd_hpc.distributed.codec import PeerOutputs

if TYPE_CHECKING:  # MPI-bound: imported where they are used
    from mhd_hpc.data.read.streams import BatchStream
    from mhd_hpc.distributed.exchange import ClientExchange
    from mhd_hpc.distributed.world import World


class TargetSource(Protocol):
    """Where a client's distillation targets come from, as the training step sees it."""

    uses_graph: bool  # targets come from peers along the topology's edges

    def prepare(self, step: int) -> None: ...
    def begin_step(self, step: int, model: torch.nn.Module) -> None: ...
    def offer(self, step: int, pub: Batch, pub_logits: list[torch.Tensor],
              pub_emb: torch.Tensor) -> None: ...
    def targets(self, step: int, pub: Batch, pub_logits: list[torch.Tensor],
                pub_emb: torch.Tensor) -> list[PeerOutputs]: ...
    def stats(self) -> dict[str, float]: ...
    def flush(self, step: int) -> None: ...
    def finish(self) -> None: ...
    def take_counters(self) -> tuple[int, int, float]: ...
    def state(self) -> dict | None: ...
    def load_state(self, state: dict) -> None: ...


class NoTargets:
    """Baselines without peers (``separate``, ``fedavg``, ``supervised``, topology ``none``):
    every method of :class:`TargetSource` does nothing (the other sources inherit these
    defaults)."""

    uses_graph = False

    def prepare(self, step: int) -> None:
        """Before the forward pass (post this step's receives)."""

    def begin_step(self, step: int, model: torch.nn.Module) -> None:
        """Work due once the forward pass of ``step`` has run, before the targets."""

    def stats(self) -> dict[str, float]:
        """Per-step diagnostics for the metrics log (after ``targets``)."""
        return {}

    def offer(self, step: int, pub: Batch, pub_logits: list[torch.Tensor],
              pub_emb: torch.Tensor) -> None:
        """As soon as the public outputs exist (the overlapped step): send them to the peers
        (else ``targets`` sends them)."""

    def targets(self, step: int, pub: Batch, pub_logits: list[torch.Tensor],
                pub_emb: torch.Tensor) -> list[PeerOutputs]:
        return []

    def flush(self, step: int) -> None:
        """Before a checkpoint: settle what the saved state depends on."""

    def finish(self) -> None:
        """When the job ends (or stops): settle every message still in flight."""

    def take_counters(self) -> tuple[int, int, float]:
        return 0, 0, 0.0

    def state(self) -> dict | None:
        return None

    def load_state(self, state: dict) -> None:
        pass


class LiveTargets(NoTargets):
    """The peers of this step (``delta`` in-neighbours drawn from ``seed``) send their outputs."""

    uses_graph = True

    def __init__(self, world: World, graph_at: Callable[[int], list[list[int]]],
                 exchange: ClientExchange, public: BatchStream, *, delta: int, seed: int,
                 send_embedding: bool, drops_late: bool = False):
        """``drops_late``: ``exchange.late_peers: drop`` (the exchange's deadline): the
        number of peers left out each step is recorded (``dropped_peers``)."""
        self.world, self.graph_at, self.exchange = world, graph_at, exchange
        self.public, self.send_embedding = public, send_embedding
        self.delta, self.seed, self.drops_late = delta, seed, drops_late
        self._plan: tuple[list[int], list[int]] = ([], [])

    def prepare(self, step):
        me = self.world.client
        chosen = topology.peers_at_step(self.graph_at(step), step, self.delta, self.seed)
        self._plan = (topology.out_peers(chosen)[me], chosen[me])
        if any(self._plan):
            self.exchange.post_receives(step, *self._plan)

    def _outputs(self, pub_logits, pub_emb):
        # Softmax (fp32) here; top-k and fp16 in the codec, on the device; targets come back
        # decoded on the same device. Only the heads a receiver distills from are sent: main ..
        # aux_{m-1} (aux_k learns from aux_{k-1}; the last aux head is nobody's target).
        probs = [torch.softmax(l.detach().float(), dim=1) for l in pub_logits[:-1]]
        emb = (losses.normalize_embedding(pub_emb.detach().float()) if self.send_embedding
               else None)
        return probs, emb

    def offer(self, step, pub, pub_logits, pub_emb):
        if any(self._plan):
            self.exchange.send(key_hash(pub.keys), *self._outputs(pub_logits, pub_emb),
                               defer=True)

    def targets(self, step, pub, pub_logits, pub_emb):
        if not any(self._plan):
            return []
        return self.exchange.complete(key_hash(pub.keys), self.public.global_key_hash(step),
                                      *self._outputs(pub_logits, pub_emb))

    def stats(self):
        return {"dropped_peers": float(self.exchange.take_dropped())} if self.drops_late else {}

    def finish(self):
        self.exchange.drain()

    def take_counters(self):
        return self.exchange.take_counters()
