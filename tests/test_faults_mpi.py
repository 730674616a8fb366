"""Faults under real mpirun: failing and killed ranks, crash + resume, corrupt inputs named."""

import shutil
import tarfile

import h5py
import numpy as np
import pytest

from mhd_hpc.run.checkpoint_files import pool_files

from conftest import SMALL, run_mpi, train_args

POOL = ["exchange.mode=pool", "exchange.pool_every=5", "exchange.pool_transfer_steps=2",
        "exchange.pool_size=2"]


def accuracies(run_dir):
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        return f["eval/step"][()], f["eval/per_class_acc"][()], f["train/step"][()]


eval_rows = accuracies  # the name the crash + resume test reads them by


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """Uninterrupted reference runs, one per exchange mode."""
    out = {}
    for mode, extra in (("predictions", []), ("pool", POOL)):
        run = tmp_path_factory.mktemp(f"straight-{mode}")
        res = run_mpi(2, train_args(run, data_root, *SMALL, *extra), timeout=180)
        assert res.returncode == 0, res.stderr
        out[mode] = accuracies(run)
    return out


def assert_same_as_straight(run_dir, reference):
    steps, acc, train_steps = accuracies(run_dir)
    assert list(steps) == [10, 20, 30] and list(train_steps) == [10, 20, 30]
    np.testing.assert_allclose(acc, reference[1], atol=1e-6)


def test_kill_9_of_one_rank_then_rerun_resumes(tmp_path, data_root, straight):
    run = tmp_path / "run"
    res = run_mpi(2, train_args(run, data_root, *SMALL), env={"MHD_INJECT_FAULT": "1:25:kill"},
                  timeout=120)
    assert res.returncode != 0  # mpirun noticed the killed rank and took the job down
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout
    assert_same_as_straight(run, straight["predictions"])


def test_kill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, data_root, straight):
    run = tmp_path / "run"
    res = run_mpi(2, train_args(run, data_root, *SMALL),
                  env={"MHD_INJECT_FAULT": "0:20:kill_in_checkpoint"}, timeout=120)
    assert res.returncode != 0
    folder = run / "checkpoints" / "client_000"
    assert (folder / "step_000000020.h5.tmp").exists()  # the write that was cut short
    assert not (folder / "step_000000020.h5").exists()
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 10" in res.stdout  # client 0 never finished step 20
    assert not list(folder.glob("*.tmp"))
    assert_same_as_straight(run, straight["predictions"])


