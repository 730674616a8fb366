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


def _row(setting, seed, health):
    return {"setting": setting, "seed": seed, "step": 60, "heads": ["main"],
            "main/beta_priv": 0.9, "main/beta_sh": 0.5, "main_priv_worst": 0.8,
            "health": health, "health_failed": int(health == "failed"), "mb_sent": 1.0}


def test_runs_never_judged_are_not_counted_as_passing():
    rows = [_row("short", 0, "not judged"), _row("short", 1, "not judged"),
            _row("mixed", 0, "passed"), _row("mixed", 1, "not judged"),
            _row("judged", 0, "passed"), _row("judged", 1, "failed")]
    summary = sweep.summarise(rows)
    assert summary[1]["health_runs"] == {"failed": 0, "passed": 1, "not judged": 1}
    table = sweep.markdown_table(summary, ["main/beta_sh", "health_failed"]).splitlines()
    assert table[0] == "| setting | seeds | main sh | runs failing health |"
    assert table[2].endswith("| not judged |")
    assert table[3].endswith("| 0 (1 not judged) |")
    assert table[4].endswith("| 1 |")


def test_the_epsilon_column_shows_the_largest_budget_spent():
    rows = [{**_row("dp", 1, "passed"), "epsilon": 3.91}, {**_row("dp", 2, "passed"),
                                                          "epsilon": 3.97},
            _row("plain", 1, "passed")]
    table = sweep.markdown_table(sweep.summarise(rows), ["main/beta_sh", "epsilon"]).splitlines()
    assert table[0] == "| setting | seeds | main sh | epsilon (max over clients) |"
    assert table[2] == "| dp | 2 | 0.500 ± 0.000 | 3.97 |"
    assert table[3] == "| plain | 1 | 0.500 ± 0.000 | - |"


def test_the_launcher_and_the_entry_come_from_the_sweep_file(tmp_path):
    base = ROOT / "jobs" / "digits.yaml"

    def first_command(extra: str, launcher=None) -> list[str]:
        spec = sweep.load_sweep(write(tmp_path / "l.yaml", f"base: {base}\nout_dir: o\n{extra}"))
        return sweep.train_command(spec, sweep.plan(spec)[0], launcher)

    cmd = first_command("")
    assert cmd[:4] == ["mpirun", "--oversubscribe", "-np", "4"]
    assert cmd[5:7] == ["-m", "mhd_hpc.train"]
    assert first_command("launcher_args: []\n")[:3] == ["mpirun", "-np", "4"]  # MPICH
    assert first_command("", "/opt/ompi/bin/mpirun")[0] == "/opt/ompi/bin/mpirun"
    cmd = first_command("launcher: custom\nlaunch_command: mpiexec -n {ranks} -bind-to core\n"
                        "entry: mhd_hpc.job\n")
    assert cmd[:5] == ["mpiexec", "-n", "4", "-bind-to", "core"]
    assert cmd[6:8] == ["-m", "mhd_hpc.job"]  # a wrapper module of one's own is swept alike
    cmd = first_command("launcher: srun\nlauncher_args: [--mpi=pmi2]\n")
    assert cmd[:4] == ["srun", "--ntasks", "4", "--mpi=pmi2"]
    for extra, key in [("launcher: qsub\n", "sweep.launcher"),
                       ("launcher: custom\n", "sweep.launch_command"),
                       ("launch_command: mpiexec\n", "sweep.launch_command"),
                       ("launcher_args: --oversubscribe\n", "sweep.launcher_args"),
                       ("entry: no_such_pkg.train\n", "sweep.entry"),
                       ("entry: python -m x\n", "sweep.entry")]:
        with pytest.raises(ConfigError, match=key):
            sweep.load_sweep(write(tmp_path / "bad.yaml", f"base: {base}\nout_dir: o\n{extra}"))
