"""tools/sweep.py under real mpirun: a 2-run grid runs, resumes, skips finished runs, tabulates."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, mpi_env


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow
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
    # 20 steps end before the health check's first judged step: "not judged", not "0 failing".
    assert res.stdout.count("| not judged |") == 2
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
