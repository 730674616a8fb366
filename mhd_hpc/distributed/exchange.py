"""Point-to-point exchange of public-batch predictions between clients (docs/design.md,
"Exchange").

At step t client j sends to every client that chose it as a distillation target, and receives
from the peers it chose; all clients derive the same schedule from the shared seed, so no
negotiation is needed. A message is one contiguous byte buffer in the layout of
:mod:`mhd_hpc.codec` (``Isend``/``Irecv``, no pickle).

A step in three phases, so that nothing waits that need not: ``post_receives`` before the
forward pass (the peers' messages can land while this client computes), ``send`` as soon as the
public outputs exist (encoded on the device, one copy into a pinned host buffer that MPI sends
from; outputs that are not finite stop this client before anything is sent), ``wait`` for what
was posted (each receive copied to the device once and decoded there). Every receiver checks the
step and the key hash: clients that disagree on the public batch stop with an error, never train
on silently wrong targets.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from mpi4py import MPI

from mhd_hpc.codec import MessageCodec
from mhd_hpc.distributed.p2p import ExchangeError, TrafficCounters, wait_until
from mhd_hpc.distributed.world import World
from mhd_hpc.losses import PeerOutputs

_TAG = 17


def _host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 host buffer MPI can use; page-locked when the data comes from or goes to a GPU,
    so that the device copies are asynchronous."""
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    # numpy's memory, not torch.empty's: Open MPI's shared-memory transfers of a 0.5 MB message
    # took 4.3 ms from torch-allocated buffers and 0.9 ms from numpy's (2 ranks, this machine).
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8))


