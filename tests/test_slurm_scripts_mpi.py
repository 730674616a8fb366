"""The SLURM wrapper's signal -> checkpoint -> requeue path, srun played by mpirun."""

# No SLURM here: srun is a script that execs mpirun and scontrol one that logs its arguments; the
# ranks, signals and checkpoints are real.

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, mpi_env, mpirun_exe

SCRIPT = ROOT / "jobs" / "slurm" / "run_with_requeue.sh"


def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\n"
        f"exec {mpirun_exe()} --oversubscribe -np \"$SLURM_NTASKS\" \"$@\"\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = mpi_env({"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                   "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": str(ROOT)})
    return env


@pytest.mark.slow
def test_warning_signal_checkpoints_and_requeues(tmp_path, data_root):
    env = fake_slurm(tmp_path)
    run = tmp_path / "run"
    args = ["bash", str(SCRIPT), str(ROOT / "jobs" / "digits.yaml"), f"run.out_dir={run}",
            f"data.root={data_root}", "clients.count=2", "run.steps=400", "run.log_every=10",
            "run.eval_every=400", "run.checkpoint_every=400", "data.labels_per_client=5"]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.h5").exists():  # created after the signal handlers are installed
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends to the batch shell before the limit
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "ranks checkpointed; requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert list((run / "checkpoints" / "client_000").glob("step_*.h5"))
