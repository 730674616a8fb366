"""Where a client's distillation targets come from, one class per ``exchange.mode``.

``LiveTargets`` (mode ``predictions``): peers chosen for this step send their outputs on the
public batch right now (``PredictionExchange``). ``PoolTargets`` (mode ``pool``, the paper's
Algorithm 2): peers' checkpoints arrive in the background every ``exchange.pool_every`` steps and
the client runs Delta of them on the public batch itself. Both hand the training loop the same
``PeerOutputs``, so losses, heads and metrics are identical between the modes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from mhd_hpc.method import losses, topology
from mhd_hpc.data.read.batches import Batch, key_hash
from mhd_hpc.runtime.devices import Precision
from mhd_hpc.method.losses import PeerOutputs
from mhd_hpc.method.pool import CheckpointPool, flatten_state, refresh_sources, state_size
from mhd_hpc.config.choices import EXCHANGE_MODES  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # MPI-bound: imported where they are used, so config can import this module
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


@dataclass(frozen=True)
class PoolSettings:
    """Pool mode's settings (``exchange.pool_*``, ``distill.targets_per_step``)."""

    capacity: int  # N_P
    every: int  # S_P: steps between refreshes
    transfer_steps: int  # steps a transfer runs in the background before it is inserted
    delta: int  # entries drawn per step
    seed: int
    timeout_s: float
    send_embedding: bool  # the entries' embeddings are targets too (nu_emb > 0)
    precision: Precision = Precision("fp32")  # of the entries' forward passes
    asynchronous: bool = False  # exchange.pool_async: at every client's own pace
    max_lead: float = 0.0  # exchange.pool_max_lead: 0 = unbounded


