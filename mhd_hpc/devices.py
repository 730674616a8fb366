"""Where a rank computes: its device, and getting batches there."""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "pick_device", "to_device"]

DEVICES = ("auto", "cpu", "cuda")


def pick_device(kind: str, node_local_rank: int) -> torch.device:
    """``cuda`` (or ``auto`` with CUDA present): the GPU of the node-local rank, made current;
    else the CPU."""
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", node_local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels onto the device; pinned memory makes the copy asynchronous."""
    if device.type == "cpu" or batch.images.is_cuda:  # DALI's GPU pipeline is already there
        return batch.images.to(device), batch.labels.to(device)
    return (batch.images.pin_memory().to(device, non_blocking=True),
            batch.labels.pin_memory().to(device, non_blocking=True))
