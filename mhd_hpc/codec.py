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
    @torch.no_grad()
    def encode_payload(self, head_probs: list[torch.Tensor], embedding: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 payload, bool "every value finite") on the probabilities' device; nothing
        here waits for the device."""
        if len(head_probs) != self.num_heads:
            raise ValueError(f"expected {self.num_heads} heads, got {len(head_probs)}")
        parts, finite = [], []
        for probs in head_probs:
            probs = probs.detach().float()
            finite.append(torch.isfinite(probs).all())
            if self.top_k:
                values, indices = probs.topk(self.top_k, dim=1)
                parts += [values.half(), indices.to(torch.int16)]
            else:
                parts.append(probs.half())
        if self.embedding_dim:
            if embedding is None:
                raise ValueError("this exchange carries embeddings but none was given")
            finite.append(torch.isfinite(embedding).all())
            parts.append(embedding.detach().half())
        payload = torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])
        assert payload.numel() == self.payload_bytes, (payload.numel(), self.payload_bytes)
        return payload, torch.stack(finite).all()

    def decode_payload(self, payload: torch.Tensor) -> tuple[list[torch.Tensor],
                                                             torch.Tensor | None]:
        """Dense float32 (B, C) probabilities per head and the float32 embedding (or None),
        on the payload's device."""
        b, c = self.batch_size, self.num_classes
        k = self.top_k or c
        offset, heads = 0, []
        for _ in range(self.num_heads):
            probs = payload[offset:offset + self._probs_bytes].view(torch.float16).view(b, k)
            offset += self._probs_bytes
            if self.top_k:
                idx = payload[offset:offset + self._index_bytes].view(torch.int16).view(b, k)
                offset += self._index_bytes
                heads.append(densify_topk(probs, idx, c))
            else:
                heads.append(probs.float())
        emb = None
        if self.embedding_dim:
            emb = payload[offset:offset + self._emb_bytes].view(torch.float16) \
                .view(b, self.embedding_dim).float()
        return heads, emb

    # -- header, on the host ----------------------------------------------------------------
    @staticmethod
    def write_header(message: np.ndarray, step: int, key_hash: int, sender: int) -> None:
        message[:HEADER.itemsize] = np.array([(step, key_hash, sender)], dtype=HEADER) \
            .view(np.uint8)

    @staticmethod
    def read_header(message: np.ndarray) -> tuple[int, int, int]:
        h = message[:HEADER.itemsize].view(HEADER)[0]
        return int(h["step"]), int(h["hash"]), int(h["sender"])
