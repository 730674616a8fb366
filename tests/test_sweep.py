"""The sweep planner (mhd_hpc/sweep.py) without MPI: grid x seeds, bad sweeps refused."""

import pytest

from mhd_hpc import sweep
from mhd_hpc.config import ConfigError

from conftest import ROOT


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
