"""Checkpoint codec and atomicity; evaluation math; metrics file truncation on resume."""

import h5py
import numpy as np
import pytest
import torch

from mhd_hpc.run.checkpoint_files import CheckpointError, ClientCheckpoints, load, newest_common_step, save_atomic
from mhd_hpc.evaluation import accuracy_summary, per_class_accuracy
from mhd_hpc.run.metrics_file import MetricsError, MetricsWriter, read_metrics
from mhd_hpc.models import build_model


def test_model_and_optimizer_state_round_trip(tmp_path):
    model = build_model("cnn_small", 10, 2, 1, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8))[1][1].sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
             "torch_rng": torch.get_rng_state(), "misc": (1, "a/b", None, [0.5])}
    save_atomic(tmp_path / "c.h5", state, {"arch": "cnn_small"})
    loaded, meta = load(tmp_path / "c.h5")
    assert meta == {"arch": "cnn_small"} and loaded["step"] == 7
    assert loaded["misc"] == (1, "a/b", None, [0.5])
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v) and loaded["model"][k].dtype == v.dtype
    assert set(loaded["optimizer"]["state"]) == set(opt.state_dict()["state"])  # int keys kept
    opt2 = torch.optim.SGD(build_model("cnn_small", 10, 2, 1, 8).parameters(), lr=0.1,
                           momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(loaded["torch_rng"], torch.get_rng_state()) or loaded["torch_rng"].numel()


def test_corrupt_or_partial_checkpoints_are_named(tmp_path):
    path = tmp_path / "bad.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError, match="bad.h5"):
        load(path)
    with h5py.File(tmp_path / "partial.h5", "w") as f:  # a writer killed before 'complete'
        f.attrs["format_version"] = 1
    with pytest.raises(CheckpointError, match="partial.h5"):
        load(tmp_path / "partial.h5")


def test_checkpoint_rotation_ignores_temp_files(tmp_path):
    ck = ClientCheckpoints(tmp_path, 3, keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"step": step}, {})
    (ck.folder / "step_000000040.h5.tmp").write_bytes(b"half")  # kill during a write
    assert ck.steps() == [20, 30]
    assert ck.load(30)[0]["step"] == 30


def test_newest_common_step():
    assert newest_common_step([[10, 20], [10, 20]]) == 20
    assert newest_common_step([[10, 20], [10]]) == 10  # client 1 died before writing 20
    assert newest_common_step([[10], []]) == 0


def test_accuracy_math_on_hand_made_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])
    acc = per_class_accuracy(preds, labels, 4)
    np.testing.assert_allclose(acc[:3], [0.5, 1.0, 0.0])
    assert np.isnan(acc[3])
    # Two clients, one head; client 0's private data is all class 0, client 1's half 1 half 2.
    per_class = np.array([[[0.5, 1.0, 0.0]], [[1.0, 0.0, 1.0]]])
    dist = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    s = accuracy_summary(per_class, dist)
    np.testing.assert_allclose(s["beta_sh"], [[0.5], [2 / 3]])
    np.testing.assert_allclose(s["beta_priv"], [[0.5], [0.5]])
    np.testing.assert_allclose(s["cross_acc"][0, 0], [0.5, 0.5])   # client 0 on tasks 0, 1
    np.testing.assert_allclose(s["cross_acc"][1, 0], [1.0, 0.5])


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