class PredictionExchange(TrafficCounters):
    """The messages of one job between pairs of ranks: post receives, send, wait."""

    def __init__(self, world: World, *, num_heads: int, num_classes: int, batch_size: int,
                 top_k: int, embedding_dim: int, timeout_s: float,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.world, self.timeout_s, self.device = world, timeout_s, torch.device(device)
        self.codec = MessageCodec(num_heads, num_classes, batch_size, top_k, embedding_dim)
        self.message_bytes = self.codec.message_bytes
        self._send_buf = _host_buffer(self.message_bytes, self.device)
        self._finite = torch.empty((), dtype=torch.bool, pin_memory=self.device.type == "cuda")
        self._recv_bufs: dict[int, torch.Tensor] = {}
        self._pending: list = []  # (request, owner client, is_receive)
        self._decoded: torch.cuda.Event | None = None  # last copies out of the receive buffers
        self._step = -1
        self._rank_of: Callable[[int], int] = world.rank_of_client

    # -- host messages (whole buffers; the leaders' relay and the tests use these) ------------
    def pack(self, step: int, key_hash: int, client: int, head_probs: list[torch.Tensor],
             embedding: torch.Tensor | None) -> np.ndarray:
        """This client's outputs as one host message (a copy)."""
        payload, _ = self.codec.encode_payload(head_probs, embedding)
        out = np.empty(self.message_bytes, dtype=np.uint8)
        out[self.codec.message_bytes - self.codec.payload_bytes:] = payload.cpu().numpy()
        self.codec.write_header(out, step, key_hash, client)
        return out

    def unpack(self, buf: np.ndarray, expect_step: int, expect_hash: int,
               expect_client: int) -> PeerOutputs:
        """Decode a host message (checking step, sender and key hash) onto ``self.device``."""
        self._check_header(buf, expect_step, expect_hash, expect_client)
        payload = torch.from_numpy(buf[self.message_bytes - self.codec.payload_bytes:])
        heads, emb = self.codec.decode_payload(payload.to(self.device, non_blocking=True))
        return PeerOutputs(expect_client, heads, emb)

    def _check_header(self, buf: np.ndarray, expect_step: int, expect_hash: int,
                      expect_client: int) -> None:
        step, key_hash, sender = self.codec.read_header(buf)
        where = f"client {expect_client}"
        if sender != expect_client or step != expect_step:
            raise ExchangeError(f"{self.world.where()} expected step {expect_step} from {where} "
                                f"but got step {step} from client {sender}")
        if key_hash != expect_hash:
            raise ExchangeError(f"{self.world.where()}: public batch of step {step} from {where} "
                                f"covers different samples (key hash {key_hash:016x} != ours "
                                f"{expect_hash:016x}); clients disagree on the public stream")

    # -- one step in three phases --------------------------------------------------------------
    def post_receives(self, step: int, receive_from: list[int],
                      rank_of: Callable[[int], int] | None = None) -> None:
        """Post this step's receives (before the forward pass); ``rank_of(client)`` is the rank
        to talk to (default: the client's leader)."""
        self._step, self._rank_of = step, rank_of or self.world.rank_of_client
        if self._decoded is not None:  # MPI must not overwrite a buffer the GPU still copies
            self._decoded.synchronize()
            self._decoded = None
        for j in receive_from:
            if j not in self._recv_bufs:
                self._recv_bufs[j] = _host_buffer(self.message_bytes, self.device)
            request = self.world.comm.Irecv([self._recv_bufs[j].numpy(), MPI.BYTE],
                                            source=self._rank_of(j), tag=_TAG)
            self._pending.append((request, j, True))

    def send(self, key_hash: int, head_probs: list[torch.Tensor],
             embedding: torch.Tensor | None, send_to: list[int]) -> None:
        """Encode on the device, one copy to the host buffer, and ``Isend`` to ``send_to``."""
        if not send_to:
            return
        t0 = time.perf_counter()
        payload, finite = self.codec.encode_payload(head_probs, embedding)
        host = self._send_buf
        host[self.message_bytes - self.codec.payload_bytes:].copy_(payload, non_blocking=True)
        self._finite.copy_(finite, non_blocking=True)
        if payload.is_cuda:  # MPI reads host memory: the copies must have landed
            copied = torch.cuda.Event()
            copied.record()
            copied.synchronize()
        if not bool(self._finite):
            raise FloatingPointError(f"client {self.world.client}: non-finite outputs at step "
                                     f"{self._step} (training diverged: lower optim.lr or check "
                                     "the data); nothing was sent to its peers")
        message = host.numpy()
        self.codec.write_header(message, self._step, key_hash, self.world.client)
        for i in send_to:
            request = self.world.comm.Isend([message, MPI.BYTE], dest=self._rank_of(i), tag=_TAG)
            self._pending.append((request, i, False))
        self.bytes_sent += self.message_bytes * len(send_to)
        self.wait_seconds += time.perf_counter() - t0  # the exchange's cost: encode, copy, post

    def wait(self, key_hash: int) -> list[PeerOutputs]:
        """Wait for everything posted this step (with a deadline that names the missing peers)
        and decode the receives, in the order they were posted, onto ``self.device``."""
        t0 = time.perf_counter()  # waiting starts here (the forward pass ran since posting)
        pending, self._pending = self._pending, []
        if pending:
            self._wait_all(pending)
        received = [j for _, j, is_recv in pending if is_recv]
        out = [self.unpack(self._recv_bufs[j].numpy(), self._step, key_hash, j)
               for j in received]
        if received and self.device.type == "cuda":
            self._decoded = torch.cuda.Event()
            self._decoded.record()
        self.bytes_received += self.message_bytes * len(received)
        self.wait_seconds += time.perf_counter() - t0
        return out

    def exchange(self, step: int, key_hash: int, head_probs: list[torch.Tensor],
                 embedding: torch.Tensor | None, send_to: list[int], receive_from: list[int],
                 rank_of: Callable[[int], int] | None = None) -> list[PeerOutputs]:
        """All three phases at once: send our outputs to ``send_to`` and receive those of
        ``receive_from``."""
        self.post_receives(step, receive_from, rank_of)
        self.send(key_hash, head_probs, embedding, send_to)
        return self.wait(key_hash)

    def _wait_all(self, pending: list) -> None:
        requests = [r for r, _, _ in pending]

        def missing() -> str:
            return ", ".join(f"{'receive from' if is_recv else 'send to'} client {j} "
                             f"(rank {self._rank_of(j)})"
                             for r, j, is_recv in pending if not r.Test())
        wait_until(lambda: MPI.Request.Testall(requests), self.timeout_s,
                   lambda: f"{self.world.where()} timed out after {self.timeout_s:.0f} s at "
                           f"step {self._step} waiting to {missing()} (exchange.timeout_s)")


class ClientExchange:
    """The prediction exchange between clients made of one or more ranks.

    Every rank holds its slice of the common public batch. Rank r of client i talks to rank r of
    client j directly when both clients have the same number of ranks (their slices cover the
    same samples, no gather). Otherwise the clients' leaders speak for them: the leader gathers
    its ranks' slices, exchanges whole-batch messages with the other leader, and scatters each
    rank its slice of what arrived. Slices are checked against the hash of their own keys; whole
    batches against the hash of the whole batch's keys.
    """

    def __init__(self, world: World, *, num_heads: int, num_classes: int, batch_size: int,
                 top_k: int, embedding_dim: int, timeout_s: float,
                 device: torch.device | str = "cpu"):
        self.world = world
        self.slice_size = batch_size // world.local_size
        layout = dict(num_heads=num_heads, num_classes=num_classes, top_k=top_k,
                      embedding_dim=embedding_dim, timeout_s=timeout_s, device=device)
        self.slice = PredictionExchange(world, batch_size=self.slice_size, **layout)
        self.whole = PredictionExchange(world, batch_size=batch_size, **layout)
        self._direct: tuple[list[int], list[int]] = ([], [])
        self._relayed: tuple[list[int], list[int]] = ([], [])

    def post_receives(self, step: int, send_to: list[int], receive_from: list[int]) -> None:
        """Before the forward pass: post the direct (same rank count) receives."""
        w = self.world
        assert w.layout is not None
        same = {c for c in set(send_to) | set(receive_from)
                if w.layout.size_of(c) == w.local_size}
        self._direct = ([i for i in send_to if i in same], [j for j in receive_from if j in same])
        self._relayed = ([i for i in send_to if i not in same],
                         [j for j in receive_from if j not in same])
        self._receive_from = list(receive_from)
        self.slice.post_receives(step, self._direct[1],
                                 rank_of=lambda c: w.peer_rank(c, w.local_rank))
        self._step = step

    def complete(self, slice_hash: int, batch_hash: int, head_probs: list[torch.Tensor],
                 embedding: torch.Tensor | None) -> list[PeerOutputs]:
        """After the forward pass: send, relay through the leaders where needed, and wait."""
        self.slice.send(slice_hash, head_probs, embedding, self._direct[0])
        got = {p.client: p for p in self.slice.wait(slice_hash)}
        if self._relayed[0] or self._relayed[1]:  # the same decision on every rank of the client
            got.update(self._through_leaders(self._step, batch_hash, head_probs, embedding,
                                             *self._relayed))
        return [got[j] for j in self._receive_from]

    def _through_leaders(self, step, batch_hash, head_probs, embedding, send_to, receive_from):
        w, b = self.world, self.slice_size
        rows = w.client_gather_bytes(self.slice.pack(step, batch_hash, w.client, head_probs,
                                                     embedding))
        scatter = None
        if w.is_leader:
            parts = [self.slice.unpack(row, step, batch_hash, w.client) for row in rows]
            probs = [torch.cat([p.head_probs[h] for p in parts]) for h in range(len(head_probs))]
            emb = torch.cat([p.embedding for p in parts]) if embedding is not None else None
            peers = self.whole.exchange(step, batch_hash, probs, emb, send_to, receive_from)
            scatter = np.stack([np.concatenate(
                [self.slice.pack(step, batch_hash, p.client,
                                 [h[r * b:(r + 1) * b] for h in p.head_probs],
                                 p.embedding[r * b:(r + 1) * b] if emb is not None else None)
                 for p in peers] or [np.empty(0, np.uint8)]) for r in range(w.local_size)])
        if not receive_from:
            return {}
        size = self.slice.message_bytes
        mine = w.client_scatter_bytes(scatter, size * len(receive_from))
        return {j: self.slice.unpack(mine[k * size:(k + 1) * size], step, batch_hash, j)
                for k, j in enumerate(receive_from)}

    def take_counters(self) -> tuple[int, int, float]:
        """Direct (slice) traffic plus, on leaders, the whole-batch traffic they relay."""
        return tuple(a + b for a, b in zip(self.slice.take_counters(),
                                           self.whole.take_counters()))
