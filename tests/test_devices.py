"""Device choices (mhd_hpc/runtime/devices.py): precision, channels-last layout, the shared-GPU rule."""

import os

import pytest
import torch

from mhd_hpc.runtime.devices import (Placement, Precision, assign_gpus, clients_sharing_a_gpu,
                                     place, resolve_channels_last, resolve_precision)


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


def _mapping(places):
    """(host, GPU identity) of the GPU each rank uses, from each rank's (host, visible GPUs)."""
    return [(h, gpus[i]) for (h, gpus), i in zip(places, assign_gpus(places))]


NODE = ("GPU-a0", "GPU-a1", "GPU-a2", "GPU-a3")  # one node's four GPUs, by UUID


def test_gpu_assignment_follows_what_each_rank_sees():
    # Whole-node visibility (mpirun, srun without binding): node-local rank modulo the GPUs.
    assert assign_gpus([("a", NODE)] * 4) == [0, 1, 2, 3]
    assert assign_gpus([("a", NODE)] * 4 + [("b", NODE)] * 2) == [0, 1, 2, 3, 0, 1]
    # --gpus-per-task=1 or CUDA_VISIBLE_DEVICES set per rank: each sees one GPU, its own,
    # which torch calls cuda:0 in every rank.
    per_task = [("a", (g,)) for g in NODE]
    assert assign_gpus(per_task) == [0, 0, 0, 0]
    assert len(set(_mapping(per_task))) == 4
    # --gpu-bind=closest: two ranks per socket see that socket's two GPUs.
    closest = [("a", NODE[:2]), ("a", NODE[:2]), ("a", NODE[2:]), ("a", NODE[2:])]
    assert assign_gpus(closest) == [0, 1, 0, 1]
    assert len(set(_mapping(closest))) == 4
    # More ranks than GPUs on a node: they wrap around.
    assert assign_gpus([("a", NODE[:2])] * 3) == [0, 1, 0]
    assert assign_gpus([("a", ())]) == [-1]  # no GPU


def test_shared_gpu_rule_compares_gpu_identities():
    client_of_two = [[0, 1], [2, 3]]
    # --gpus-per-task=1 on a 4-GPU node: every rank has device_count() == 1, yet no two ranks
    # share a GPU (node-local arithmetic said all four shared GPU 0).
    per_task = [("a", (g,)) for g in NODE]
    assert clients_sharing_a_gpu(client_of_two, _mapping(per_task)) == []
    # The same with a wrapper that sets CUDA_VISIBLE_DEVICES per rank, on two nodes.
    two_nodes = [("a", ("GPU-a0",)), ("b", ("GPU-b0",)), ("a", ("GPU-a1",)), ("b", ("GPU-b1",))]
    assert clients_sharing_a_gpu(client_of_two, _mapping(two_nodes)) == []
    # Whole-node visibility, 4 GPUs: every rank has its own.
    assert clients_sharing_a_gpu(client_of_two, _mapping([("a", NODE)] * 4)) == []
    # One GPU for four ranks: both clients share it.
    assert clients_sharing_a_gpu(client_of_two, _mapping([("a", NODE[:1])] * 4)) == [0, 1]
    # 3 GPUs, 3 clients of 2 ranks: ranks 0..5 -> GPUs 0 1 2 0 1 2: no client shares.
    assert clients_sharing_a_gpu([[0, 1], [2, 3], [4, 5]],
                                 _mapping([("a", NODE[:3])] * 6)) == []
    # A client across two nodes with one GPU each is fine; one within a node is not.
    spread = [("a", NODE[:1]), ("b", ("GPU-b0",)), ("a", NODE[:1]), ("a", NODE[:1])]
    assert clients_sharing_a_gpu(client_of_two, _mapping(spread)) == [1]
    assert clients_sharing_a_gpu([[0], [1]], _mapping([("a", NODE[:1])] * 2)) == []
    assert clients_sharing_a_gpu(client_of_two, []) == []  # CPUs: nothing to share


def test_placement_on_cpu_is_collective_and_says_nothing():
    calls = []

    def allgather(obj):
        calls.append(obj)
        return [obj]

    placement = place("cpu", 0, allgather)
    assert placement.device == torch.device("cpu") and placement.gpus == []
    assert placement.cpus == [len(os.sched_getaffinity(0))]
    assert len(calls) == 1  # every rank takes part, GPU or not
    assert placement.describe("gloo") is None
    line = Placement(torch.device("cpu"), [("a", "GPU-a0"), ("a", "GPU-a1")]).describe("nccl")
    assert "0->a:GPU-a0" in line and "2 distinct GPU(s) for 2 ranks" in line and "nccl" in line


def test_threads_beyond_a_ranks_cpus_are_warned():
    cpus = Placement(torch.device("cpu"), cpus=[8, 8, 2, 8])
    fits = cpus.cpu_lines(threads=4, loader_threads=4)
    assert fits == ["CPUs per rank (affinity): 2-8; threads per rank: 4 torch + 4 loader",
                    "WARNING rank(s) 2 have 2 CPU(s) but run 4 torch thread(s) (run.threads) + 4 "
                    "loader thread(s) (data.loader_threads): lower them, or give each task more "
                    "CPUs (srun/sbatch --cpus-per-task)"]
    assert len(cpus.cpu_lines(threads=1, loader_threads=1)) == 1  # 2 threads fit 2 CPUs
