"""Point-to-point exchange of public-batch predictions between clients (design §3).

At step t client j sends to every client that chose it as a distillation target, and receives
from the peers it chose; all clients derive the same schedule from the shared seed, so no
negotiation is needed. A message is one contiguous byte buffer (``Isend``/``Irecv``, no pickle):

    header  : int64 step, uint64 hash of the public-batch sample keys, int64 sender client
    per head: fp16 probabilities (B, k) + int16 class indices (B, k)   when top_k > 0
              fp16 probabilities (B, C)                                when top_k == 0
    emb     : fp16 L2-normalised embedding (B, D)                       when the embedding is sent

Every receiver checks step and key hash; a mismatch means the clients are not looking at the same
public samples and is an error, never silently wrong targets.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from mpi4py import MPI

from mhd_hpc.distributed.p2p import ExchangeError, TrafficCounters, wait_until
from mhd_hpc.distributed.world import World
from mhd_hpc.losses import PeerOutputs, densify_topk

_TAG = 17
_HEADER = np.dtype([("step", "<i8"), ("hash", "<u8"), ("sender", "<i8")])


class PredictionExchange(TrafficCounters):
    """Fixed-size message layout for a job, plus the send/receive of one step."""

    def __init__(self, world: World, num_heads: int, num_classes: int, batch_size: int,
                 top_k: int, embedding_dim: int, timeout_s: float):
        super().__init__()
        self.world = world
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.batch_size = batch_size
        if not 0 <= top_k <= num_classes:
            raise ValueError(f"top_k={top_k} must be in [0, num_classes={num_classes}]")
        self.top_k = top_k if top_k < num_classes else 0  # the top C of C is the whole
        self.embedding_dim = embedding_dim
        self.timeout_s = timeout_s
        k = self.top_k or num_classes
        self._probs_bytes = batch_size * k * 2
        self._index_bytes = batch_size * k * 2 if self.top_k else 0
        self._emb_bytes = batch_size * embedding_dim * 2
        self.message_bytes = (_HEADER.itemsize + num_heads * (self._probs_bytes + self._index_bytes)
                              + self._emb_bytes)

    # -- encoding ---------------------------------------------------------------------------
    def pack(self, step: int, key_hash: int, client: int, head_probs: list[torch.Tensor],
             embedding: torch.Tensor | None) -> np.ndarray:
        """Encode this client's outputs into one contiguous uint8 buffer."""
        if len(head_probs) != self.num_heads:
            raise ValueError(f"expected {self.num_heads} heads, got {len(head_probs)}")
        parts = [np.array([(step, key_hash, client)], dtype=_HEADER).view(np.uint8)]
        for probs in head_probs:
            probs = probs.detach().float()
            if self.top_k:
                values, indices = probs.topk(self.top_k, dim=1)
                parts.append(values.numpy().astype(np.float16).view(np.uint8).ravel())
                parts.append(indices.numpy().astype(np.int16).view(np.uint8).ravel())
            else:
                parts.append(probs.numpy().astype(np.float16).view(np.uint8).ravel())
        if self.embedding_dim:
            if embedding is None:
                raise ValueError("this exchange carries embeddings but none was given")
            parts.append(embedding.detach().float().numpy().astype(np.float16)
                         .view(np.uint8).ravel())
        buf = np.concatenate(parts)
        assert buf.nbytes == self.message_bytes, (buf.nbytes, self.message_bytes)
        return buf

    def unpack(self, buf: np.ndarray, expect_step: int, expect_hash: int,
               expect_client: int) -> PeerOutputs:
        """Decode a peer's buffer, checking it is about the same step and public samples."""
        header = buf[:_HEADER.itemsize].view(_HEADER)[0]
        step, key_hash, sender = int(header["step"]), int(header["hash"]), int(header["sender"])
        where = f"client {expect_client}"
        if sender != expect_client or step != expect_step:
            raise ExchangeError(f"{self.world.where()} expected step {expect_step} from {where} "
                                f"but got step {step} from client {sender}")
        if key_hash != expect_hash:
            raise ExchangeError(f"{self.world.where()}: public batch of step {step} from {where} "
                                f"covers different samples (key hash {key_hash:016x} != ours "
                                f"{expect_hash:016x}); clients disagree on the public stream")
        b, c = self.batch_size, self.num_classes
        k = self.top_k or c
        offset = _HEADER.itemsize
        heads = []
        for _ in range(self.num_heads):
            probs = torch.from_numpy(buf[offset:offset + self._probs_bytes].view(np.float16)
                                     .reshape(b, k).astype(np.float32))
            offset += self._probs_bytes
            if self.top_k:
                idx = torch.from_numpy(buf[offset:offset + self._index_bytes].view(np.int16)
                                       .reshape(b, k).astype(np.int64))
                offset += self._index_bytes
                probs = densify_topk(probs, idx, c)
            heads.append(probs)
        emb = None
        if self.embedding_dim:
            emb = torch.from_numpy(buf[offset:offset + self._emb_bytes].view(np.float16)
                                   .reshape(b, self.embedding_dim).astype(np.float32))
        return PeerOutputs(expect_client, heads, emb)

    # -- one step ---------------------------------------------------------------------------
    def exchange(self, step: int, key_hash: int, head_probs: list[torch.Tensor],
                 embedding: torch.Tensor | None, send_to: list[int], receive_from: list[int],
                 rank_of: Callable[[int], int] | None = None) -> list[PeerOutputs]:
        """Send our outputs to ``send_to`` clients and receive those of ``receive_from``;
        ``rank_of(client)`` is the rank to talk to (default: the client's leader)."""
        rank_of = rank_of or self.world.rank_of_client
        comm = self.world.comm
        me = self.world.client
        t0 = time.perf_counter()
        recv_bufs = {j: np.empty(self.message_bytes, dtype=np.uint8) for j in receive_from}
        requests = [comm.Irecv([recv_bufs[j], MPI.BYTE], source=rank_of(j), tag=_TAG)
                    for j in receive_from]
        owners = list(receive_from)
        if send_to:
            out = self.pack(step, key_hash, me, head_probs, embedding)
            for i in send_to:
                requests.append(comm.Isend([out, MPI.BYTE], dest=rank_of(i), tag=_TAG))
                owners.append(i)
            self.bytes_sent += out.nbytes * len(send_to)
        self._wait_all(requests, owners, step, len(receive_from), rank_of)
        self.wait_seconds += time.perf_counter() - t0
        self.bytes_received += self.message_bytes * len(receive_from)
        return [self.unpack(recv_bufs[j], step, key_hash, j) for j in receive_from]

    def _wait_all(self, requests: list, owners: list[int], step: int, num_recv: int,
                  rank_of: Callable[[int], int]) -> None:
        """Wait with a deadline; on timeout name the peers that never answered."""
        def pending() -> str:
            return ", ".join(
                f"{'receive from' if n < num_recv else 'send to'} client {owners[n]} "
                f"(rank {rank_of(owners[n])})"
                for n, r in enumerate(requests) if not r.Test())
        wait_until(lambda: MPI.Request.Testall(requests), self.timeout_s,
                    lambda: f"{self.world.where()} timed out after {self.timeout_s:.0f} s at "
                            f"step {step} waiting to {pending()} (exchange.timeout_s)")


