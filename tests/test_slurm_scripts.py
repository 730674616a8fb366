"""The SLURM scripts in jobs/slurm/ parse (bash -n)."""

import subprocess

from conftest import ROOT

SCRIPT = ROOT / "jobs" / "slurm" / "run_with_requeue.sh"


def test_sbatch_scripts_parse():
    for script in (SCRIPT, *(ROOT / "jobs" / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(script)], check=True)
