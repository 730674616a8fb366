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

import numpy as np
import torch

from mhd_hpc.losses import densify_topk

__all__ = ["HEADER", "MessageCodec"]

HEADER = np.dtype([("step", "<i8"), ("hash", "<u8"), ("sender", "<i8")])


class MessageCodec:
    """Fixed-size messages of one job: ``num_heads`` heads of ``batch_size`` samples."""

    def __init__(self, num_heads: int, num_classes: int, batch_size: int, top_k: int,
                 embedding_dim: int):
        if not 0 <= top_k <= num_classes:
            raise ValueError(f"top_k={top_k} must be in [0, num_classes={num_classes}]")
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
    # All heads are encoded and decoded together (a handful of kernels per message, whatever
    # the number of heads): a head's bytes are [values; indices], heads follow each other.

    @torch.no_grad()
    def encode_payload(self, head_probs: list[torch.Tensor], embedding: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 payload, bool "every value finite") on the probabilities' device; nothing
        here waits for the device."""
        if len(head_probs) != self.num_heads:
            raise ValueError(f"expected {self.num_heads} heads, got {len(head_probs)}")
        probs = torch.stack([p.detach() for p in head_probs]).float()  # (H, B, C)
        # The finiteness of a sum, not isfinite().all(): 30x cheaper on a CPU (one reduction,
        # no bool tensor) and exact here: a NaN or inf anywhere makes the sum non-finite, and
        # probabilities and unit-norm embeddings are too small to overflow it.
        finite = torch.isfinite(probs.sum())
        if self.top_k:
            values, indices = probs.topk(self.top_k, dim=2)
            heads = torch.stack([values.half().view(torch.uint8).flatten(1),
                                 indices.to(torch.int16).view(torch.uint8).flatten(1)], dim=1)
        else:
            heads = probs.half().view(torch.uint8)
        parts = [heads.reshape(-1)]
        if self.embedding_dim:
            if embedding is None:
                raise ValueError("this exchange carries embeddings but none was given")
            finite = finite & torch.isfinite(embedding.detach().float().sum())
            parts.append(embedding.detach().half().view(torch.uint8).reshape(-1))
        payload = torch.cat(parts) if len(parts) > 1 else parts[0]
        assert payload.numel() == self.payload_bytes, (payload.numel(), self.payload_bytes)
        return payload, finite

    def decode_payload(self, payload: torch.Tensor) -> tuple[list[torch.Tensor],
                                                             torch.Tensor | None]:
        """Dense float32 (B, C) probabilities per head and the float32 embedding (or None),
        on the payload's device."""
        b, c, h = self.batch_size, self.num_classes, self.num_heads
        k = self.top_k or c
        per_head = self._probs_bytes + self._index_bytes
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
