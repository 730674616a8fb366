"""The rest of the paper (issue 12): dynamic and exponential graphs (pure), the MHD+ public set,
FedMD's consensus under mpirun, the linear probe, and a random graph redrawn during a run."""

import json

import numpy as np
import pytest

from mhd_hpc import topology
from mhd_hpc.data.batches import load_split
from mhd_hpc.data.embedded import build_digits_shards
from mhd_hpc.data.manifest import content_digest, load_manifest
from mhd_hpc.evaluation import linear_probe
from mhd_hpc.run.metrics_file import read_metrics
from mhd_hpc.report import main as report_main

from conftest import ROOT, run_mpi, train_args

SMALL = ["clients.count=2", "run.steps=20", "run.eval_every=10", "run.log_every=10",
         "run.checkpoint_every=20", "data.labels_per_client=5", "data.public_batch_size=32"]


def test_exponential_graph_hears_from_powers_of_two():
    g = topology.exponential(8)
    assert g[0] == [4, 6, 7]  # 0-1, 0-2, 0-4 mod 8
    assert all(len(n) == 3 for n in g)
    assert topology.hop_distances(g).max() == 3  # log2(8)
    assert topology.exponential(1) == [[]] and topology.exponential(2) == [[1], [0]]


def test_random_graph_is_seeded_redrawn_and_validated():
    a = topology.random_graph(6, 2, seed=3, draw=0)
    assert a == topology.random_graph(6, 2, seed=3, draw=0)
    assert all(len(n) == 2 and i not in n for i, n in enumerate(a))
    at = topology.graph_schedule("random", 6, degree=2, resample_every=5, seed=3)
    # Steps 1-5 use draw 0, steps 6-10 draw 1: "every 5 steps" exactly.
    assert at(1) == at(5) == a and at(6) == at(10) == topology.random_graph(6, 2, 3, 1)
    assert {str(at(s)) for s in range(0, 200, 5)} != {str(a)}  # it does change
    once = topology.graph_schedule("random", 6, degree=2, resample_every=0, seed=3)
    assert once(0) == once(10_000)
    with pytest.raises(topology.TopologyError) as err:
        topology.graph_schedule("random", 4, degree=4)
    assert err.value.where == "degree"
    assert topology.is_dynamic("random", 5) and not topology.is_dynamic("random", 0)


def test_config_names_the_topology_keys():
    from mhd_hpc.config import ConfigError, load_config

    job = str(ROOT / "jobs" / "digits.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(job, ["topology.kind=random", "topology.degree=5"])
    assert err.value.key == "topology.degree"
    with pytest.raises(ConfigError) as err:
        load_config(job, ["topology.kind=random", "topology.resample_every=-1"])
    assert err.value.key == "topology.resample_every"
    with pytest.raises(ConfigError) as err:
        load_config(job, ["data.public_source=everything"])
    assert err.value.key == "data.public_source"
    with pytest.raises(ConfigError) as err:
        load_config(job, ["method=fedmd", "clients.per_client=[{ranks: 2}, {}, {}, {}]"])
    assert err.value.key == "clients.per_client"


def test_mhd_plus_public_set_is_the_whole_pool(tmp_path):
    args = dict(num_clients=3, public_fraction=0.1, label_assignment="random",
                labels_per_client=3, skew=10.0, seed=0)
    split = build_digits_shards(str(tmp_path), **args)
    plus = build_digits_shards(str(tmp_path), **args, public_source="all")
    assert split != plus
    ms, mp = load_manifest(split), load_manifest(plus)
    assert mp["public_source"] == "all" and "public_source" not in ms
    pool = sum(ms["counts"][s] for s in ms["counts"] if s != "test")
    assert mp["counts"]["public"] == pool == 1797 - 360
    public = load_split(plus, "public", mp)
    assert len(public) == pool and len(set(public.keys)) == pool
    for i in range(3):  # the private splits are unchanged
        assert load_split(plus, f"client_{i:03d}").keys == load_split(split, f"client_{i:03d}").keys
    assert content_digest(mp) != content_digest(ms)


def test_linear_probe_on_separable_embeddings():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 16))
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], 4) == 1.0
    noise = rng.normal(size=(400, 16))  # labels unrelated to the features: about chance
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], 4) < 0.5


def test_fedmd_consensus_averages_slices_over_clients():
    res = run_mpi(4, [str(ROOT / "tests" / "mpi" / "consensus_check.py")], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("consensus ok") == 4


def test_fedmd_probe_and_a_resampled_random_graph_train(tmp_path, data_root, capsys):
    fedmd = tmp_path / "fedmd"
    res = run_mpi(2, train_args(fedmd, data_root, *SMALL, "method=fedmd", "eval.probe=true",
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
    res = run_mpi(4, train_args(rnd, data_root, *SMALL, "clients.count=4",
                                "topology.kind=random", "topology.degree=1",
                                "topology.resample_every=10"), timeout=300)
    assert res.returncode == 0, res.stderr
    hops = read_metrics(rnd / "metrics.h5")["eval"]["hop_distances"]
    at = topology.graph_schedule("random", 4, degree=1, resample_every=10, seed=0)
    for row, step in enumerate((10, 20)):
        assert np.array_equal(hops[row], topology.hop_distances(at(step)))
