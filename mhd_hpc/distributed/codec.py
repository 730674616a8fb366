"""The layout of one prediction message, encoded and decoded where the tensors are (no MPI).

    header  : int64 step, uint64 hash of the public-batch sample keys, int64 sender client
    per head: fp16 probabilities (B, k) + int16 class indices (B, k)   when top_k > 0
              fp16 probabilities (B, C)                                when top_k == 0
    emb     : fp16 L2-normalised embedding (B, D)                       when the embedding is sent

The payload (everything after the header) is built on the device that holds the model's outputs
(top-k and the fp16/int16 casts run there, so a GPU sends a compact buffer with one copy) and
decoded on the receiver's device after one copy back. The header is written and read on the host,
where MPI needs it. The transport is ``distributed/exchange.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PeerOutputs", "HEADER", "MessageCodec", "top_k_problem", "densify_topk"]


@dataclass
class PeerOutputs:
    """What one peer computed on the current public batch: the distillation targets it offers."""

    client: int
    head_probs: list[Tensor]  # dense (B, C) float32 per head, main first
    embedding: Tensor | None  # (B, D) float32, already normalised; None when not sent


HEADER = np.dtype([("step", "<i8"), ("hash", "<u8"), ("sender", "<i8")])


def top_k_problem(top_k: int, num_classes: int) -> str | None:
    """Why ``exchange.top_k`` cannot be used with ``num_classes`` classes (None: it can). The one
    statement of the bound: the config checks it where the classes are known before start, the
    trainer against a shard dataset's manifest, and the codec itself."""
    if not 0 <= top_k <= num_classes:
        return f"must be in [0, {num_classes}] (the dataset's classes), got {top_k}"
    return None


