"""The sbatch scripts and the sweep's job arrays under a real SLURM (tools/slurm_local.sh):
a whole job, the time-limit warning -> checkpoint -> requeue -> resume path seen in SLURM's
own accounting, a job array, an allocation of the wrong size, srun without PMIx, scancel.

Skipped, saying why, when no SLURM is up; ``MHD_REQUIRE_SLURM=1`` (CI) turns the skip into a
failure, so that CI cannot pass without running them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, SMALL, mpi_env, run_mpi, train_args

STATE = Path(os.environ.get("MHD_SLURM_DIR", "/tmp/mhd-slurm"))
DIGITS = str(ROOT / "jobs" / "slurm" / "digits.sbatch")
# The digits job's 4 tasks on a machine that may have fewer cores: --overcommit lets SLURM
# place more tasks than CPUs (a real cluster's CPU nodes do not need it).
SUBMIT = ["--overcommit"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """The environment for SLURM commands, or a skip naming what is missing."""
    conf = STATE / "slurm.conf"
    up = conf.exists() and subprocess.run(
        ["bash", str(ROOT / "tools" / "slurm_local.sh"), "status", str(STATE)],
        capture_output=True).returncode == 0
    if not up:
        why = (f"no SLURM cluster is up ({conf}): start one with `bash tools/slurm_local.sh "
               "start` (as root, after apt-get install slurm-wlm slurmdbd munge libpmix-dev "
               "mariadb-server)")
        if os.environ.get("MHD_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    env = mpi_env({"SLURM_CONF": str(conf),
                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    for var in [v for v in env if v.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_NTASKS"))]:
        del env[var]  # a test run inside an allocation must not leak it into new jobs
    return env


def sbatch(env: dict, out: Path, script: str, *args: str, wait: bool = False,
           extra: tuple[str, ...] = ()) -> tuple[int, subprocess.CompletedProcess]:
    """Submit from the repository root; returns (job id, sbatch's result)."""
    cmd = ["sbatch", "--parsable", *SUBMIT, *extra, f"--output={out}", *(["--wait"] if wait
                                                                          else []), script, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    job = int(res.stdout.strip().split(";")[0]) if res.stdout.strip() else -1
    return job, res


def sacct(env: dict, job: int) -> list[tuple[str, str, str]]:
    """(JobID, State, ExitCode) of every record of ``job``, requeued runs included."""
    res = subprocess.run(["sacct", "-D", "-n", "-P", "-j", str(job), "-o",
                          "JobID,State,ExitCode"], capture_output=True, text=True, env=env)
    return [tuple(line.split("|")) for line in res.stdout.split() if line]


def wait_for(what, predicate, timeout: float = 300, pause: float = 0.5):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(pause)


def job_state(env: dict, job: int) -> str:
    rows = [r for r in sacct(env, job) if r[0] == str(job)]
    return rows[-1][1] if rows else ""


def digits_args(run: Path, data_root: Path, *extra: str) -> list[str]:
    return [f"run.out_dir={run}", f"data.root={data_root}", *extra]


def eval_arrays(run: Path) -> dict:
    with h5py.File(run / "metrics.h5", "r") as f:
        return {k: f[k][()] for k in ("eval/step", "eval/per_class_acc", "train/step",
                                      "train/loss_total")}


def test_sbatch_runs_the_digits_job_to_the_end(slurm, tmp_path, data_root):
    run = tmp_path / "run"
    job, res = sbatch(slurm, tmp_path / "out.txt", DIGITS,
                      *digits_args(run, data_root, "run.steps=60", "run.eval_every=30"),
                      wait=True)
    log = (tmp_path / "out.txt").read_text()
    assert res.returncode == 0, res.stderr + log
    assert "done: 60 steps" in log and "ranks per client [1, 1, 1, 1]" in log
    assert ("COMPLETED" in {s for j, s, _ in sacct(slurm, job) if j == str(job)})
    report = subprocess.run([sys.executable, "-m", "mhd_hpc.report", str(run), "--json"],
                            capture_output=True, text=True, env=slurm)
    assert report.returncode == 0 and '"step": 60' in report.stdout


def test_cpus_per_task_reach_the_ranks(slurm, tmp_path, data_root):
    """sbatch's --cpus-per-task reaches the rank through run_with_requeue.sh (srun >= 22.05
    does not pass it on by itself: each rank would be bound to one CPU), and every rank sizes
    its torch threads from the CPUs it really has (run.threads=0). Two tasks of 2 CPUs on this
    2-CPU machine (--overcommit)."""
    run = tmp_path / "run"
    job, res = sbatch(slurm, tmp_path / "out.txt", DIGITS,
                      *digits_args(run, data_root, "clients.count=2", "run.steps=20",
                                   "run.eval_every=20", "run.log_every=10", "run.threads=0"),
                      wait=True, extra=("--ntasks=2", "--cpus-per-task=2"))
    log = (tmp_path / "out.txt").read_text()
    assert res.returncode == 0, res.stderr + log
    assert "CPUs per rank (affinity): 2; threads per rank: 2 torch + 0 loader" in log, log


@pytest.mark.slow
def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm, tmp_path, data_root):
    """What --signal=B:USR1@600 does before a time limit, sent at once: the wrapper forwards
    it, the ranks checkpoint at the next log step and exit 3, the wrapper requeues the job, the
    requeued job resumes; sacct shows both runs, and the metrics equal an uninterrupted run's."""
    job_args = ("run.steps=120", "run.eval_every=40", "run.log_every=10",
                "run.checkpoint_every=40")
    reference = tmp_path / "reference"
    res = run_mpi(4, train_args(reference, data_root, *job_args), timeout=300)
    assert res.returncode == 0, res.stderr
    run, out = tmp_path / "run", tmp_path / "out.txt"
    job, res = sbatch(slurm, out, DIGITS, *digits_args(run, data_root, *job_args))
    assert res.returncode == 0, res.stderr
    wait_for("step 30 in the job's log",
             lambda: out.exists() and "step     30/120" in out.read_text())
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=slurm)
    wait_for("the requeue", lambda: "requeueing job" in out.read_text(), timeout=120)
    # SLURM holds a requeued job back for a while (BeginTime); once the first run has ended
    # (its record closed, the job pending again), let it start now.
    def pending_again() -> bool:
        state = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"],
                               capture_output=True, text=True, env=slurm).stdout.strip()
        first = [r for r in sacct(slurm, job) if r[0] == str(job)][:1]
        return state == "PENDING" and bool(first) and first[0][1] == "REQUEUED"
    wait_for("the requeued job to pend", pending_again, 120)
    time.sleep(5)  # slurmd's clean-up of the first run's step
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm)
    wait_for("the job to complete", lambda: job_state(slurm, job) == "COMPLETED", timeout=600,
             pause=2)
    log = out.read_text()
    stop = log[log.index("stopping at step"):].split()[3]
    assert f"resuming every client from step {stop}" in log
    states = [s for j, s, _ in sacct(slurm, job) if j == str(job)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", sacct(slurm, job)
    steps = [r for r in sacct(slurm, job) if r[0] == f"{job}.0"]
    # The interrupted step: its ranks exited with EXIT_RESUMABLE (3), or srun's
    # --kill-on-bad-exit ended the ones still finalising after the first 3; then the rerun.
    assert steps[0][1] in ("FAILED", "CANCELLED") and steps[-1][1] == "COMPLETED", steps
    got, want = eval_arrays(run), eval_arrays(reference)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=key)


