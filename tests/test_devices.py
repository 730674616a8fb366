"""Device choices (mhd_hpc/devices.py): precision, channels-last layout, the shared-GPU rule."""

import pytest
import torch

from mhd_hpc.devices import (Precision, clients_sharing_a_gpu, resolve_channels_last,
                             resolve_precision)


def test_precision_and_layout_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu)[0] == Precision("fp32")
    assert resolve_precision("bf16", cpu)[0].dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu)[0].scaled
    assert not resolve_channels_last("auto", cpu) and resolve_channels_last(True, cpu)
    with Precision("bf16").autocast(cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_shared_gpu_rule_is_a_function_of_the_layout():
    # 2 clients x 2 ranks on one node with 1 GPU: both clients share it.
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], ["a"] * 4, [0, 1, 2, 3], 1) == [0, 1]
    # 4 GPUs: every rank has its own.
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], ["a"] * 4, [0, 1, 2, 3], 4) == []
    # 2 GPUs: client 0 = local ranks 0, 1 -> GPUs 0, 1; client 1 = 2, 3 -> GPUs 0, 1: fine.
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], ["a"] * 4, [0, 1, 2, 3], 2) == []
    # 3 GPUs: client 1 = local ranks 2, 3 -> GPUs 2, 0, client 2 = 4, 5 -> 1, 2.
    assert clients_sharing_a_gpu([[0, 1], [2, 3], [4, 5]], ["a"] * 6, range(6), 3) == []
    # Two nodes, one GPU each: a client spanning both nodes is fine, one within a node is not.
    hosts = ["a", "b", "a", "a"]
    assert clients_sharing_a_gpu([[0, 1], [2, 3]], hosts, [0, 0, 1, 2], 1) == [1]
    assert clients_sharing_a_gpu([[0], [1]], ["a", "a"], [0, 1], 1) == []  # one rank each
    assert clients_sharing_a_gpu([[0, 1]], ["a", "a"], [0, 1], 0) == []  # no GPU at all
