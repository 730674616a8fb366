"""The checkpoint pool (mhd_hpc/method/pool.py, Algorithm 2) and PoolTargets (mhd_hpc/method/pool_targets.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mhd_hpc.method import topology
from mhd_hpc.run.checkpoint_files import CheckpointError
from mhd_hpc.models import build_model
from mhd_hpc.run.checkpoint_files import pool_files
from mhd_hpc.method.pool import (CheckpointPool, flatten_state, load_flat_state,
                          refresh_sources, state_size)


def build(arch: str) -> torch.nn.Module:
    return build_model(arch, 10, 2, 1, 8, embedding_dim=16)


def test_flat_state_round_trip_keeps_outputs_and_buffers():
    torch.manual_seed(0)
    a, b = build("cnn_small"), build("cnn_small")
    a.train()(torch.randn(8, 1, 8, 8))  # move BN running stats away from their init
    flat = flatten_state(a)
    assert flat.dtype == np.float32 and flat.size == state_size(a)
    load_flat_state(b, flat)
    a.eval(), b.eval()
    x = torch.randn(4, 1, 8, 8)
    for la, lb in zip(a(x)[1], b(x)[1]):
        assert torch.equal(la, lb)
    assert b.state_dict()["backbone.features.1.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(ValueError, match="needs"):
        load_flat_state(build("resnet18"), flat)  # another architecture: clear error


def test_pool_fills_then_replaces_deterministically():
    flat = flatten_state(build("cnn_small"))
    pools = [CheckpointPool(2, client=0, seed=3, build=build) for _ in range(2)]
    for pool in pools:
        assert pool.draw(1, 1) == []  # empty pool: no targets yet
        for step, src in ((10, 1), (20, 2), (30, 3), (40, 1)):
            pool.insert(step, src, step - 5, "cnn_small", flat)
        assert len(pool.entries) == 2
    assert [(e.source_client, e.source_step) for e in pools[0].entries] == \
        [(e.source_client, e.source_step) for e in pools[1].entries]
    draws = [pools[0].draw(s, 2) for s in range(5)]
    assert all(len(d) == 2 and d[0] is not d[1] for d in draws)
    assert [e.source_step for e in pools[0].draw(7, 1)] == [e.source_step for e in pools[1].draw(7, 1)]


def test_a_fast_sender_does_not_crowd_a_slow_one_out_with_same_source():
    flat = flatten_state(build("cnn_small"))
    sources = {}
    for same in (False, True):
        pool = CheckpointPool(3, client=0, seed=1, build=build)
        pool.insert(0, 2, 0, "cnn_small", flat, same_source=same)  # the slow peer, once
        for step in range(1, 40):  # two fast peers, again and again
            pool.insert(step, 1 + step % 2 * 2, step, "cnn_small", flat, same_source=same)
        sources[same] = sorted(e.source_client for e in pool.entries)
    assert 2 not in sources[False]  # random replacement: it was evicted long ago
    assert sources[True] == [1, 2, 3]  # each fast one replaced its own oldest entry
    pool = CheckpointPool(2, client=0, seed=1, build=build)
    for step, src in ((1, 1), (2, 1), (3, 1)):
        pool.insert(step, src, step, "cnn_small", flat, same_source=True)
    assert sorted(e.source_step for e in pool.entries) == [2, 3]  # the oldest went


def test_refresh_sources_follow_the_topology():
    graph = topology.cycle(4)  # i receives from i-1
    assert refresh_sources(graph, 200, seed=0) == [3, 0, 1, 2]
    assert refresh_sources(topology.no_edges(3), 200, seed=0) == [-1, -1, -1]
    full = topology.complete(5)
    for step in range(0, 1000, 200):
        sources = refresh_sources(full, step, seed=1)
        assert all(s != i and s in full[i] for i, s in enumerate(sources))
        assert sources == refresh_sources(full, step, seed=1)


def test_pool_survives_a_restart_with_heterogeneous_peers(tmp_path):
    pool = CheckpointPool(3, client=0, seed=0, build=build)
    torch.manual_seed(1)
    peers = {1: build("cnn_small"), 2: build("resnet18")}
    for src, model in peers.items():
        pool.insert(10 * src, src, 10 * src - 5, "cnn_small" if src == 1 else "resnet18",
                    flatten_state(model))
    files = pool_files(tmp_path, 0, keep=2)
    files.save(20, pool.state(), {"step": 20})
    restored = CheckpointPool(3, client=0, seed=0, build=build)
    restored.load_state(files.load(20)[0])
    assert [(e.source_client, e.source_step, e.arch) for e in restored.entries] == \
        [(1, 5, "cnn_small"), (2, 15, "resnet18")]
    x = torch.randn(2, 1, 8, 8)
    for old, new in zip(pool.entries, restored.entries):
        assert torch.equal(old.model(x)[0], new.model(x)[0])
    files.path(20).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step_000000020.h5"):
        files.load(20)


def test_pool_targets_run_the_drawn_peer_models_on_the_public_batch():
    from mhd_hpc.method.pool import flatten_state
    from mhd_hpc.method.pool_targets import PoolSettings, PoolTargets

    def build(arch):
        return build_model(arch, 10, 2, 1, 8)

    # One client of one rank; no transfer is posted at these steps, so nothing talks.
    world = SimpleNamespace(client=0, is_leader=True, local_size=1)
    settings = PoolSettings(capacity=2, every=50, transfer_steps=5, delta=1, seed=0,
                            timeout_s=5, send_embedding=True)
    source = PoolTargets(world, [[1], [0]], ["cnn_small", "cnn_small"], build, settings)
    peer = build("cnn_small")
    source.pool.insert(3, source_client=1, source_step=2, arch="cnn_small",
                       flat=flatten_state(peer))
    pub = SimpleNamespace(images=torch.randn(6, 1, 8, 8))
    out = source.targets(7, pub, None, None)
    assert len(out) == 1 and out[0].client == 1
    assert all(torch.allclose(p.sum(1), torch.ones(6)) for p in out[0].head_probs)
    assert torch.allclose(out[0].embedding.norm(dim=1), torch.ones(6), atol=1e-5)
    assert source.stats() == {"pool_entries": 1.0, "staleness": 5.0}