def test_a_job_array_runs_a_two_run_grid(slurm, tmp_path, data_root):
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        f"base: {ROOT / 'jobs' / 'digits.yaml'}\nout_dir: {tmp_path / 'runs'}\n"
        f"overrides: [{', '.join([*SMALL, f'data.root={data_root}', 'run.steps=20'])}]\n"
        "grid:\n  distill.nu_aux: [1, 3]\nseeds: [0]\nranks: 2\n")
    script = subprocess.run([sys.executable, "tools/sweep.py", str(sweep_file), "--slurm"],
                            capture_output=True, text=True, env=slurm, cwd=ROOT, check=True)
    (tmp_path / "array.sbatch").write_text(script.stdout)
    job, res = sbatch(slurm, tmp_path / "out-%a.txt", str(tmp_path / "array.sbatch"), wait=True)
    assert res.returncode == 0, res.stderr + "".join(
        p.read_text() for p in tmp_path.glob("out-*.txt"))
    for run in sorted((tmp_path / "runs").glob("*/seed0")):
        with h5py.File(run / "metrics.h5", "r") as f:
            assert list(f["eval/step"][()])[-1] == 20, run
    assert len(list((tmp_path / "runs").glob("*/seed0"))) == 2
    table = subprocess.run([sys.executable, "tools/sweep.py", str(sweep_file), "--table"],
                           capture_output=True, text=True, env=slurm, cwd=ROOT)
    assert table.returncode == 0 and "distill.nu_aux=1" in table.stdout


def test_an_allocation_of_the_wrong_size_and_srun_without_pmix(slurm, tmp_path, data_root):
    out = tmp_path / "small.txt"
    _, res = sbatch(slurm, out, DIGITS, *digits_args(tmp_path / "a", data_root), wait=True,
                    extra=("--ntasks=3",))
    log = out.read_text()
    assert res.returncode != 0
    assert log.count("config error at 'clients.count'") == 1, log  # said once, by rank 0
    assert ("4 clients x 1 rank(s) = 4 ranks but was launched on 3: use srun --ntasks 4" in log
            and "clients.ranks_per_client" in log), log
    assert not (tmp_path / "a").exists()
    out = tmp_path / "pmi2.txt"
    env = {**slurm, "MHD_SRUN_MPI": "pmi2"}  # Open MPI 5 speaks PMIx only: every rank alone
    _, res = sbatch(env, out, DIGITS, *digits_args(tmp_path / "b", data_root), wait=True)
    log = out.read_text()
    assert res.returncode != 0
    assert "each sees an MPI world of 1: srun did not wire the tasks" in log, log
    assert "srun without --mpi=pmix?" in log


def test_scancel_of_a_running_job_leaves_a_resumable_folder(slurm, tmp_path, data_root):
    run, out = tmp_path / "run", tmp_path / "out.txt"
    job_args = ("run.steps=200", "run.eval_every=50", "run.log_every=10",
                "run.checkpoint_every=20")
    job, res = sbatch(slurm, out, DIGITS, *digits_args(run, data_root, *job_args))
    assert res.returncode == 0, res.stderr
    wait_for("the checkpoint of step 40", lambda: len(list(
        (run / "checkpoints" / "client_003").glob("step_*40.h5"))) > 0)
    subprocess.run(["scancel", str(job)], check=True, env=slurm)
    wait_for("the cancelled job to end", lambda: job_state(slurm, job) == "CANCELLED", 120)
    res = run_mpi(4, train_args(run, data_root, *job_args), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step" in res.stdout and "done: 200 steps" in res.stdout
