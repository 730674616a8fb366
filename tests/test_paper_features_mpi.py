"""The rest of the paper under real mpirun (issue 12): FedMD, the probe, a redrawn random graph."""

import json

import numpy as np
import pytest

from mhd_hpc.data.build.embedded import load_digits_arrays
from mhd_hpc.data.manifest import content_digest, load_manifest
from mhd_hpc.method import topology
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
    # Chance is 0.1; measured 0.85 on seed 0 (this test), 0.82-0.84 on seeds 1-3.
    assert json.loads(capsys.readouterr().out)["linear_probe"]["mean"] > 0.6
    rnd = tmp_path / "random"
    res = run_mpi(4, train_args(rnd, data_root, *SHORT, "clients.count=4",
                                "topology.kind=random", "topology.degree=1",
                                "topology.resample_every=10"), timeout=300)
    assert res.returncode == 0, res.stderr
    hops = read_metrics(rnd / "metrics.h5")["eval"]["hop_distances"]
    at = topology.graph_schedule("random", 4, degree=1, resample_every=10, seed=0)
    for row, step in enumerate((10, 20)):
        assert np.array_equal(hops[row], topology.hop_distances(at(step)))


FOUR = [*SMALL, "clients.count=4", "run.steps=30", "run.log_every=30", "run.eval_every=30",
        "run.checkpoint_every=30"]


def test_delta_random_selection_and_even_labels_train(tmp_path, data_root, capsys):
    """Delta = 3 of 3 in-neighbours with random selection and even primary labels: every step
    receives three messages, a random target is the client itself a quarter of the time, and
    the four clients' tasks differ, each label primary for exactly two of them."""
    run = tmp_path / "delta"
    res = run_mpi(4, train_args(run, data_root, *FOUR, "distill.targets_per_step=3",
                                "distill.selection=random", "data.label_assignment=even"),
                  timeout=300)
    assert res.returncode == 0, res.stderr
    m = read_metrics(run / "metrics.h5")
    t = m["train"]
    message = t["bytes_received"][0] / (30 * 3)  # per client: 3 messages per step
    assert np.allclose(t["bytes_received"], message * 90)
    assert np.all(np.abs(t["self_target_aux1"] - 0.25) < 0.1), t["self_target_aux1"]
    primary = json.loads((run / "partition.json").read_text())["primary"]
    assert len({tuple(p) for p in primary}) == 4
    assert set(np.bincount(np.concatenate(primary), minlength=10).tolist()) == {2}


def test_skip_exponential_graph_and_mhd_plus_train(tmp_path, data_root):
    run = tmp_path / "skip"
    res = run_mpi(4, train_args(run, data_root, *FOUR, "distill.skip_less_confident=true",
                                "topology.kind=exponential", "data.public_source=all"),
                  timeout=300)
    assert res.returncode == 0, res.stderr
    m = read_metrics(run / "metrics.h5")
    assert np.nanmax(m["train"]["skipped_aux1"]) > 0  # confident students skip targets
    assert np.array_equal(m["eval"]["hop_distances"][-1],
                          topology.hop_distances(topology.exponential(4)))
    dataset = json.loads((run / "dataset.json").read_text())
    assert dataset["root"] == str(data_root)
    # MHD+: the run read a dataset whose public split is the whole training pool (the held-out
    # public samples and every client's), found by the content digest the run recorded.
    [manifest] = [mf for mf in map(load_manifest, map(str, sorted(data_root.glob("digits-*"))))
                  if content_digest(mf) == dataset["digest"]]
    counts = manifest["counts"]
    assert manifest["public_source"] == "all"
    assert counts["public"] == len(load_digits_arrays()[1]) - counts["test"]
    assert set(manifest["splits"]["public"]) >= set(manifest["splits"]["client_000"])
    # and learned from it: chance is 0.1 on the shared (uniform) task
    assert np.mean(m["eval"]["beta_sh"][-1][:, 0]) > 0.3, m["eval"]["beta_sh"][-1]


def test_islands_report_the_tasks_no_edge_reaches(tmp_path, data_root, capsys):
    run = tmp_path / "islands"
    res = run_mpi(4, train_args(run, data_root, *FOUR, "topology.kind=islands",
                                "topology.islands=2"), timeout=300)
    assert res.returncode == 0, res.stderr
    assert report_main([str(run)]) == 0
    table = capsys.readouterr().out
    assert "1 hop" in table and "unreachable" in table


def test_fedmd_alternates_digest_and_revisit_steps(tmp_path, data_root):
    """FedMD's rounds: with revisit_steps=1 every other step digests the consensus without the
    private CE (logged per step here: NaN CE on digest steps), the others train on labels."""
    run = tmp_path / "fedmd"
    res = run_mpi(2, train_args(run, data_root, *SMALL, "method=fedmd", "run.steps=8",
                                "run.log_every=1", "run.eval_every=8",
                                "run.checkpoint_every=8"), timeout=300)
    assert res.returncode == 0, res.stderr
    t = read_metrics(run / "metrics.h5")["train"]
    digest = t["step"] % 2 == 0
    assert np.all(np.isnan(t["loss_ce"][digest])) and np.all(t["loss_ce"][~digest] > 0)
    assert np.all(t["loss_consensus"][digest] > 0) and np.all(np.isnan(t["loss_consensus"][~digest]))
