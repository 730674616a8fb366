"""Flat buffers (mhd_hpc/runtime/tensors.py): flatten and unflatten_into keep shapes and dtypes."""

import pytest
import torch

from mhd_hpc.runtime.tensors import flatten, unflatten_into


def test_flat_buffer_round_trip_keeps_shapes_and_dtypes():
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([7, 8], dtype=torch.int64),
               torch.ones(1, 1, 2, dtype=torch.float64)]
    flat = flatten(tensors)
    assert flat.dtype == torch.float32 and flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 1, 1]
    targets = [torch.zeros_like(t) for t in tensors]
    unflatten_into(flat * 2, targets)
    assert targets[1].dtype == torch.int64 and targets[1].tolist() == [14, 16]
    assert targets[0].shape == (2, 3) and targets[2].dtype == torch.float64
    with pytest.raises(ValueError, match="10 values"):
        unflatten_into(flat, targets[:1])
