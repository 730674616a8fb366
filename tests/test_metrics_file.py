"""metrics.h5 (mhd_hpc/run/metrics_file.py): resume truncation, other runs, columns, torn writes."""

import numpy as np
import pytest

from mhd_hpc.run.evaluation import accuracy_summary
from mhd_hpc.run.metrics_file import MetricsError, MetricsWriter, read_metrics


def test_metrics_truncate_on_resume_and_refuse_other_runs(tmp_path):
    path = tmp_path / "metrics.h5"
    dist = np.full((2, 3), 1 / 3)
    w = MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="abc", resume_step=0)
    for step in (10, 20, 30):
        w.write_train(step, {"loss_ce": [1.0, 2.0]})
        w.write_eval(step, accuracy_summary(np.full((2, 1, 3), step / 100), dist))
    MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="abc", resume_step=20)  # resumed from step 20
    m = read_metrics(path)
    assert list(m["eval"]["step"]) == [10, 20] and list(m["train"]["step"]) == [10, 20]
    assert m["eval"]["beta_sh"].shape == (2, 2, 1)
    with pytest.raises(MetricsError, match="different job"):
        MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="other", resume_step=0)


def test_metrics_rows_stay_aligned_when_columns_come_and_go(tmp_path):
    """A column that appears late (a pool's staleness, a diagnostic switched on at resume) or
    is missing from a row stays aligned with the steps; a resume never grows a dataset."""
    path = tmp_path / "metrics.h5"
    dist = np.full((2, 3), 1 / 3)
    w = MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="abc", resume_step=0)
    for step in (100, 200, 300, 400):
        row = {"loss_ce": [1.0, 2.0]}
        if step >= 300:
            row["staleness"] = [5.0, 6.0]
        w.write_train(step, row)
    m = read_metrics(path)
    assert list(m["train"]["step"]) == [100, 200, 300, 400]
    np.testing.assert_array_equal(m["train"]["staleness"][:, 0], [np.nan, np.nan, 5, 5])
    w = MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="abc", resume_step=200)  # resumed from 200
    w.write_train(300, {"loss_ce": [1.0, 2.0]})
    m = read_metrics(path)
    assert list(m["train"]["step"]) == [100, 200, 300]
    assert np.isnan(m["train"]["staleness"]).all()


def test_report_of_a_file_with_a_torn_write_reads_complete_rows(tmp_path):
    from mhd_hpc.run.evaluation import accuracy_summary
    from mhd_hpc.run.metrics_file import MetricsWriter

    path = tmp_path / "metrics.h5"
    dist = np.full((2, 3), 1 / 3)
    w = MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="abc", resume_step=0)
    for step in (10, 20):
        w.write_eval(step, accuracy_summary(np.full((2, 1, 3), step / 100), dist))
    # A writer killed in the middle of a write leaves the sequence number odd.
    (tmp_path / "metrics.h5.seq").write_text(str(w.seq + 1))
    m = read_metrics(path, attempts=3, pause_s=0.01)
    assert list(m["eval"]["step"]) == [10, 20]
    w2 = MetricsWriter(path, clients=["c0", "c1"], heads=["main"], label_distribution=dist,
                      fingerprint="abc", resume_step=20)  # the rerun
    assert w2.seq % 2 == 0
