"""Several clients per rank (``clients.per_rank``) under real mpirun: a client's run does not
depend on where it is hosted (identical metrics), it resumes after a kill -9, and a stop signal
or a bad value is handled as with one client per rank."""

import h5py
import numpy as np
import pytest

from conftest import run_mpi, train_args

JOB = ("clients.count=4", "run.steps=30", "run.eval_every=15", "run.log_every=10",
       "run.checkpoint_every=10", "data.public_batch_size=32")
POOL = ("exchange.mode=pool", "exchange.pool_every=5", "exchange.pool_transfer_steps=2")
TIMING = {"train/exchange_wait_s", "train/step_time_s", "train/wall_s"}  # the machine's, not
# the run's


def metrics(run_dir) -> dict[str, np.ndarray]:
    """Every dataset of metrics.h5 but the wall-clock ones."""
    out = {}
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) and name not in TIMING else None)
    return out


def assert_same_metrics(a, b) -> None:
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb)
    assert "eval/per_class_acc" in ma and "train/loss_total" in ma
    for name in ma:
        np.testing.assert_array_equal(ma[name], mb[name], err_msg=name)


@pytest.fixture(scope="module")
def one_per_rank(tmp_path_factory, data_root):
    """The reference runs: 4 clients on 4 ranks, in predictions and in pool mode."""
    out = {}
    for mode, extra in (("predictions", ()), ("pool", POOL)):
        out[mode] = tmp_path_factory.mktemp(f"ranks-{mode}")
        res = run_mpi(4, train_args(out[mode], data_root, *JOB, *extra), timeout=240)
        assert res.returncode == 0, res.stderr
        assert "4 clients on 4 ranks (ranks per client [1, 1, 1, 1])" in res.stdout
    return out


@pytest.mark.parametrize("mode,extra", [("predictions", ()), ("pool", POOL)])
def test_two_clients_per_rank_learn_exactly_what_one_per_rank_learn(tmp_path, data_root,
                                                                     one_per_rank, mode, extra):
    run = tmp_path / "hosted"
    res = run_mpi(2, train_args(run, data_root, *JOB, *extra, "clients.per_rank=2"),
                  timeout=240)
    assert res.returncode == 0, res.stderr
    assert "4 clients on 2 ranks (2 clients per rank, stepped in turn)" in res.stdout
    assert_same_metrics(run, one_per_rank[mode])


def test_kill_9_then_resume_elsewhere_hosted(tmp_path, data_root, one_per_rank):
    """kill -9 of a process (both its clients) at step 25; the rerun resumes from step 20, the
    second time with all four clients on one rank: still the reference run."""
    run = tmp_path / "run"
    args = train_args(run, data_root, *JOB, "clients.per_rank=2")
    res = run_mpi(2, args, env={"MHD_INJECT_FAULT": "3:25:kill"}, timeout=180)
    assert res.returncode != 0
    res = run_mpi(1, train_args(run, data_root, *JOB, "clients.per_rank=4"), timeout=180)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout
    assert_same_metrics(run, one_per_rank["predictions"])


def test_a_stop_signal_to_a_hosting_rank_stops_every_client_resumably(tmp_path, data_root):
    run = tmp_path / "run"
    args = train_args(run, data_root, *JOB, "clients.per_rank=2")
    res = run_mpi(2, args, env={"MHD_INJECT_FAULT": "2:12:signal"}, timeout=180)
    assert res.returncode == 3, res.stderr
    assert "stopping at step 13 on SIGUSR1" in res.stdout
    res = run_mpi(2, args, timeout=180)
    assert res.returncode == 0 and "resuming every client from step 13" in res.stdout


def test_hosting_values_that_cannot_work_are_config_errors(tmp_path, data_root):
    res = run_mpi(2, train_args(tmp_path / "a", data_root, *JOB, "clients.per_rank=3"),
                  timeout=120)
    assert res.returncode == 2
    assert "config error at 'clients.per_rank'" in res.stderr and "evenly" in res.stderr
    res = run_mpi(4, train_args(tmp_path / "b", data_root, *JOB, "clients.per_rank=2"),
                  timeout=120)
    assert res.returncode == 2
    assert "4 clients / 2 per rank = 2 ranks but was launched on 4" in res.stderr
    assert "mpirun -np 2" in res.stderr
