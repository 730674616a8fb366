"""Step-indexed batches (mhd_hpc/data/read/batches.py): deterministic, resumable, parts; key hashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhd_hpc.data.read.batches import StepBatches, iterate_eval, key_hash
from mhd_hpc.data.shards import Samples

NORM = {"scale": 1.0, "mean": [0.0], "std": [1.0]}


def _toy(n: int, shape: tuple[int, int, int] = (1, 2, 2)) -> Samples:
    rng = np.random.default_rng(123)
    return Samples(keys=[f"s{i:03d}" for i in range(n)],
                   images=rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
                   labels=np.arange(n, dtype=np.int64) % 7)


def test_step_batches_deterministic_and_aligned() -> None:
    s = _toy(10)
    a, b = StepBatches(s, 4, NORM, seed=7), StepBatches(s, 4, NORM, seed=7)
    c = StepBatches(s, 4, NORM, seed=8)
    keys_a = [a.batch(t).keys for t in range(6)]
    assert keys_a == [b.batch(t).keys for t in range(6)]  # two clients, same public stream
    assert keys_a == [a.batch(t).keys for t in range(6)]  # repeatable
    assert keys_a != [c.batch(t).keys for t in range(6)]
    bt = a.batch(3)
    assert bt.images.shape == (4, 1, 2, 2) and bt.labels.dtype == torch.int64
    assert a.global_key_hash(3) == key_hash(bt.keys) == b.global_key_hash(3)


def test_step_batches_epochs_and_resume() -> None:
    s = _toy(10)
    sb = StepBatches(s, 5, NORM, seed=3)
    for epoch in range(3):  # with B | N, each epoch is two batches covering all once
        keys = sb.batch(2 * epoch).keys + sb.batch(2 * epoch + 1).keys
        assert sorted(keys) == s.keys
    assert sb.epoch_of(4) == 2.0
    # Batches crossing epoch boundaries (B does not divide N), and B > N.
    for bs in (3, 23):
        stream = [k for t in range(10) for k in StepBatches(s, bs, NORM, seed=3).batch(t).keys]
        resumed = StepBatches(s, bs, NORM, seed=3)  # fresh object = restarted job
        assert [k for t in range(4, 10) for k in resumed.batch(t).keys] == stream[4 * bs:]
        for e in range(len(stream) // 10):
            assert sorted(stream[10 * e:10 * e + 10]) == s.keys
    plain = StepBatches(s, 4, NORM, seed=0, shuffle=False)
    assert plain.batch(2).keys == ["s008", "s009", "s000", "s001"]


def test_step_batches_parts_and_errors() -> None:
    s = _toy(10)
    full = StepBatches(s, 7, NORM, seed=1)
    parts = [StepBatches(s, 7, NORM, seed=1, part=p, num_parts=3) for p in range(3)]
    for t in range(4):
        got = [p.batch(t) for p in parts]
        assert [len(g) for g in got] == [3, 2, 2]
        assert sum((g.keys for g in got), []) == full.batch(t).keys
        assert torch.equal(torch.cat([g.images for g in got]), full.batch(t).images)
    with pytest.raises(ValueError):
        StepBatches(s, 0, NORM, seed=1)
    with pytest.raises(ValueError):
        StepBatches(_toy(0), 4, NORM, seed=1)


def test_key_hash_and_iterate_eval() -> None:
    assert key_hash(["a", "b"]) != key_hash(["b", "a"])
    assert key_hash(["ab", "c"]) != key_hash(["a", "bc"])
    assert 0 <= key_hash(["a"]) < 2**64
    s = _toy(10)
    batches = list(iterate_eval(s, 4, NORM))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum((b.keys for b in batches), []) == s.keys
    assert torch.equal(torch.cat([b.images for b in batches]), torch.from_numpy(s.images).float())
