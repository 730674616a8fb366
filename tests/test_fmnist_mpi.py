"""data.dataset: fashion_mnist under real mpirun: a short training run of jobs/fmnist.yaml
from the Debian package's IDX files, and the error when the files are missing.

The training test needs Debian's dataset-fashion-mnist package (CI installs it); without it the
test is skipped saying so, unless MHD_REQUIRE_FMNIST=1 (CI), which makes that a failure."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_mpi

JOB = str(ROOT / "jobs" / "fmnist.yaml")
FILES = Path("/usr/share/datasets/fashion-mnist")


def test_missing_files_say_how_to_get_them(tmp_path):
    res = run_mpi(2, ["-m", "mhd_hpc.train", JOB, f"run.out_dir={tmp_path / 'run'}",
                      f"data.root={tmp_path / 'data'}", "clients.count=2",
                      f"data.source={tmp_path / 'nowhere'}"], timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("config error at 'data.source'") == 1
    assert "apt-get install dataset-fashion-mnist" in res.stderr and "nowhere" in res.stderr
    assert not (tmp_path / "run").exists()


def test_a_short_fashion_mnist_run_trains(tmp_path):
    if not (FILES / "train-images-idx3-ubyte.gz").exists():
        why = f"no Fashion-MNIST in {FILES}: apt-get install dataset-fashion-mnist"
        if os.environ.get("MHD_REQUIRE_FMNIST") == "1":
            pytest.fail(why)
        pytest.skip(why)
    run = tmp_path / "run"
    res = run_mpi(4, ["-m", "mhd_hpc.train", JOB, f"run.out_dir={run}",
                      f"data.root={tmp_path / 'data'}", "clients.count=4", "run.steps=60",
                      "run.eval_every=60", "run.log_every=20", "run.checkpoint_every=60"],
                  timeout=400)
    assert res.returncode == 0, res.stderr
    assert "dataset fashion_mnist" in res.stdout and "60000" not in res.stderr
    with h5py.File(run / "metrics.h5", "r") as f:
        priv = f["eval/beta_priv"][-1]  # (clients, heads)
        dist = f.attrs["label_distribution"]
    chance = dist.max(axis=1)
    assert np.all(priv[:, 0] > chance + 0.1), (priv[:, 0], chance)  # it learned something
