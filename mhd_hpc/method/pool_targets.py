"""Pool mode (the paper's Algorithm 2): peers' checkpoints arrive in the background into a pool
of ``exchange.pool_size`` entries, and each step Delta entries compute the targets on the public
batch (docs/design.md, Pool mode).

Two classes behind the one :class:`~mhd_hpc.method.targets.TargetSource` interface, chosen once
by ``exchange.pool_async``, so that the training loop never branches on the mode:

- :class:`PoolTargets`, lock-step: a checkpoint sent at step s is inserted at the receiver's
  step s + ``pool_transfer_steps``, so a run is reproducible;
- :class:`AsyncPoolTargets`, every client at its own pace: whatever has arrived is inserted at
  once (replacing the sender's own oldest entry), optionally within a bounded lead
  (``exchange.pool_max_lead``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from mhd_hpc.method import losses
from mhd_hpc.distributed.codec import PeerOutputs
from mhd_hpc.method.pool import CheckpointPool, flatten_state, refresh_sources, state_size
from mhd_hpc.method.targets import NoTargets
from mhd_hpc.runtime.devices import Precision

if TYPE_CHECKING:  # MPI-bound: imported where they are used
    from mhd_hpc.distributed.world import World

__all__ = ["PoolSettings", "PoolTargets", "AsyncPoolTargets", "make_pool_targets"]


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


def make_pool_targets(world: World, graph_at: Callable[[int], list[list[int]]],
                      archs: list[str], build: Callable[[str], torch.nn.Module],
                      settings: PoolSettings) -> "PoolTargets | AsyncPoolTargets":
    """The pool source of ``settings.asynchronous``."""
    kind = AsyncPoolTargets if settings.asynchronous else PoolTargets
    return kind(world, graph_at, archs, build, settings)


class _Pool(NoTargets):
    """What both pool sources share: the pool, the entries' forward passes, and the stats."""

    uses_graph = True

    def __init__(self, world: World, graph_at: Callable[[int], list[list[int]]], archs: list[str],
                 build: Callable[[str], torch.nn.Module], settings: PoolSettings):
        self.world, self.graph_at, self.archs = world, graph_at, archs
        self.send_embedding = settings.send_embedding
        self.pool_every, self.transfer_steps = settings.every, settings.transfer_steps
        self.precision = settings.precision
        self.delta, self.seed = settings.delta, settings.seed
        self.pool = CheckpointPool(settings.capacity, world.client, settings.seed, build)
        self.build = build
        self._sizes: dict[str, int] = {}
        self._staleness: list[int] = []

    def _size(self, arch: str) -> int:
        if arch not in self._sizes:
            self._sizes[arch] = state_size(self.build(arch))
        return self._sizes[arch]

    def _receivers(self, step: int) -> list[int]:
        """The clients whose refresh at ``step`` takes this client's checkpoint (leaders)."""
        sources = refresh_sources(self.graph_at(step), step, self.seed)
        return [i for i, src in enumerate(sources) if src == self.world.client]

    def _weights(self, model: torch.nn.Module, step: int, receivers: list[int]) -> np.ndarray:
        flat = flatten_state(model)
        if not np.isfinite(flat).all():
            raise FloatingPointError(f"client {self.world.client}: non-finite weights at step "
                                     f"{step} (training diverged): not sent to the pool of "
                                     f"clients {receivers}")
        return flat

    def _used(self, entry) -> None:
        """Bookkeeping of one entry drawn at a step (staleness)."""

    def stats(self):
        out = {"pool_entries": float(len(self.pool.entries))}
        if self._staleness:  # steps between a target checkpoint's making and its use
            out["staleness"] = sum(self._staleness) / len(self._staleness)
            self._staleness = []
        return out

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
            self._used(entry)
        return out

    def take_counters(self):
        return self.transfer.take_counters()


