"""The rest of the paper under real mpirun (issue 12): FedMD, the probe, a redrawn random graph."""

import json

import numpy as np
import pytest

from mhd_hpc import topology
from mhd_hpc.run.metrics_file import read_metrics
from mhd_hpc.report import main as report_main

from conftest import ROOT, SMALL, run_mpi, train_args

SHORT = [*SMALL, "run.steps=20", "run.checkpoint_every=20"]


def test_fedmd_consensus_averages_slices_over_clients():
    res = run_mpi(4, [str(ROOT / "tests" / "mpi" / "consensus_check.py")], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("consensus ok") == 4


@pytest.mark.slow
def test_fedmd_probe_and_a_resampled_random_graph_train(tmp_path, data_root, capsys):
    fedmd = tmp_path / "fedmd"
    res = run_mpi(2, train_args(fedmd, data_root, *SHORT, "method=fedmd", "eval.probe=true",
                                "clients.arch=[cnn_small, resnet18]", "model.embedding_dim=32"),
                  timeout=300)
    assert res.returncode == 0, res.stderr
    assert "linear probe" in res.stdout
    m = read_metrics(fedmd / "metrics.h5")
    assert np.all(m["train"]["loss_consensus"] > 0)  # a digest step in every log interval
    assert np.all(m["train"]["bytes_sent"] > 0)  # the consensus allreduce is counted
    assert m["eval"]["probe_acc"].shape == (2, 2)
    assert np.all((0 <= m["eval"]["probe_acc"]) & (m["eval"]["probe_acc"] <= 1))
    assert report_main([str(fedmd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["linear_probe"]["mean"] > 0.2
    rnd = tmp_path / "random"
    res = run_mpi(4, train_args(rnd, data_root, *SHORT, "clients.count=4",
                                "topology.kind=random", "topology.degree=1",
                                "topology.resample_every=10"), timeout=300)
    assert res.returncode == 0, res.stderr
    hops = read_metrics(rnd / "metrics.h5")["eval"]["hop_distances"]
    at = topology.graph_schedule("random", 4, degree=1, resample_every=10, seed=0)
    for row, step in enumerate((10, 20)):
        assert np.array_equal(hops[row], topology.hop_distances(at(step)))
