"""Run folders under real mpirun (issue 9): live readers, two jobs, locks, flipped bytes."""

# Reading a run while it trains, two jobs on one folder, the lock after kill -9, flipped bytes in
# checkpoints, metrics and shards, a refused job that must not write, a moved dataset, and a longer
# run.steps on resume.

import json
import shutil
import subprocess
import sys
import time

import h5py
import pytest

from mhd_hpc.run.metrics_file import MetricsError, read_metrics
from mhd_hpc.report import main as report_main

from conftest import ROOT, SMALL, mpi_env, mpirun_exe, run_mpi, train_args



def start_mpi(np_: int, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """mpirun in the background (the caller waits with a timeout)."""
    cmd = [mpirun_exe(), "--oversubscribe", "-np", str(np_), sys.executable, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(env), cwd=ROOT)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"mpirun timed out\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.05)


def flip_bytes(path, offset: int, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_reading_a_run_while_it_trains_never_disturbs_it(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    args = train_args(run, data_root, *SMALL, "run.steps=300", "run.eval_every=20",
                      "run.log_every=5", "run.checkpoint_every=100")
    # A straggler (3x slower) keeps the job running long enough for many reads on any machine.
    proc = start_mpi(2, args, env={"MHD_INJECT_FAULT": "1:1:slow:3"})
    wait_for(lambda: (run / "metrics.h5").exists() or proc.poll() is not None)
    seen = []
    while proc.poll() is None:
        # A reader the way people read: h5py with its default file locking, held open a while,
        # and the report, over and over while the trainer appends.
        try:
            with h5py.File(run / "metrics.h5", "r") as f:
                f.attrs.get("fingerprint")
                time.sleep(0.05)
        except OSError:
            pass  # the reader may see a write in flight; the writer must not care
        if report_main([str(run), "--json"]) == 0:
            seen.append(capsys.readouterr().out)
        else:
            capsys.readouterr()
    code, out, err = finish(proc)
    assert code == 0, err
    m = read_metrics(run / "metrics.h5")
    assert list(m["eval"]["step"]) == list(range(20, 301, 20))
    assert list(m["train"]["step"]) == list(range(5, 301, 5))
    assert any(json.loads(s)["step"] < 300 for s in seen), "never read while it trained"


@pytest.mark.slow
def test_a_second_job_on_the_same_folder_stops_at_once(tmp_path, data_root):
    run = tmp_path / "run"
    args = train_args(run, data_root, *SMALL, "run.steps=400", "run.eval_every=100",
                      "run.checkpoint_every=100")
    # A straggler (4x slower) keeps the first job holding the folder while the second tries.
    first = start_mpi(2, args, env={"MHD_INJECT_FAULT": "1:1:slow:4"})
    # The first job holds the lock and is training: its note names it (written at the start
    # of training) and its metrics file exists.
    wait_for(lambda: first.poll() is not None or ((run / "metrics.h5").exists()
                                                  and '"pid"' in (run / ".lock").read_text()))
    second = run_mpi(2, args, timeout=120)
    assert first.poll() is None, "the first job ended before the second one was refused"
    assert second.returncode == 2
    assert f"{run} is in use by another job (host " in second.stderr
    assert ", pid " in second.stderr and ", since " in second.stderr
    assert "step " not in second.stdout  # refused before any training
    code, _, err = finish(first, timeout=600)
    assert code == 0, err
    steps = read_metrics(run / "metrics.h5")["eval"]["step"]
    assert list(steps) == [100, 200, 300, 400]  # no duplicated or out-of-order rows


@pytest.mark.slow
def test_kill_9_of_the_lock_holder_leaves_the_folder_free(tmp_path, data_root):
    run = tmp_path / "run"
    res = run_mpi(2, train_args(run, data_root, *SMALL), env={"MHD_INJECT_FAULT": "0:25:kill"},
                  timeout=120)
    assert res.returncode != 0
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout


@pytest.mark.slow
def test_flipped_bytes_in_a_checkpoint_resume_from_the_previous_one(tmp_path, data_root):
    run = tmp_path / "run"
    assert run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=20"),
                   timeout=120).returncode == 0
    path = run / "checkpoints" / "client_000" / "step_000000020.h5"
    with h5py.File(path, "r") as f:  # the first conv weight of the model
        offset = f["state/i0/i0"].id.get_offset()
    flip_bytes(path, offset + 16)
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "step_000000020.h5: corrupt checkpoint" in res.stdout
    assert "resuming every client from step 10" in res.stdout
    # Client 1's intact step 20 belongs to the abandoned timeline: kept, but out of the way.
    assert (run / "checkpoints" / "client_001" / "step_000000020.h5.abandoned").exists()
    assert (run / "checkpoints" / "client_000" / "step_000000020.h5.corrupt").exists()


@pytest.mark.slow
def test_flipped_bytes_in_metrics_are_named(tmp_path, data_root):
    run = tmp_path / "run"
    assert run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=20"),
                   timeout=120).returncode == 0
    path = run / "metrics.h5"
    with h5py.File(path, "r") as f:
        offset = f["eval/beta_sh"].id.get_chunk_info(0).byte_offset
    flip_bytes(path, offset + 8)
    with pytest.raises(MetricsError, match="metrics.h5"):
        read_metrics(path)
    assert report_main([str(run)]) == 1
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 2
    assert "metrics.h5" in res.stderr and "corrupt" in res.stderr


@pytest.mark.slow
def test_flipped_pixels_in_a_shard_are_caught(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert run_mpi(2, train_args(run, data, *SMALL, "run.steps=1"), timeout=120).returncode == 0
    (dataset,) = data.glob("digits-*")
    tool = [sys.executable, str(ROOT / "tools" / "verify_shards.py"), str(dataset),
            "--workers", "2"]
    assert subprocess.run(tool, capture_output=True, timeout=60).returncode == 0
    shard = dataset / "client_001" / "shard-000000.tar"
    flip_bytes(shard, 512 + 128 + 20)  # inside the first sample's pixels (after its headers)
    res = subprocess.run(tool, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "client_001/shard-000000.tar" in res.stdout
    res = run_mpi(2, train_args(tmp_path / "run2", data, *SMALL, "run.steps=1",
                                "data.verify_shards=true"), timeout=120)
    assert res.returncode == 2
    assert "data.verify_shards" in res.stderr and "client_001/shard-000000.tar" in res.stderr


@pytest.mark.slow
def test_a_refused_job_writes_nothing_into_the_folder(tmp_path, data_root):
    run = tmp_path / "run"
    assert run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=20"),
                   timeout=120).returncode == 0
    (run / "config.yaml").unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    res = run_mpi(2, train_args(run, data_root, *SMALL, "distill.nu_aux=1"), timeout=120)
    assert res.returncode == 2 and "was written by a different job" in res.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # no config.yaml, nothing else touched
    res = run_mpi(2, train_args(run, data_root, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout


@pytest.mark.slow
def test_a_moved_dataset_resumes_and_a_longer_run_says_how_the_schedule_changes(
        tmp_path, data_root):
    run, moved = tmp_path / "run", tmp_path / "moved-data"
    assert run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=20"),
                   timeout=120).returncode == 0
    shutil.copytree(data_root, moved)
    res = run_mpi(2, train_args(run, moved, *SMALL), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "dataset moved from" in res.stdout and "resuming every client from step 20" in res.stdout
    assert "run.steps changed from 20 to 30 on resume" in res.stdout