class PoolTargets(_Pool):
    """Lock-step pool mode: peer checkpoints arrive every ``settings.every`` steps
    (``transfer_steps`` in the background) and are inserted at their due step on every rank of
    the client, so the pool, and the run, do not depend on timing."""

    def __init__(self, world: World, graph_at: Callable[[int], list[list[int]]], archs: list[str],
                 build: Callable[[str], torch.nn.Module], settings: PoolSettings):
        super().__init__(world, graph_at, archs, build, settings)
        from mhd_hpc.distributed.transfer import WeightTransfer

        self.transfer = WeightTransfer(world, settings.timeout_s)

    def begin_step(self, step, model):
        """Post this step's refresh transfers and insert those that are due. Only leaders
        transfer (a client's replicas hold the same weights); they share what arrives with
        their client's ranks at the same, fixed step."""
        me = self.world.client
        if step % self.pool_every == 0 and self.world.is_leader:
            sources = refresh_sources(self.graph_at(step), step, self.seed)
            if sources[me] >= 0:
                self.transfer.post_receive(sources[me], self._size(self.archs[sources[me]]),
                                           due=step + self.transfer_steps)
            receivers = [i for i, src in enumerate(sources) if src == me]
            if receivers:
                self.transfer.post_send(step, self._weights(model, step, receivers), receivers)
        lag = self.transfer_steps % self.pool_every
        if step % self.pool_every == lag:  # the only steps at which transfers fall due
            for source, source_step, flat in self._share(self.transfer.complete(step)):
                self.pool.insert(step, source, source_step, self.archs[source], flat)
        self.transfer.poll()

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

    def flush(self, step):
        """Before a checkpoint: let every transfer in flight arrive (leaders), but insert each
        at its own due step, so that a run's pool (and its results) does not depend on
        ``run.checkpoint_every`` or on when a signal stopped it."""
        if self.world.is_leader:
            self.transfer.settle(step)

    def state(self):
        """The pool and, on leaders, the arrived transfers that are not due yet."""
        return {**self.pool.state(), "pending": self.transfer.state()}

    def load_state(self, state):
        self.pool.load_state(state)
        if self.world.is_leader:  # the others get them at due steps
            self.transfer.load_state(state.get("pending", []))


class AsyncPoolTargets(_Pool):
    """``exchange.pool_async``: every client at its own pace. A checkpoint is sent at the
    sender's own refresh steps (the receivers the shared seed assigns to that step index) and
    inserted by the receiver as soon as it has arrived; with ``settings.max_lead`` a leader
    stays within that ratio of the slowest client's step (``LeadBound``). Not reproducible run
    to run; a resume loses what was in flight."""

    def __init__(self, world: World, graph_at: Callable[[int], list[list[int]]], archs: list[str],
                 build: Callable[[str], torch.nn.Module], settings: PoolSettings):
        super().__init__(world, graph_at, archs, build, settings)
        from mhd_hpc.distributed.transfer import AsyncWeightTransfer, LeadBound

        self._age_s: list[float] = []
        self.transfer = AsyncWeightTransfer(world, settings.timeout_s,
                                            max(self._size(a) for a in set(archs)))
        self.lead = (LeadBound(world, settings.max_lead, settings.every, settings.timeout_s)
                     if settings.max_lead and world.is_leader else None)

    def begin_step(self, step, model):
        """Send at this client's own refresh steps, and insert whatever has arrived now."""
        leader = self.world.is_leader
        if self.lead is not None:
            self.lead.begin_step(step)
        if step % self.pool_every == 0 and leader:
            receivers = self._receivers(step)
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

    def _used(self, entry) -> None:
        self._age_s.append(time.time() - entry.made_at)

    def stats(self):
        out = super().stats()
        if self._age_s:  # the staleness in seconds (the sender's steps are its own)
            out["staleness_s"] = sum(self._age_s) / len(self._age_s)
            self._age_s = []
        if self.lead is not None:  # called once per step: this step's seconds held back
            out["lead_wait_s"] = self.lead.wait_seconds
            out["slowest_peer_step"] = float(self.lead.slowest())
            self.lead.wait_seconds = 0.0
        return out

    def finish(self):
        """The clients end at different times: keep receiving (and discarding) until every
        sender's checkpoints have left, agreed by all ranks, then cancel."""
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

    def state(self):
        """The pool only: what is in flight is lost on a restart."""
        return self.pool.state()

    def load_state(self, state):
        self.pool.load_state(state)
