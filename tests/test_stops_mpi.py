"""Stops a person can read, under real mpirun: Ctrl-C (SIGINT) stops at the next step with a
checkpoint and resumes exactly, a second Ctrl-C stops at once; run folders and datasets on
storage that cannot be written give one line, and a complete dataset there trains; a disk that
fills up mid-run stops the job with one message per rank and loses nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, SMALL, mpi_env, mpirun_exe, run_mpi, train_args

LONG = [*SMALL, "run.steps=60", "run.eval_every=20", "run.log_every=5",
        "run.checkpoint_every=20"]
SLOW = {"MHD_INJECT_FAULT": "1:1:slow:20"}  # steps long enough for a signal to land mid-run


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """mpirun in a session of its own (as a terminal's job is a process group of its own)."""
    cmd = [mpirun_exe(), "--oversubscribe", "-np", "2", sys.executable, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(env), cwd=ROOT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpirun timed out\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def rank_pids(mpirun_pid: int) -> list[int]:
    """The training ranks among mpirun's descendants (Open MPI puts each in a process group
    of its own, so a signal to mpirun's group does not reach them: mpirun kills them)."""
    found, todo = [], [mpirun_pid]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mhd_hpc.train" in cmd and pid != mpirun_pid:
            found.append(pid)
    return sorted(found)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"not reached (rc {proc.returncode})\n{out}\n{err}")
        time.sleep(0.05)


def signal_ranks(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to every rank's process group (the rank and its loader workers), as srun
    delivers a Ctrl-C or scancel to every process of the job."""
    pids = rank_pids(proc.pid)
    assert len(pids) == 2, pids
    for pid in pids:
        os.killpg(os.getpgid(pid), sig)


def metrics(run_dir: Path) -> dict:
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        return {k: f[k][()] for k in ("eval/step", "eval/per_class_acc", "train/step",
                                      "train/loss_total")}


def test_sigint_stops_at_the_next_step_and_resumes_exactly(tmp_path, data_root):
    straight = tmp_path / "straight"
    res = run_mpi(2, train_args(straight, data_root, *LONG), timeout=180)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    proc = start(train_args(run, data_root, *LONG), env=SLOW)
    wait_for(lambda: (run / "checkpoints" / "client_001" / "step_000000020.h5").exists(), proc)
    signal_ranks(proc, signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 3, out + err
    assert "SIGINT received: stopping at the end of this step with a checkpoint" in err
    line = next(ln for ln in out.splitlines() if "stopping at step" in ln)
    step = int(line.split("stopping at step ")[1].split()[0])
    assert 20 < step < 60 and "on SIGINT: checkpoint saved; rerun the same command" in line
    assert "exit code 3: resumable" in line and "Open MPI's notice" in line
    for client in ("client_000", "client_001"):  # a checkpoint at the stop step, not before
        assert (run / "checkpoints" / client / f"step_{step:09d}.h5").exists()
    res = run_mpi(2, train_args(run, data_root, *LONG), timeout=180)
    assert res.returncode == 0, res.stderr
    assert f"resuming every client from step {step}" in res.stdout
    want, got = metrics(straight), metrics(run)
    assert list(got["eval/step"]) == [20, 40, 60]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)


def test_a_second_sigint_stops_at_once(tmp_path, data_root):
    run = tmp_path / "run"
    proc = start(train_args(run, data_root, *LONG, "run.steps=400"),
                 env={"MHD_INJECT_FAULT": "0:1:slow:100"})
    wait_for(lambda: (run / "checkpoints" / "client_000" / "step_000000020.h5").exists(), proc,
             timeout=180)
    pid = rank_pids(proc.pid)[0]  # world rank 0 is started first
    for _ in range(2):
        os.killpg(os.getpgid(pid), signal.SIGINT)
        time.sleep(0.2)
    code, out, err = finish(proc)
    assert code != 0 and "stopping at step" not in out
    assert "second SIGINT: stopping at once, without a checkpoint (exit 130)" in err


@contextmanager
def mounted(mount: Path, what: str, *args: str):
    """``mount ARGS MOUNT`` for the block (as root), skipped where this host cannot."""
    mount.mkdir()
    res = subprocess.run(["mount", *args, str(mount)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no {what} here ({res.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def read_only(folder: Path):
    """``folder`` on a read-only bind mount (as root, a chmod does not stop writes)."""
    return mounted(folder.parent / (folder.name + "-ro"), "read-only bind mount",
                   "--bind", "-o", "ro", str(folder))


def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` mounted at ``folder``: a disk that can be filled."""
    return mounted(folder, "tmpfs mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs")


def one_error_line(err: str) -> str:
    """The job's own stderr, which must be one line (Open MPI's box about the exit code, from
    its first line of dashes on, is mpirun's)."""
    ours = err.split("-" * 20)[0]
    lines = [ln for ln in ours.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_run_folder_errors_are_one_line(tmp_path, data_root):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    res = run_mpi(2, train_args(a_file, data_root, *SMALL), timeout=120)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert line.startswith("mhd_hpc: config error at 'run.out_dir': cannot use ")
    assert "is a file, not a folder" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    with read_only(empty) as mount:
        res = run_mpi(2, train_args(mount / "run", data_root, *SMALL), timeout=120)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "config error at 'run.out_dir'" in line and "Read-only file system" in line


def test_complete_dataset_on_read_only_storage_trains(tmp_path, data_root):
    run = tmp_path / "run"
    assert run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=1"),
                   timeout=120).returncode == 0  # the dataset is built (or found) here
    shared = tmp_path / "shared"
    shutil.copytree(data_root, shared, ignore=shutil.ignore_patterns(".build.lock"))
    with read_only(shared) as mount:
        before = sorted(p.name for p in mount.rglob("*"))
        res = run_mpi(2, train_args(tmp_path / "run2", mount, *SMALL, "run.steps=10"),
                      timeout=120)
        assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in mount.rglob("*")) == before  # nothing created there
        # A dataset that is not built yet needs a build, which needs write access: one line.
        res = run_mpi(2, train_args(tmp_path / "run3", mount, *SMALL, "run.steps=10",
                                    "data.skew=7"), timeout=120)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert f"config error at 'data.root': {mount}: the dataset is not built there yet" in line
    assert "needs write access: Read-only file system" in line


def test_a_full_disk_stops_the_job_without_a_traceback_and_the_run_resumes(tmp_path, data_root):
    with small_disk(tmp_path / "disk", "64m") as disk:
        run = disk / "run"
        proc = start(train_args(run, data_root, *LONG), env=SLOW)
        wait_for(lambda: (run / "checkpoints" / "client_001" / "step_000000020.h5").exists(),
                 proc)
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        code, out, err = finish(proc)
        assert code != 0, out + err
        assert "the disk is full (" in err and "No space left on device" in err, err
        assert "rerun the same command to resume from the last checkpoint" in err
        assert "Traceback" not in err, err
        filler.unlink()
        res = run_mpi(2, train_args(run, data_root, *LONG), timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        assert metrics(run)["eval/step"][-1] == 60
