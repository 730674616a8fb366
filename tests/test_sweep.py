"""The sweep runner: a grid of runs planned without MPI, then a real 2-run grid under mpirun,
resumable (a finished run is skipped) and summarised in one table."""

import json
import subprocess
import sys

import pytest

from mhd_hpc import sweep
from mhd_hpc.config import ConfigError

from conftest import ROOT, mpi_env


def write(path, text):
    path.write_text(text)
    return path


def test_plan_crosses_settings_grid_and_seeds(tmp_path):
    spec = sweep.load_sweep(write(tmp_path / "s.yaml", f"""
base: {ROOT / 'jobs' / 'digits.yaml'}
out_dir: {tmp_path / 'out'}
overrides: [run.steps=50]
settings:
  - {{name: mhd}}
  - {{name: separate, overrides: [method=separate], grid: {{}}}}
grid:
  model.aux_heads: [1, 3]
  topology.kind: [complete, cycle]
seeds: [7, 8]
"""))
    runs = sweep.plan(spec)
    assert len(runs) == 2 * 2 * 2 + 2
    first = runs[0]
    assert first.setting == "mhd model.aux_heads=1 topology.kind=complete" and first.seed == 7
    assert "run.seed=7" in first.overrides and first.steps == 50 and first.ranks == 4
    assert {r.setting for r in runs if "separate" in r.setting} == {"separate"}
    assert len({r.out_dir for r in runs}) == len(runs)
    cmd = sweep.train_command(spec, first, "srun")
    assert cmd[:4] == ["srun", "--ntasks", "4", "--kill-on-bad-exit=1"]
    script = sweep.slurm_array(spec, runs, "s.yaml")
    assert "#SBATCH --array=0-9" in script and "--only $SLURM_ARRAY_TASK_ID" in script


def test_bad_sweeps_are_refused_naming_the_key(tmp_path):
    base = ROOT / "jobs" / "digits.yaml"
    with pytest.raises(ConfigError, match="sweep.grids"):
        sweep.load_sweep(write(tmp_path / "a.yaml", f"base: {base}\nout_dir: o\ngrids: {{}}\n"))
    with pytest.raises(ConfigError, match="sweep.seeds"):
        sweep.load_sweep(write(tmp_path / "b.yaml", f"base: {base}\nout_dir: o\nseeds: []\n"))
    spec = sweep.load_sweep(write(tmp_path / "c.yaml", f"base: {base}\nout_dir: o\n"
                                  "grid: {model.aux_heads: [2, -1]}\n"))
    with pytest.raises(ConfigError, match="model.aux_heads"):
        sweep.plan(spec)  # the bad grid point stops the sweep before anything runs


def test_a_two_run_grid_runs_resumes_and_tabulates(tmp_path):
    out = tmp_path / "out"
    grid = write(tmp_path / "grid.yaml", f"""
base: {ROOT / 'jobs' / 'digits.yaml'}
out_dir: {out}
overrides: [clients.count=2, run.steps=20, run.eval_every=10, run.log_every=10,
            run.checkpoint_every=20, data.labels_per_client=5, data.root={tmp_path / 'data'}]
settings:
  - {{name: mhd}}
  - {{name: separate, overrides: [method=separate]}}
seeds: [3]
""")
    tool = [sys.executable, str(ROOT / "tools" / "sweep.py"), str(grid)]
    res = subprocess.run(tool, capture_output=True, text=True, timeout=400, env=mpi_env(),
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| mhd | 1 |" in res.stdout and "| separate | 1 |" in res.stdout
    results = json.loads((out / "results.json").read_text())
    assert [s["setting"] for s in results["settings"]] == ["mhd", "separate"]
    assert results["runs"][0]["step"] == 20 and 0 <= results["runs"][0]["main/beta_sh"] <= 1
    assert (out / "results.md").read_text().startswith("Sweep grid.yaml")
    res = subprocess.run(tool + ["--dry-run"], capture_output=True, text=True, timeout=60,
                         env=mpi_env(), cwd=ROOT)
    assert res.stdout.count("finished") == 2
    res = subprocess.run(tool, capture_output=True, text=True, timeout=120, env=mpi_env(),
                         cwd=ROOT)
    assert res.returncode == 0 and res.stdout.count("finished, skipped") == 2
