"""Point-to-point exchange of public-batch predictions between clients (docs/design.md,
"Exchange").

At step t client j sends to every client that chose it as a distillation target, and receives
from the peers it chose; all clients derive the same schedule from the shared seed, so no
negotiation is needed. A message is one contiguous byte buffer in the layout of
:mod:`mhd_hpc.distributed.codec` (``Isend``/``Irecv``, no pickle).

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

from mhd_hpc.distributed.codec import MessageCodec
from mhd_hpc.distributed.p2p import (ExchangeError, Poller, TrafficCounters, all_done,
                                     wait_until)
from mhd_hpc.distributed.world import World
from mhd_hpc.distributed.codec import PeerOutputs

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
    """The messages of one job between pairs of ranks: post receives, send, wait.

    ``late_deadline_s`` (``exchange.late_peers: drop``): ``wait`` gives each receive that much
    time after this rank's own outputs are ready; a peer whose message is not there by then is
    left out of the step's candidates (``dropped``), its receive stays posted and what arrives
    later is checked and discarded. Sends are then never waited for either (a slow receiver
    must not hold a fast sender back): each step sends from a buffer no send still reads.
    Without it (``wait``, the default) every step waits for all of its messages.
    """

    def __init__(self, world: World, *, num_heads: int, num_classes: int, batch_size: int,
                 top_k: int, embedding_dim: int, timeout_s: float,
                 device: torch.device | str = "cpu", late_deadline_s: float | None = None):
        super().__init__()
        self.world, self.timeout_s, self.device = world, timeout_s, torch.device(device)
        self.late_deadline_s = late_deadline_s
        self.codec = MessageCodec(num_heads, num_classes, batch_size, top_k, embedding_dim)
        self.message_bytes = self.codec.message_bytes
        self._finite = torch.empty((), dtype=torch.bool, pin_memory=self.device.type == "cuda")
        self._free_recv: dict[int, list[torch.Tensor]] = {}  # per peer: buffers not in use
        self._sends: list[tuple[list, torch.Tensor]] = []  # (requests, buffer) still sending
        self._spare_send: list[torch.Tensor] = []
        self._pending: list = []  # this step's (request, owner client, is_receive, buffer)
        self._late: list = []  # (request, peer, buffer, step) receives left behind (drop)
        self._decoded: torch.cuda.Event | None = None  # last copies out of the receive buffers
        self._step = -1
        self._rank_of: Callable[[int], int] = world.rank_of_client
        self.dropped = 0  # peers left out since the last take_dropped()
        self.late_discarded = 0  # late messages received and discarded
        self._side: torch.cuda.Stream | None = None  # deferred sends' copies (GPU)
        self._deferred: tuple | None = None  # a send whose copy is in flight

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
        self._reap_late()
        for j in receive_from:
            free = self._free_recv.setdefault(j, [])
            buf = free.pop() if free else _host_buffer(self.message_bytes, self.device)
            request = self.world.comm.Irecv([buf.numpy(), MPI.BYTE], source=self._rank_of(j),
                                            tag=_TAG)
            self._pending.append((request, j, True, buf))

    def _send_buffer(self) -> torch.Tensor:
        """A host buffer no send still reads (one, reused, when every step waits for its
        sends; a few in flight with ``late_deadline_s``)."""
        still = []
        for requests, buf in self._sends:
            if all(r.Test() for r in requests):
                self._spare_send.append(buf)
            else:
                still.append((requests, buf))
        self._sends = still
        return self._spare_send.pop() if self._spare_send else \
            _host_buffer(self.message_bytes, self.device)

    def send(self, key_hash: int, head_probs: list[torch.Tensor],
             embedding: torch.Tensor | None, send_to: list[int], defer: bool = False) -> None:
        """Encode on the device, one copy to the host buffer, and ``Isend`` to ``send_to``.

        ``defer`` (the overlapped step on a GPU): the copy runs on a side stream after the
        outputs, and the sends are posted by :meth:`wait` (or :meth:`post_deferred`) once it
        has landed: the host never waits here, so it goes on queueing the private batch's
        work while the public outputs travel."""
        if not send_to:
            return
        if defer and head_probs and head_probs[0].is_cuda:
            return self._send_later(key_hash, head_probs, embedding, send_to)
        if head_probs and head_probs[0].is_cuda:
            # The rank's own forward pass is not the exchange's cost: wait for it untimed, so
            # that exchange_wait_s counts the encode, the copy and the wait for peers only.
            own = torch.cuda.Event()
            own.record()
            own.synchronize()
        t0 = time.perf_counter()
        payload, finite = self.codec.encode_payload(head_probs, embedding)
        host = self._send_buffer()
        host[self.message_bytes - self.codec.payload_bytes:].copy_(payload, non_blocking=True)
        self._finite.copy_(finite, non_blocking=True)
        if payload.is_cuda:  # MPI reads host memory: the copies must have landed
            copied = torch.cuda.Event()
            copied.record()
            copied.synchronize()
        self._post_sends(host, key_hash, send_to)
        self.wait_seconds += time.perf_counter() - t0  # the exchange's cost: encode, copy, post

    def _send_later(self, key_hash, head_probs, embedding, send_to) -> None:
        payload, finite = self.codec.encode_payload(head_probs, embedding)
        host = self._send_buffer()
        side = self._side = self._side or torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            host[self.message_bytes - self.codec.payload_bytes:].copy_(payload, non_blocking=True)
            self._finite.copy_(finite, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        payload.record_stream(side)
        self._deferred = (host, key_hash, send_to, copied)

    def post_deferred(self) -> None:
        """Post the sends of a deferred :meth:`send` (waits for its copy, if it has not
        landed yet)."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        t0 = time.perf_counter()
        host, key_hash, send_to, copied = deferred
        copied.synchronize()
        self._post_sends(host, key_hash, send_to)
        self.wait_seconds += time.perf_counter() - t0

    def _post_sends(self, host: torch.Tensor, key_hash: int, send_to: list[int]) -> None:
        """The header, then an ``Isend`` per receiver; outputs that are not finite stop this
        client before anything is sent."""
        if not bool(self._finite):
            raise FloatingPointError(f"client {self.world.client}: non-finite outputs at step "
                                     f"{self._step} (training diverged: lower optim.lr or check "
                                     "the data); nothing was sent to its peers")
        message = host.numpy()
        self.codec.write_header(message, self._step, key_hash, self.world.client)
        requests = []
        for i in send_to:
            request = self.world.comm.Isend([message, MPI.BYTE], dest=self._rank_of(i), tag=_TAG)
            self._pending.append((request, i, False, host))
            requests.append(request)
        self._sends.append((requests, host))
        self.bytes_sent += self.message_bytes * len(send_to)

    def wait(self, key_hash: int) -> list[PeerOutputs]:
        """Wait for this step's receives (all of them, with a deadline that names the missing
        peers; or, with ``late_deadline_s``, those in time) and decode them, in the order they
        were posted, onto ``self.device``."""
        self.post_deferred()
        t0 = time.perf_counter()  # waiting starts here (the forward pass ran since posting)
        pending, self._pending = self._pending, []
        if self.late_deadline_s is None:
            if pending:
                self._wait_all(pending)
            received = [(j, buf) for _, j, is_recv, buf in pending if is_recv]
        else:
            received = self._wait_in_time([p for p in pending if p[2]], t0)
        out = [self.unpack(buf.numpy(), self._step, key_hash, j) for j, buf in received]
        for j, buf in received:
            self._free_recv[j].append(buf)
        if received and self.device.type == "cuda":
            self._decoded = torch.cuda.Event()
            self._decoded.record()
        self.bytes_received += self.message_bytes * len(received)
        self.wait_seconds += time.perf_counter() - t0
        return out

    def _wait_in_time(self, receives: list, t0: float) -> list[tuple[int, torch.Tensor]]:
        """Poll until every receive is in or the deadline passes; the late ones stay posted
        (their messages are discarded when they come). Sends are not waited for."""
        deadline = t0 + self.late_deadline_s
        requests = [r for r, _, _, _ in receives]
        poll = Poller()
        while requests and not all_done(requests) and time.perf_counter() < deadline:
            poll.pause()
        received = []
        for request, j, _, buf in receives:
            if request.Test():
                received.append((j, buf))
            else:
                self._late.append((request, j, buf, self._step))
                self.dropped += 1
        return received

    def _reap_late(self) -> None:
        """Receive (and check, and discard) late messages that have arrived meanwhile."""
        still = []
        for request, j, buf, step in self._late:
            if request.Test():
                got_step, _, sender = self.codec.read_header(buf.numpy())
                if (got_step, sender) != (step, j):
                    raise ExchangeError(f"{self.world.where()}: a late message from client {j} "
                                        f"was for step {got_step} from client {sender}, "
                                        f"expected step {step}")
                self._free_recv[j].append(buf)
                self.late_discarded += 1
                self.bytes_received += self.message_bytes
            else:
                still.append((request, j, buf, step))
        self._late = still

    def drain(self) -> None:
        """Settle every late receive and send still in flight (when the job ends: MPI must not
        finalise with requests open)."""
        requests = [r for r, *_ in self._late] + [r for rs, _ in self._sends for r in rs]
        if requests:
            wait_until(lambda: all_done(requests), self.timeout_s,
                       lambda: f"{self.world.where()} timed out after {self.timeout_s:.0f} s "
                               "settling late messages at the end (exchange.timeout_s)")
        self._reap_late()
        self._sends = []

    def take_dropped(self) -> int:
        out, self.dropped = self.dropped, 0
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
        requests = [r for r, _, _, _ in pending]

        def missing() -> str:
            return ", ".join(f"{'receive from' if is_recv else 'send to'} client {j} "
                             f"(rank {self._rank_of(j)})"
                             for r, j, is_recv, _ in pending if not r.Test())
        wait_until(lambda: all_done(requests), self.timeout_s,
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
                 device: torch.device | str = "cpu", late_deadline_s: float | None = None):
        """``late_deadline_s``: leave out peers whose messages are late (direct exchanges
        only: the leaders' relay always waits; the config requires equal rank counts)."""
        self.world = world
        self.slice_size = batch_size // world.local_size
        layout = dict(num_heads=num_heads, num_classes=num_classes, top_k=top_k,
                      embedding_dim=embedding_dim, timeout_s=timeout_s, device=device)
        self.slice = PredictionExchange(world, batch_size=self.slice_size,
                                        late_deadline_s=late_deadline_s, **layout)
        self.whole = PredictionExchange(world, batch_size=batch_size, **layout)
        self._direct: tuple[list[int], list[int]] = ([], [])
        self._relayed: tuple[list[int], list[int]] = ([], [])
        self._sent = False  # this step's direct sends are posted (overlapped step)

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

    def send(self, slice_hash: int, head_probs: list[torch.Tensor],
             embedding: torch.Tensor | None, defer: bool = False) -> None:
        """As soon as the public outputs exist: the direct sends (``defer``: see
        :meth:`PredictionExchange.send`)."""
        self.slice.send(slice_hash, head_probs, embedding, self._direct[0], defer=defer)
        self._sent = True

    def complete(self, slice_hash: int, batch_hash: int, head_probs: list[torch.Tensor],
                 embedding: torch.Tensor | None) -> list[PeerOutputs]:
        """After the forward pass: send (unless :meth:`send` did), relay through the leaders
        where needed, and wait."""
        if not self._sent:
            self.slice.send(slice_hash, head_probs, embedding, self._direct[0])
        self._sent = False
        got = {p.client: p for p in self.slice.wait(slice_hash)}
        if self._relayed[0] or self._relayed[1]:  # the same decision on every rank of the client
            got.update(self._through_leaders(self._step, batch_hash, head_probs, embedding,
                                             *self._relayed))
        return [got[j] for j in self._receive_from if j in got]  # late peers left out

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

    def take_dropped(self) -> int:
        """Peers left out for being late since the last call."""
        return self.slice.take_dropped()

    def drain(self) -> None:
        self.slice.drain()

    def take_counters(self) -> tuple[int, int, float]:
        """Direct (slice) traffic plus, on leaders, the whole-batch traffic they relay."""
        return tuple(a + b for a, b in zip(self.slice.take_counters(),
                                           self.whole.take_counters()))
