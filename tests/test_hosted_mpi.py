"""Several clients per rank (``clients.per_rank``) under real mpirun: a client's run does not
depend on where it is hosted (identical metrics), it resumes after a kill -9, and a stop signal
or a bad value is handled as with one client per rank."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from _jpeg_tree import make_image_folder
from conftest import ROOT, run_mpi, train_args

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


def test_a_failing_hosted_client_brings_the_job_down_naming_it(tmp_path, data_root):
    res = run_mpi(2, train_args(tmp_path / "run", data_root, *JOB, "clients.per_rank=2"),
                  env={"MHD_INJECT_FAULT": "3:5"}, timeout=120)
    assert res.returncode != 0
    assert "FATAL on rank 3 (client 3) of 4" in res.stderr
    assert "injected fault at step 5" in res.stderr


def test_hosted_clients_read_jpeg_shards_with_loader_workers(tmp_path):
    """The wds loader's worker processes start from the clients' threads: 2 clients on one
    rank learn what they learn on two."""
    make_image_folder(tmp_path, classes=4, per_class=12)
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "imagefolder",
                    str(tmp_path / "train"), str(shards), "--clients", "2",
                    "--labels-per-client", "2", "--skew", "10", "--image-size", "32",
                    "--samples-per-shard", "8", "--workers", "1"],
                   check=True, capture_output=True, timeout=120)
    job = ["data.dataset=shards", "clients.count=2", "run.steps=6", "run.eval_every=6",
           "run.log_every=3", "run.checkpoint_every=6", "data.batch_size=8",
           "data.public_batch_size=8", "data.loader_threads=1", "optim.lr=0.01",
           "data.loader=wds"]
    runs = {}
    for ranks, per_rank in ((2, 1), (1, 2)):
        runs[ranks] = tmp_path / f"ranks{ranks}"
        res = run_mpi(ranks, ["-m", "mhd_hpc.train", str(ROOT / "jobs" / "digits.yaml"),
                              f"run.out_dir={runs[ranks]}", f"data.root={shards}", *job,
                              f"clients.per_rank={per_rank}"], timeout=180)
        assert res.returncode == 0, res.stderr
        assert "loader wds" in res.stdout
    assert_same_metrics(runs[1], runs[2])
