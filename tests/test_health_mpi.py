"""The health check under real mpirun (issue 8): a collapsed run warns; the defaults do not."""

import pytest

from mhd_hpc.run.metrics_file import read_metrics
from mhd_hpc.report import main as report_main

from conftest import run_mpi, train_args


@pytest.mark.slow
def test_a_collapsed_run_warns_and_the_warmed_up_run_does_not(tmp_path, data_root, capsys):
    """4 aux heads with the settings from before issue 8 (no distillation warm-up, nu_aux on
    every aux head) collapse to chance (seeds 0, 1, 2 all do, by a wide margin, so the case does
    not hinge on one machine's float rounding); the defaults train the same job."""
    job = ["clients.count=2", "model.aux_heads=4", "run.steps=120", "run.eval_every=60",
           "run.log_every=20", "run.checkpoint_every=120", "run.seed=0"]
    collapsed, healthy = tmp_path / "collapsed", tmp_path / "healthy"
    before_issue_8 = ["distill.warmup_steps=0", "distill.aux_weighting=per_head"]
    res = run_mpi(2, train_args(collapsed, data_root, *job, *before_issue_8), timeout=240)
    assert res.returncode == 0, res.stderr
    assert "WARNING health at step 60: client 0 is not learning its private task" in res.stdout
    assert "failed the health check" in res.stdout
    assert read_metrics(collapsed / "metrics.h5")["eval"]["health"].tolist() == [[0, 0], [0, 0]]
    assert report_main([str(collapsed)]) == 0
    out = capsys.readouterr().out
    assert "HEALTH WARNING" in out and "client0" in out
    res = run_mpi(2, train_args(healthy, data_root, *job), timeout=240)
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stdout
    health = read_metrics(healthy / "metrics.h5")["eval"]["health"]
    assert health.tolist() == [[-1, -1], [1, 1]]  # step 60 is before the check starts (100)