def densify_topk(probs: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rebuild (..., B, C) distributions from top-k probabilities and class indices (..., B, k).

    Unlisted classes share the leftover mass 1 - sum(probs) (clamped at 0) uniformly; for a true
    top-k each unlisted class had at most the k-th probability, so the maximum (the confidence
    used for selection) is unchanged. Half precision inputs are upcast to float32 because the
    per-class leftover can be below fp16's normal range. Leading dimensions (e.g. heads) are
    handled in the same few kernels.
    """
    if probs.dim() < 2 or probs.shape != indices.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and indices {tuple(indices.shape)} "
                         "must both be (B, k) (or (..., B, k))")
    k = probs.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k={k} must be in [1, num_classes={num_classes}]")
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()
    indices = indices.long()
    shape = (*probs.shape[:-1], num_classes)
    if k == num_classes:
        return torch.zeros(shape, dtype=probs.dtype, device=probs.device).scatter_(
            -1, indices, probs)
    rest = (1.0 - probs.sum(dim=-1)).clamp_min(0.0) / (num_classes - k)
    out = rest[..., None].expand(shape).clone()
    return out.scatter_(-1, indices, probs)




class MessageCodec:
    """Fixed-size messages of one job: ``num_heads`` heads of ``batch_size`` samples. A message
    carries the heads a receiver distills from: main .. aux_{m-1}; the last aux head is never a
    target (aux_k learns from aux_{k-1}), so it is not sent."""

    def __init__(self, num_heads: int, num_classes: int, batch_size: int, top_k: int,
                 embedding_dim: int):
        problem = top_k_problem(top_k, num_classes)
        if problem:
            raise ValueError(f"top_k {problem}")
        self.num_heads, self.num_classes, self.batch_size = num_heads, num_classes, batch_size
        self.top_k = top_k if top_k < num_classes else 0  # the top C of C is the whole
        self.embedding_dim = embedding_dim
        k = self.top_k or num_classes
        self._probs_bytes = batch_size * k * 2
        self._index_bytes = batch_size * k * 2 if self.top_k else 0
        self._emb_bytes = batch_size * embedding_dim * 2
        self.payload_bytes = (num_heads * (self._probs_bytes + self._index_bytes)
                              + self._emb_bytes)
        self.message_bytes = HEADER.itemsize + self.payload_bytes

    # -- payload, on the tensors' device ----------------------------------------------------
    # A head's bytes are [values; indices], heads follow each other, then the embedding. On a
    # GPU all heads are encoded together (a handful of kernels per message, whatever the number
    # of heads: 0.83 ms for pack + unpack of a top-10 ImageNet message on an H200); on a CPU head
    # by head, which skips a copy of every distribution and is faster there (top-10 message,
    # 5 x 512 x 1000: 5.9 ms against 7.0-9.4 ms stacked, 2 ranks on 2 cores). Same bytes.

    @torch.no_grad()
    def encode_payload(self, head_probs: list[torch.Tensor], embedding: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 payload, bool "every value finite") on the probabilities' device; nothing
        here waits for the device."""
        if len(head_probs) != self.num_heads:
            raise ValueError(f"expected {self.num_heads} heads, got {len(head_probs)}")
        probs = [p.detach() for p in head_probs]
        if not probs:  # an embedding-only message (no aux head distills from a peer head)
            device = embedding.device if embedding is not None else "cpu"
            parts, sums = [], torch.zeros((), device=device)
        elif probs[0].is_cuda:
            parts, sums = self._encode_stacked(probs)
        else:
            parts, sums = self._encode_per_head(probs)
        if self.embedding_dim:
            if embedding is None:
                raise ValueError("this exchange carries embeddings but none was given")
            embedding = embedding.detach()
            parts.append(embedding.half().view(torch.uint8).reshape(-1))
            sums = sums + embedding.float().sum()
        # The finiteness of a sum, not isfinite().all(): one reduction (30x cheaper on a CPU)
        # and exact here: a NaN or inf anywhere makes the sum non-finite, and probabilities and
        # unit-norm embeddings are far too small to overflow it.
        payload = (torch.cat(parts) if len(parts) > 1 else parts[0] if parts
                   else torch.empty(0, dtype=torch.uint8))
        assert payload.numel() == self.payload_bytes, (payload.numel(), self.payload_bytes)
        return payload, torch.isfinite(sums)

    def _encode_stacked(self, probs: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                  torch.Tensor]:
        stacked = torch.stack(probs).float()  # (H, B, C)
        if self.top_k:
            values, indices = stacked.topk(self.top_k, dim=2)
            heads = torch.stack([values.half().view(torch.uint8).flatten(1),
                                 indices.to(torch.int16).view(torch.uint8).flatten(1)], dim=1)
        else:
            heads = stacked.half().view(torch.uint8)
        return [heads.reshape(-1)], stacked.sum()

    def _encode_per_head(self, probs: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                   torch.Tensor]:
        parts, sums = [], []
        for p in probs:
            p = p.float()
            sums.append(p.sum())
            if self.top_k:
                values, indices = p.topk(self.top_k, dim=1)
                parts += [values.half().view(torch.uint8).reshape(-1),
                          indices.to(torch.int16).view(torch.uint8).reshape(-1)]
            else:
                parts.append(p.half().view(torch.uint8).reshape(-1))
        return parts, torch.stack(sums).sum()

    def decode_payload(self, payload: torch.Tensor) -> tuple[list[torch.Tensor],
                                                             torch.Tensor | None]:
        """Dense float32 (B, C) probabilities per head and the float32 embedding (or None),
        on the payload's device."""
        b, c, h = self.batch_size, self.num_classes, self.num_heads
        k = self.top_k or c
        per_head = self._probs_bytes + self._index_bytes
        if h == 0:
            emb = payload.view(torch.float16).view(b, self.embedding_dim).float()
            return [], emb
        rows = payload[:h * per_head].view(h, per_head)
        values = rows[:, :self._probs_bytes].view(torch.float16).view(h, b, k)
        if self.top_k:
            indices = rows[:, self._probs_bytes:].view(torch.int16).view(h, b, k)
            dense = densify_topk(values, indices, c)
        else:
            dense = values.float()
        emb = None
        if self.embedding_dim:
            emb = payload[h * per_head:].view(torch.float16).view(b, self.embedding_dim).float()
        return list(dense.unbind(0)), emb

    # -- header, on the host ----------------------------------------------------------------
    @staticmethod
    def write_header(message: np.ndarray, step: int, key_hash: int, sender: int) -> None:
        message[:HEADER.itemsize] = np.array([(step, key_hash, sender)], dtype=HEADER) \
            .view(np.uint8)

    @staticmethod
    def read_header(message: np.ndarray) -> tuple[int, int, int]:
        h = message[:HEADER.itemsize].view(HEADER)[0]
        return int(h["step"]), int(h["hash"]), int(h["sender"])
