"""Background weight transfers (mhd_hpc/distributed/transfer.py) on a world of one rank: the
client sends its checkpoints to itself (MPI delivers a send to the own rank like any other)."""

import time

import numpy as np
import pytest

from mhd_hpc.distributed.p2p import ExchangeError
from mhd_hpc.distributed.transfer import AsyncWeightTransfer, LeadBound, WeightTransfer

HEADER = 24  # step, sender, count: three int64


def weights(n, seed):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_a_transfer_falls_due_at_its_step_and_not_before(one_rank_world):
    t = WeightTransfer(one_rank_world, timeout_s=10)
    flat = weights(50, 0)
    t.post_receive(0, 50, due=5)
    t.post_send(3, flat, [0])
    t.poll()
    assert t.complete(4) == []  # not due yet, whether or not it has arrived
    [(source, step, got)] = t.complete(5)
    assert (source, step) == (0, 3) and np.array_equal(got, flat)
    assert t.complete(6) == []
    assert t.take_counters()[:2] == (HEADER + 4 * 50, HEADER + 4 * 50)


def test_settled_transfers_survive_a_checkpoint_round_trip(one_rank_world):
    """Arrived but not due at a checkpoint: saved in the state, restored into a new transfer
    (a resumed run), it falls due at its own step with the same weights."""
    t = WeightTransfer(one_rank_world, timeout_s=10)
    first, second = weights(20, 1), weights(20, 2)
    t.post_receive(0, 20, due=8)
    t.post_receive(0, 20, due=12)
    t.post_send(6, first, [0])
    t.post_send(7, second, [0])
    with pytest.raises(AssertionError, match="settle"):
        t.state()  # receives still posted: nothing to save yet
    t.settle(7)
    saved = t.state()
    assert [(p["source"], p["due"]) for p in saved] == [(0, 8), (0, 12)]
    resumed = WeightTransfer(one_rank_world, timeout_s=10)
    resumed.load_state([{k: (np.array(v) if k == "buffer" else v) for k, v in p.items()}
                        for p in saved])
    [(_, step8, got8)] = resumed.complete(8)
    [(_, step12, got12)] = resumed.complete(20)
    assert (step8, step12) == (6, 7)
    assert np.array_equal(got8, first) and np.array_equal(got12, second)


def test_a_checkpoint_of_another_size_is_refused(one_rank_world):
    t = WeightTransfer(one_rank_world, timeout_s=10)
    t.post_receive(0, 10, due=2)
    t.post_send(1, weights(10, 3), [0])
    t.settle(1)
    state = t.state()
    state[0]["buffer"] = np.concatenate([state[0]["buffer"], np.zeros(4, np.uint8)])
    t.load_state(state)  # one value more than its header says
    with pytest.raises(ExchangeError, match="has 10 values, expected 11"):
        t.complete(2)


def test_async_transfers_arrive_in_order_with_their_step_and_age(one_rank_world):
    t = AsyncWeightTransfer(one_rank_world, timeout_s=10, max_values=64)
    assert t.arrived() == []  # posts the receive; nothing sent yet
    a, b = weights(30, 4), weights(64, 5)
    t.send(2, a, [0])
    got = []
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        got = t.arrived()
    t.send(5, b, [0])
    while len(got) < 2 and time.time() < deadline:
        got += t.arrived()
    assert [(sender, step) for sender, step, _, _ in got] == [(0, 2), (0, 5)]
    assert np.array_equal(got[0][3], a) and np.array_equal(got[1][3], b)
    assert all(0 <= age < 10 for _, _, age, _ in got)
    assert t.take_counters()[:2] == (2 * 32 + 4 * 94, 2 * 32 + 4 * 94)
    assert t.sends_done() and t.skipped == 0
    t.close()


def test_a_lead_bound_alone_never_waits(one_rank_world):
    """One client has no one to wait for: every step is allowed and nothing is sent."""
    lead = LeadBound(one_rank_world, ratio=1.5, every=4, timeout_s=1)
    assert lead.known == {} and lead.slowest() == 0
    t0 = time.perf_counter()
    for step in range(1, 50):
        lead.begin_step(step)
    assert time.perf_counter() - t0 < 1 and lead.wait_seconds == 0
    assert lead.allows(4) and not lead.allows(5)  # ratio * 0 + every
    assert lead.sends_done()
    lead.close()
