"""One flat buffer from many tensors and back: the layout every collective and transfer uses.

FedAvg weights, supervised-baseline gradients, intra-client gradient averages and pool-mode
checkpoints all move a list of tensors as one contiguous vector (one MPI or NCCL call instead of
one per tensor). ``flatten`` and ``unflatten_into`` are that layout's only definition.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["flatten", "unflatten_into", "total_numel"]


def total_numel(tensors: Sequence[torch.Tensor]) -> int:
    """Length of ``flatten(tensors)``, without copying."""
    return sum(t.numel() for t in tensors)


def flatten(tensors: Sequence[torch.Tensor], device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensors' values, in order, as one contiguous 1-D tensor of ``dtype`` on ``device``
    (default: where the first tensor is)."""
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    device = tensors[0].device if device is None else device
    # Join where the tensors are, then move once: one device -> host copy per call, not one
    # (blocking) copy per tensor.
    if all(t.device == tensors[0].device for t in tensors):
        return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]).to(device)
    return torch.cat([t.detach().reshape(-1).to(device, dtype) for t in tensors])


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` in place (each keeps its own
    shape, dtype and device)."""
    if flat.numel() != total_numel(tensors):
        raise ValueError(f"flat buffer has {flat.numel()} values, the tensors need "
                         f"{total_numel(tensors)}")
    offset = 0
    if tensors and all(t.device == tensors[0].device for t in tensors):
        flat = flat.to(tensors[0].device)  # one copy to their device, then slices of it
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