class ClientExchange:
    """The prediction exchange between clients made of one or more ranks.

    Every rank holds its slice of the common public batch. Rank r of client i talks to rank r of
    client j directly when both clients have the same number of ranks (their slices cover the
    same samples, no gather). Otherwise the clients' leaders speak for them: the leader gathers
    its ranks' slices, exchanges whole-batch messages with the other leader, and scatters each
    rank its slice of what arrived. Slices are checked against the hash of their own keys; whole
    batches against the hash of the whole batch's keys.
    """

    def __init__(self, world: World, num_heads: int, num_classes: int, batch_size: int,
                 top_k: int, embedding_dim: int, timeout_s: float):
        self.world = world
        self.slice_size = batch_size // world.local_size
        self.slice = PredictionExchange(world, num_heads, num_classes, self.slice_size, top_k,
                                        embedding_dim, timeout_s)
        self.whole = PredictionExchange(world, num_heads, num_classes, batch_size, top_k,
                                        embedding_dim, timeout_s)

    def exchange(self, step: int, slice_hash: int, batch_hash: int,
                 head_probs: list[torch.Tensor], embedding: torch.Tensor | None,
                 send_to: list[int], receive_from: list[int]) -> list[PeerOutputs]:
        w = self.world
        assert w.layout is not None
        n = w.local_size
        same = [c for c in set(send_to) | set(receive_from) if w.layout.size_of(c) == n]
        got = {p.client: p for p in self.slice.exchange(
            step, slice_hash, head_probs, embedding, [i for i in send_to if i in same],
            [j for j in receive_from if j in same], rank_of=lambda c: w.peer_rank(c, w.local_rank))}
        lead_send = [i for i in send_to if i not in same]
        lead_recv = [j for j in receive_from if j not in same]
        if lead_send or lead_recv:  # the same decision on every rank of the client
            got.update(self._through_leaders(step, batch_hash, head_probs, embedding,
                                             lead_send, lead_recv))
        return [got[j] for j in receive_from]

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
