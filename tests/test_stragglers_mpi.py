"""Clients of different speeds under real mpirun: a straggler (MHD_INJECT_FAULT ...:slow:3),
prediction mode dropping late peers, pool mode at every client's own pace, and the overlapped
step. (Their speed is measured by tools/bench_stragglers.py, not here.)"""

import h5py
import numpy as np
import pytest

from conftest import SMALL, run_mpi, train_args

JOB = [*SMALL, "clients.count=4", "run.steps=60", "run.eval_every=30", "run.log_every=10",
       "run.checkpoint_every=30"]
SLOW = {"MHD_INJECT_FAULT": "3:1:slow:3"}


def train(run_dir):
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        return {k: f[f"train/{k}"][()] for k in f["train"]}, f["eval/step"][()]


def assert_within_bound(rows, fast, ratio=1.5, every=5, log_every=10):
    """Every step s of a fast client held s <= ratio m + every (m the slowest step it knew);
    a row holds the interval's means, so its last step may exceed the mean by log_every."""
    steps, slowest = rows["step"], rows["slowest_peer_step"]  # (rows,), (rows, clients)
    for c in fast:
        assert np.all(steps <= ratio * slowest[:, c] + every + log_every), \
            (c, steps, slowest[:, c])


def test_late_peers_are_dropped_and_the_run_ends_cleanly(tmp_path, data_root):
    run = tmp_path / "drop"
    res = run_mpi(4, train_args(run, data_root, *JOB, "exchange.late_peers=drop",
                                "exchange.late_deadline_s=0.01"), env=SLOW, timeout=300)
    assert res.returncode == 0, res.stderr
    rows, evals = train(run)
    assert list(evals) == [30, 60] and list(rows["step"]) == [10, 20, 30, 40, 50, 60]
    dropped = rows["dropped_peers"]  # (rows, clients): peers left out per step
    assert np.nansum(dropped[:, :3]) > 0  # the fast clients left the straggler out
    # The straggler is behind: what it needs has arrived; it never waits past the deadline.
    assert np.all(np.isfinite(rows["loss_total"]))


def test_with_dropped_peers_the_others_keep_stepping_through_an_outage(tmp_path, data_root):
    """Rank 3 stands still for 5 s at step 50 (like SIGSTOP): with late_peers=drop the other
    clients go on stepping (log rows, evaluations and checkpoints wait for nobody), and the late
    client's rows are filled in when it returns."""
    run = tmp_path / "outage"
    res = run_mpi(4, train_args(run, data_root, *JOB, "exchange.late_peers=drop",
                                "exchange.late_deadline_s=0.05", "run.steps=150",
                                "run.eval_every=50", "run.checkpoint_every=50"),
                  env={"MHD_INJECT_FAULT": "3:50:pause:5"}, timeout=300)
    assert res.returncode == 0, res.stderr
    rows, evals = train(run)
    steps, wall = list(rows["step"]), rows["wall_s"]  # (rows,), (rows, clients): own clocks
    at = {s: i for i, s in enumerate(steps)}
    assert steps == list(range(10, 151, 10)) and list(evals) == [50, 100, 150]
    assert np.all(np.isfinite(rows["loss_total"]))  # the late client's rows are all there
    late = wall[at[60], 3] - wall[at[40], 3]
    assert late >= 5.0, late  # the outage happened
    # While client 3 stood still, client 0 advanced at least 20 steps past step 50.
    fast = wall[at[70], 0] - wall[at[50], 0]
    assert fast < 5.0 - 0.5, (fast, late)


def test_asynchronous_pool_mode_lets_fast_clients_run_ahead(tmp_path, data_root):
    run = tmp_path / "async"
    res = run_mpi(4, train_args(run, data_root, *JOB, "exchange.mode=pool",
                                "exchange.pool_async=true", "exchange.pool_every=10"),
                  env=SLOW, timeout=300)
    assert res.returncode == 0, res.stderr
    rows, evals = train(run)
    assert list(evals) == [30, 60] and list(rows["step"]) == [10, 20, 30, 40, 50, 60]
    wall = rows["wall_s"][-1]  # each client's own loop time at its last step
    assert wall[3] > 1.5 * wall[:3].max(), wall  # nobody waited for the straggler
    ages = rows["staleness_s"]
    assert np.nanmax(ages) > 0  # the teachers' age in seconds is recorded


