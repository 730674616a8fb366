"""The health check (issue 8): a run that is not learning says so, in the log, metrics.h5 and
the report; the same job with the distillation warm-up trains and stays quiet."""

import numpy as np

from mhd_hpc.evaluation import chance_accuracy, check_health, health_after, prior_entropy
from mhd_hpc.run.metrics_file import read_metrics
from mhd_hpc.report import main as report_main
from mhd_hpc.schedules import distill_ramp

from conftest import run_mpi, train_args


def test_health_rule_on_hand_made_numbers():
    dist = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(chance_accuracy(dist), [0.5, 0.25])
    np.testing.assert_allclose(prior_entropy(dist), [np.log(2), np.log(4)])
    # Client 0 learns (0.9 > 0.75); client 1 sits at chance with CE at its prior's: fails.
    ok, reasons = check_health(np.array([0.9, 0.3]), dist, np.array([0.1, 1.38]))
    assert ok.tolist() == [True, False]
    assert len(reasons) == 1 and reasons[0].startswith("client 1 is not learning")
    # Low accuracy but a CE far below the prior's is a slow learner, not a failure.
    ok, _ = check_health(np.array([0.9, 0.3]), dist, np.array([0.1, 0.2]))
    assert ok.all()
    # Without a training CE the accuracy alone decides.
    assert check_health(np.array([0.9, 0.3]), dist, None)[0].tolist() == [True, False]


def test_when_the_check_starts_and_the_distillation_ramp():
    assert health_after(600, 0, 100, 0) == 150
    assert health_after(600, 0, 300, 0) == 300
    assert health_after(600, 50, 300, 0) == 50
    assert [distill_ramp(s, 4) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert distill_ramp(1, 0) == 1.0


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