def test_pool_mode_resumes_with_its_pool(tmp_path, data_root, straight):
    run = tmp_path / "run"
    res = run_mpi(2, train_args(run, data_root, *SMALL, *POOL),
                  env={"MHD_INJECT_FAULT": "0:25"}, timeout=120)
    assert res.returncode != 0
    assert "FATAL on rank 0 (client 0)" in res.stderr and "injected fault at step 25" in res.stderr
    state, _ = pool_files(run, 1, 2).load(20)
    assert len(state["entries"]) == 2  # the pool was full when it was saved
    assert {e["source_client"] for e in state["entries"]} == {0}
    res = run_mpi(2, train_args(run, data_root, *SMALL, *POOL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout
    assert_same_as_straight(run, straight["pool"])
    with h5py.File(run / "metrics.h5", "r") as f:
        staleness = f["train/staleness"][()]
    assert np.all(staleness[1:] >= 2)  # targets are checkpoints at least transfer-steps old


def test_corrupt_checkpoint_is_named_and_kept(tmp_path, data_root):
    # Issue 9 changed this contract: a corrupt newest checkpoint no longer stops the job; it is
    # named, kept (moved aside), and every client resumes from the previous intact step.
    run = tmp_path / "run"
    res = run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=20"), timeout=120)
    assert res.returncode == 0
    bad = run / "checkpoints" / "client_001" / "step_000000020.h5"
    bad.write_bytes(b"\x89HDF garbage")
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "step_000000020.h5" in res.stdout and "unreadable checkpoint" in res.stdout
    assert "resuming every client from step 10" in res.stdout
    assert bad.with_name(bad.name + ".corrupt").exists()  # kept for inspection
    assert (run / "checkpoints" / "client_001" / "step_000000030.h5").exists()


def test_metrics_file_of_another_run_is_refused(tmp_path, data_root):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_mpi(2, train_args(first, data_root, *SMALL, "run.steps=10"),
                   timeout=120).returncode == 0
    second.mkdir()
    shutil.copy(first / "metrics.h5", second / "metrics.h5")
    before = (second / "metrics.h5").read_bytes()
    res = run_mpi(2, train_args(second, data_root, *SMALL, "run.steps=10", "run.seed=5"),
                  timeout=120)
    assert res.returncode != 0
    assert "metrics.h5 was written by a different job" in res.stderr
    assert (second / "metrics.h5").read_bytes() == before  # nothing overwritten


def test_truncated_shard_is_named(tmp_path):
    data = tmp_path / "data"
    run = tmp_path / "run"
    assert run_mpi(2, train_args(run, data, *SMALL, "run.steps=1"), timeout=120).returncode == 0
    (shard,) = data.glob("digits-*/client_001/shard-000000.tar")
    with tarfile.open(shard) as tar:
        size = sum(m.size for m in tar.getmembers())
    shard.write_bytes(shard.read_bytes()[: size // 2])
    res = run_mpi(2, train_args(tmp_path / "run2", data, *SMALL, "run.steps=1"), timeout=120)
    assert res.returncode != 0
    assert "client_001/shard-000000.tar" in res.stderr


def test_failing_rank_brings_the_job_down(tmp_path, data_root):
    res = run_mpi(3, train_args(tmp_path / "run", data_root, *SMALL, "clients.count=3"),
                  env={"MHD_INJECT_FAULT": "1:5"}, timeout=120)
    assert res.returncode != 0
    assert "FATAL on rank 1 (client 1)" in res.stderr
    assert "injected fault at step 5" in res.stderr


def folder_state(run_dir):
    """Every file of a run folder with its bytes and modification time."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_after_crash_continues_exactly(tmp_path, data_root, straight):
    crashed = tmp_path / "crashed"
    # Crash on rank 1 at step 25: the checkpoint of step 20 and metrics up to 20 survive.
    res = run_mpi(2, train_args(crashed, data_root, *SMALL),
                  env={"MHD_INJECT_FAULT": "1:25"}, timeout=180)
    assert res.returncode != 0
    assert list(eval_rows(crashed)[0]) == [10, 20]
    res = run_mpi(2, train_args(crashed, data_root, *SMALL), timeout=180)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout
    steps_a, acc_a, train_a = straight["predictions"]
    steps_b, acc_b, train_b = eval_rows(crashed)
    assert list(steps_b) == [10, 20, 30] and list(train_b) == [10, 20, 30]
    # Everything random derives from (seed, step, client): the resumed run is the same run.
    np.testing.assert_allclose(acc_b, acc_a, atol=1e-6)
    # A finished run rerun is a no-op that only reads its folder (metrics, their sequence
    # number, the lock's note: nothing is rewritten), and a different job refuses to reuse the
    # folder and leaves it as it was.
    before = folder_state(crashed)
    res = run_mpi(2, train_args(crashed, data_root, *SMALL), timeout=120)
    assert res.returncode == 0 and "already complete" in res.stdout
    assert folder_state(crashed) == before
    res = run_mpi(2, train_args(crashed, data_root, *SMALL, "distill.nu_aux=1"), timeout=120)
    assert res.returncode == 2
    assert "config error at 'run.out_dir'" in res.stderr and "distill.nu_aux" in res.stderr
    assert folder_state(crashed) == before


def pool_metrics(run_dir):
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        return {k: f[k][()] for k in ("eval/per_class_acc", "train/loss_total",
                                      "train/staleness", "train/pool_entries")}


@pytest.mark.slow
def test_pool_results_do_not_depend_on_when_checkpoints_are_taken(tmp_path, data_root):
    """Pool arrivals fall due at fixed steps: checkpoints every 40 or every 70 steps, or a stop
    on SIGUSR1 between a transfer's posting (step 30) and its due step (35), and a resume, give
    the same run. Before, a checkpoint inserted the in-flight transfers at once."""
    pool = ["exchange.mode=pool", "exchange.pool_every=10", "exchange.pool_transfer_steps=5",
            "exchange.pool_size=2", "run.steps=80", "run.eval_every=40", "run.log_every=4"]
    runs = {}
    for name, every in (("every40", 40), ("every70", 70)):
        runs[name] = tmp_path / name
        res = run_mpi(2, train_args(runs[name], data_root, *SMALL, *pool,
                                    f"run.checkpoint_every={every}"), timeout=240)
        assert res.returncode == 0, res.stderr
    stopped = tmp_path / "stopped"
    res = run_mpi(2, train_args(stopped, data_root, *SMALL, *pool, "run.checkpoint_every=40"),
                  env={"MHD_INJECT_FAULT": "0:31:signal"}, timeout=240)
    assert res.returncode == 3 and "stopping at step 32" in res.stdout, res.stdout
    res = run_mpi(2, train_args(stopped, data_root, *SMALL, *pool, "run.checkpoint_every=40"),
                  timeout=240)
    assert res.returncode == 0 and "resuming every client from step 32" in res.stdout
    want = pool_metrics(runs["every40"])
    for name, run in (("every70", runs["every70"]), ("stopped", stopped)):
        got = pool_metrics(run)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=f"{name} {key}")