def test_a_bounded_lead_holds_fast_clients_within_the_ratio(tmp_path, data_root):
    run = tmp_path / "bounded"
    res = run_mpi(4, train_args(run, data_root, *JOB, "exchange.mode=pool",
                                "exchange.pool_async=true", "exchange.pool_every=5",
                                "exchange.pool_max_lead=1.5"), env=SLOW, timeout=300)
    assert res.returncode == 0, res.stderr
    rows, _ = train(run)
    assert_within_bound(rows, fast=range(3))
    slowest = rows["slowest_peer_step"]
    assert np.all(slowest[-1, :3] >= (60 - 5 - 10) / 1.5), slowest[-1]
    assert np.nansum(rows["lead_wait_s"][:, :3]) > 0  # they did wait for the straggler
    assert np.nanmax(rows["lead_wait_s"][:, 3]) < 0.05  # it never waited for them


@pytest.mark.parametrize("slow_rank", [1, 3])
def test_a_bounded_lead_with_a_two_rank_client(tmp_path, data_root, slow_rank):
    """Client 0 has ranks 0 and 1, clients 1 and 2 one each. Rank 1 slow: client 0 is slow
    through its gradient all-reduce and its leader reports for it. Rank 3 slow: client 0 is a
    fast client whose leader waits and whose second rank follows."""
    run = tmp_path / f"bounded-{slow_rank}"
    res = run_mpi(4, train_args(run, data_root, *JOB, "clients.count=3",
                                "clients.per_client=[{ranks: 2}, {}, {}]", "exchange.mode=pool",
                                "exchange.pool_async=true", "exchange.pool_every=5",
                                "exchange.pool_max_lead=1.5"),
                  env={"MHD_INJECT_FAULT": f"{slow_rank}:1:slow:3"}, timeout=300)
    assert res.returncode == 0, res.stderr
    rows, evals = train(run)
    assert list(evals) == [30, 60]
    slow = 0 if slow_rank == 1 else 2
    fast = [c for c in range(3) if c != slow]
    assert_within_bound(rows, fast)
    for c in fast:
        assert np.nansum(rows["lead_wait_s"][:, c]) > 0, c  # it waited for the slow client
    assert np.nanmax(rows["lead_wait_s"][:, slow]) < 0.05  # the slow one never waited


def test_the_overlapped_step_trains(tmp_path, data_root):
    run = tmp_path / "overlap"
    res = run_mpi(4, train_args(run, data_root, *JOB, "exchange.overlap=true"), timeout=300)
    assert res.returncode == 0, res.stderr
    with h5py.File(run / "metrics.h5", "r") as f:
        priv = f["eval/beta_priv"][-1][:, 0]
        dist = f.attrs["label_distribution"]
    assert np.all(priv > dist.max(axis=1)), priv  # better than always the commonest label


def test_what_not_waiting_cannot_be_combined_with(tmp_path, data_root):
    for bad, key in ((["exchange.mode=pool", "exchange.late_peers=drop"], "exchange.late_peers"),
                     (["exchange.pool_async=true"], "exchange.pool_async"),
                     (["exchange.mode=pool", "exchange.pool_max_lead=2"],
                      "exchange.pool_max_lead"),
                     (["exchange.mode=pool", "exchange.pool_async=true",
                       "exchange.pool_max_lead=0.5"], "exchange.pool_max_lead"),
                     (["exchange.overlap=true", "eval.grad_norms=true"], "eval.grad_norms")):
        res = run_mpi(2, train_args(tmp_path / "x", data_root, *SMALL, *bad), timeout=60)
        assert res.returncode == 2 and f"config error at '{key}'" in res.stderr, res.stderr