class PoolTargets(NoTargets):
    """Peer checkpoints arrive every ``settings.every`` steps (``transfer_steps`` in the
    background) into a pool of ``capacity``; each step ``delta`` entries compute the targets."""

    uses_graph = True

    def __init__(self, world: World, graph_at: Callable[[int], list[list[int]]], archs: list[str],
                 build: Callable[[str], torch.nn.Module], settings: PoolSettings):
        self.world, self.graph_at, self.archs = world, graph_at, archs
        self.send_embedding = settings.send_embedding
        self.pool_every, self.transfer_steps = settings.every, settings.transfer_steps
        self.precision = settings.precision
        self.delta, self.seed = settings.delta, settings.seed
        from mhd_hpc.distributed.transfer import AsyncWeightTransfer, WeightTransfer

        self.pool = CheckpointPool(settings.capacity, world.client, settings.seed, build)
        self.build = build
        self._sizes: dict[str, int] = {}
        self._staleness: list[int] = []
        self._age_s: list[float] = []
        self.asynchronous = settings.asynchronous
        self.transfer = (AsyncWeightTransfer(world, settings.timeout_s,
                                             max(self._size(a) for a in set(archs)))
                         if self.asynchronous else WeightTransfer(world, settings.timeout_s))
        self.lead = None  # exchange.pool_max_lead: the leader's bound on its lead
        if self.asynchronous and settings.max_lead and world.is_leader:
            from mhd_hpc.distributed.transfer import LeadBound

            self.lead = LeadBound(world, settings.max_lead, settings.every, settings.timeout_s)

    def _size(self, arch: str) -> int:
        if arch not in self._sizes:
            self._sizes[arch] = state_size(self.build(arch))
        return self._sizes[arch]

    def begin_step(self, step, model):
        """Post this step's refresh transfers and insert those that are due. Only leaders
        transfer (a client's replicas hold the same weights); they share what arrives with
        their client's ranks at the same, fixed step."""
        if self.asynchronous:
            return self._begin_async(step, model)
        me = self.world.client
        if step % self.pool_every == 0 and self.world.is_leader:
            sources = refresh_sources(self.graph_at(step), step, self.seed)
            if sources[me] >= 0:
                self.transfer.post_receive(sources[me], self._size(self.archs[sources[me]]),
                                           due=step + self.transfer_steps)
            receivers = [i for i, src in enumerate(sources) if src == me]
            if receivers:
                flat = flatten_state(model)
                if not np.isfinite(flat).all():
                    raise FloatingPointError(f"client {me}: non-finite weights at step {step} "
                                             "(training diverged): not sent to the pool of "
                                             f"clients {receivers}")
                self.transfer.post_send(step, flat, receivers)
        lag = self.transfer_steps % self.pool_every
        if step % self.pool_every == lag:  # the only steps at which transfers fall due
            self._insert(step, self._share(self.transfer.complete(step)))
        self.transfer.poll()

    def _weights(self, model: torch.nn.Module, step: int, receivers: list[int]) -> np.ndarray:
        flat = flatten_state(model)
        if not np.isfinite(flat).all():
            raise FloatingPointError(f"client {self.world.client}: non-finite weights at step "
                                     f"{step} (training diverged): not sent to the pool of "
                                     f"clients {receivers}")
        return flat

    def _begin_async(self, step: int, model: torch.nn.Module) -> None:
        """exchange.pool_async: send at this client's own refresh steps (the receivers the
        shared seed assigns to this step index), and insert whatever has arrived now."""
        me, leader = self.world.client, self.world.is_leader
        if self.lead is not None:
            self.lead.begin_step(step)
        if step % self.pool_every == 0 and leader:
            sources = refresh_sources(self.graph_at(step), step, self.seed)
            receivers = [i for i, src in enumerate(sources) if src == me]
            if receivers:
                self.transfer.send(step, self._weights(model, step, receivers), receivers)
        arrived = self.transfer.arrived() if leader else []
        if self.world.local_size > 1:  # the client's ranks insert the same, at the same step
            meta = self.world.client_bcast([(src, st, age) for src, st, age, _ in arrived]
                                           if leader else None)
            arrived = [(src, st, age, self.world.client_bcast_array(
                arrived[n][3] if leader else np.empty(self._size(self.archs[src]), np.float32)))
                for n, (src, st, age) in enumerate(meta)]
        for source, source_step, age_s, flat in arrived:
            self.pool.insert(step, source, source_step, self.archs[source], flat,
                             made_at=time.time() - age_s, same_source=True)

    def _share(self, arrived: list) -> list:
        """The leader's arrivals -> the same list on every rank of the client."""
        if self.world.local_size == 1:
            return arrived
        meta = self.world.client_bcast([(src, st) for src, st, _ in arrived]
                                       if self.world.is_leader else None)
        shared = []
        for n, (src, source_step) in enumerate(meta):
            flat = arrived[n][2] if self.world.is_leader else np.empty(
                self._size(self.archs[src]), np.float32)
            shared.append((src, source_step, self.world.client_bcast_array(flat)))
        return shared

    def stats(self):
        out = {"pool_entries": float(len(self.pool.entries))}
        if self._staleness:  # steps between a target checkpoint's making and its use
            out["staleness"] = sum(self._staleness) / len(self._staleness)
            self._staleness = []
        if self._age_s:  # pool_async: the same in seconds (the sender's steps are its own)
            out["staleness_s"] = sum(self._age_s) / len(self._age_s)
            self._age_s = []
        if self.lead is not None:  # called once per step: this step's seconds held back
            out["lead_wait_s"] = self.lead.wait_seconds
            out["slowest_peer_step"] = float(self.lead.slowest())
            self.lead.wait_seconds = 0.0
        return out

    def _insert(self, step: int, arrived: list) -> None:
        for source, source_step, flat in arrived:
            self.pool.insert(step, source, source_step, self.archs[source], flat)

    @torch.no_grad()
    def targets(self, step, pub, pub_logits, pub_emb):
        out = []
        for entry in self.pool.draw(step, self.delta):
            with self.precision.autocast(pub.images.device):
                emb, logits = entry.model(pub.images)
            out.append(PeerOutputs(  # targets in fp32 whatever the forward's precision
                entry.source_client, [torch.softmax(l.float(), dim=1) for l in logits],
                losses.normalize_embedding(emb.float()) if self.send_embedding else None))
            self._staleness.append(step - entry.source_step)
            if self.asynchronous:
                self._age_s.append(time.time() - entry.made_at)
        return out

    def flush(self, step):
        """Before a checkpoint: let every transfer in flight arrive (leaders), but insert each
        at its own due step, so that a run's pool (and its results) does not depend on
        ``run.checkpoint_every`` or on when a signal stopped it."""
        if self.world.is_leader and not self.asynchronous:  # async: nothing waits
            self.transfer.settle(step)

    def finish(self):
        """pool_async: the clients end at different times: keep receiving (and discarding)
        until every sender's checkpoints have left, agreed by all ranks, then cancel."""
        if not self.asynchronous:
            return
        from mhd_hpc.distributed.p2p import Poller

        poll = Poller()
        while True:
            leader = self.world.is_leader
            if leader:
                self.transfer.arrived()
            busy = leader and not self.transfer.sends_done()
            if self.lead is not None:
                busy = not self.lead.sends_done() or busy
            if self.world.max_over_ranks(1.0 if busy else 0.0) == 0:
                break
            poll.pause()
        if self.world.is_leader:
            self.transfer.close()
            if self.lead is not None:
                self.lead.close()

    def take_counters(self):
        return self.transfer.take_counters()

    def state(self):
        """The pool and, on leaders, the arrived transfers that are not due yet (pool_async:
        the pool; what is in flight is lost on a restart)."""
        if self.asynchronous:
            return self.pool.state()
        return {**self.pool.state(), "pending": self.transfer.state()}

    def load_state(self, state):
        self.pool.load_state(state)
        if self.world.is_leader and not self.asynchronous:  # the others get them at due steps
            self.transfer.load_state(state.get("pending", []))
