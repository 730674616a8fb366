"""Training end to end under real mpirun: launch errors, baselines, mixed archs, MHD's gain."""

import json

import numpy as np
import pytest

from mhd_hpc.run.checkpoint_files import ClientCheckpoints
from mhd_hpc.report import main as report_main
from mhd_hpc.run.metrics_file import read_metrics

from conftest import SMALL, run_mpi, train_args

# A small, quick job: 2 clients, few steps, frequent evaluation and checkpoints.


def test_config_error_stops_every_rank_before_training(tmp_path, data_root):
    res = run_mpi(2, train_args(tmp_path / "run", data_root, "clients.count=2",
                                "distill.nu_auxx=3"), timeout=60)
    assert res.returncode == 2
    assert res.stderr.count("config error at 'distill.nu_auxx'") == 1  # said once, by rank 0
    assert not (tmp_path / "run").exists()  # nothing started


def test_world_size_mismatch_is_a_clear_error(tmp_path, data_root):
    res = run_mpi(3, train_args(tmp_path / "run", data_root, "clients.count=2"), timeout=60)
    assert res.returncode != 0
    assert "but was launched on 3" in res.stderr


def final_params(run_dir, client, steps):
    state, _ = ClientCheckpoints(run_dir, client, 2).load(steps)
    return {k: v for k, v in state["model"].items() if "running" not in k and "num_batches" not in k}


@pytest.mark.parametrize("method", ["fedavg", "supervised"])
def test_weight_sharing_baselines_keep_clients_identical(tmp_path, data_root, method):
    run = tmp_path / method
    res = run_mpi(2, train_args(run, data_root, *SMALL, f"method={method}", "fedavg.every=5"),
                  timeout=180)
    assert res.returncode == 0, res.stderr
    a, b = final_params(run, 0, 30), final_params(run, 1, 30)
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), atol=1e-6, err_msg=name)
    # The BatchNorm statistics are part of the one model too (they were per client before).
    sa, sb = (ClientCheckpoints(run, c, 2).load(30)[0]["model"] for c in (0, 1))
    buffers = [k for k in sa if "running" in k]
    assert buffers
    for name in buffers:
        np.testing.assert_allclose(sa[name].numpy(), sb[name].numpy(), atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_heterogeneous_architectures_and_topk(tmp_path, data_root, capsys):
    run = tmp_path / "hetero"
    res = run_mpi(2, train_args(run, data_root, *SMALL, "run.steps=10",
                                "clients.arch=[cnn_small, resnet18]", "model.embedding_dim=32",
                                "exchange.top_k=3", "topology.kind=cycle", "optim.lr=0.02"), timeout=240)
    assert res.returncode == 0, res.stderr
    assert report_main([str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 10
    assert set(summary["clients"]) == {"client0", "client1"}
    for head in ("main", "aux1", "aux2"):
        for value in summary["mean"][head].values():
            assert 0.0 <= value <= 1.0


@pytest.mark.slow
def test_mhd_aux_heads_beat_separate_on_shared_accuracy(tmp_path, data_root, capsys):
    """The point of MHD (paper §4.2): with strongly non-iid clients (s = 100), auxiliary heads
    that distill from peers know the classes a client rarely sees; separate training does not.
    Pool mode (paper Algorithm 2) trains the same job to comparable accuracy."""
    short = ["run.steps=250", "run.eval_every=250", "run.log_every=50",
             "run.checkpoint_every=250"]
    best = {}
    for name, extra in (("mhd", []), ("pool", ["exchange.mode=pool"]),
                        ("separate", ["method=separate"])):
        run = tmp_path / name
        res = run_mpi(4, train_args(run, data_root, *short, *extra), timeout=400)
        assert res.returncode == 0, res.stderr
        assert report_main([str(run), "--json"]) == 0
        mean = json.loads(capsys.readouterr().out)["mean"]
        best[name] = {head: v["beta_sh"] for head, v in mean.items()}
    print(best)
    separate = max(best["separate"].values())
    for name in ("mhd", "pool"):
        aux = max(best[name]["aux1"], best[name]["aux2"])
        # Bounds from seeds 0-3 of this job (the test runs seed 0, the tightest): the best aux
        # head beats separate's best head by 0.14 on seed 0, 0.34-0.41 on seeds 1-3 (pool mode
        # 0.08, 0.23-0.29); aux2 beats the main head, which only sees the private labels, by
        # 0.12, 0.30-0.36 (pool 0.07, 0.20-0.29); pool mode (a peer checkpoint every 20 steps)
        # trails the prediction mode's aux2 by 0.06, 0.11-0.14 at this length (the bound was 0.1).
        assert aux > separate + 0.05, best
        assert best[name]["aux2"] >= best[name]["main"] + 0.03, best
    assert abs(best["mhd"]["aux2"] - best["pool"]["aux2"]) < 0.25, best
    # A baseline uses no graph: no hop distances recorded, no table by distance printed.
    separate = read_metrics(tmp_path / "separate" / "metrics.h5")
    assert separate["hop_distances"] is None and "hop_distances" not in separate["eval"]
    assert report_main([str(tmp_path / "separate")]) == 0
    assert "by distance" not in capsys.readouterr().out
    assert "hop_distances" in read_metrics(tmp_path / "mhd" / "metrics.h5")["eval"]
