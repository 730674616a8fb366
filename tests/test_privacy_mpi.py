"""Differentially private clients (``privacy.*``) under real mpirun: epsilon per client as the
accountant gives it, a budget never exceeded, runs that resume exactly from the client's key,
hosted clients, the BatchNorm refusal on every rank, and the membership audit."""

import json
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_mpi, train_args
from test_hosted_mpi import assert_same_metrics

JOB = ("clients.count=4", "run.steps=30", "run.eval_every=15", "run.log_every=10",
       "run.checkpoint_every=10", "data.public_batch_size=32", "model.norm=group",
       "privacy.enabled=true")
SEEDED = ("privacy.noise_multiplier=1.1", "privacy.randomness=seeded")


def eval_epsilon(run_dir) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        return f["eval/step"][()], f["eval/epsilon"][()]


def private_samples(res: subprocess.CompletedProcess) -> list[int]:
    """The private sample counts the run's log states for its clients (the partition's)."""
    found = re.findall(r"privacy: client (\d+): .*\((\d+) private samples\)", res.stdout)
    return [int(n) for _, n in sorted(found, key=lambda t: int(t[0]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("dp-ref")
    res = run_mpi(4, train_args(run, data_root, *JOB, *SEEDED), timeout=240)
    assert res.returncode == 0, res.stderr
    return run, res


def test_epsilon_per_client_is_the_accountants_for_its_noise_rate_and_steps(reference):
    """Opacus's accountant called here with sigma 1.1, rate 32 / N (N: the client's private
    samples, which the next test checks against the partition) and the evaluated step."""
    from opacus.accountants import RDPAccountant

    from mhd_hpc.privacy.accounting import ALPHAS

    run, res = reference
    counts = private_samples(res)
    steps, eps = eval_epsilon(run)
    assert list(steps) == [15, 30] and eps.shape == (2, 4)
    for i, n in enumerate(counts):
        for row, step in enumerate(steps):
            acc = RDPAccountant()
            acc.history = [(1.1, 32 / n, int(step))]
            assert eps[row, i] == pytest.approx(acc.get_epsilon(delta=1e-5, alphas=ALPHAS),
                                                rel=1e-9)
    assert len(counts) == 4 and sum(counts) > 1000
    assert "| epsilon " in res.stdout and "epsilon per client" in res.stdout
    report = subprocess.run([sys.executable, "-m", "mhd_hpc.report", str(run), "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["epsilon"]["max"] == pytest.approx(eps[-1].max())


def test_the_log_states_the_partitions_private_counts(reference, data_root):
    from mhd_hpc.data.manifest import Manifest, client_split, content_digest

    run, res = reference
    digest = json.loads((run / "dataset.json").read_text())["digest"]
    manifests = [Manifest.read(str(p.parent)) for p in data_root.glob("*/manifest.json")]
    manifest = next(m for m in manifests if content_digest(m.raw) == digest)
    assert private_samples(res) == [manifest.counts[client_split(i)] for i in range(4)]


def test_a_target_epsilon_is_never_exceeded_and_a_spent_budget_stops_the_private_term(
        tmp_path, data_root):
    run = tmp_path / "run"
    res = run_mpi(4, train_args(run, data_root, *JOB, "privacy.noise_multiplier=1.2",
                                "privacy.target_epsilon=3"), timeout=240)
    assert res.returncode == 0, res.stderr
    spent = re.findall(r"privacy: client (\d+) spent its budget .* at step (\d+)", res.stdout)
    # noise 1.2 at rates 0.09-0.11 spends 3 in 15 to 30 steps, by the client's data
    assert 2 <= len(spent) <= 3, res.stdout
    _, eps = eval_epsilon(run)
    assert eps.max() <= 3.0 and eps[-1].max() > 2.7
    with h5py.File(run / "metrics.h5", "r") as f:
        steps, ce = f["train/step"][()], f["train/loss_ce"][()]
    for client, last in spent:  # no private batch after the budget, so no training CE
        assert np.isnan(ce[steps > int(last) + 10, int(client)]).all()
        assert not np.isnan(ce[steps <= int(last), int(client)]).any()


def test_calibrated_noise_spends_the_target_by_the_last_step(tmp_path, data_root):
    run = tmp_path / "run"
    res = run_mpi(2, train_args(run, data_root, *JOB, "privacy.target_epsilon=2",
                                "clients.per_rank=2"), timeout=240)
    assert res.returncode == 0, res.stderr
    assert "calibrated to epsilon 2" in res.stdout and "spent its budget" not in res.stdout
    _, eps = eval_epsilon(run)
    assert (eps <= 2.0).all() and (eps[-1] >= 0.97 * 2.0).all()


def test_hosted_private_clients_learn_what_one_per_rank_learn(tmp_path, data_root, reference):
    run = tmp_path / "hosted"
    res = run_mpi(2, train_args(run, data_root, *JOB, *SEEDED, "clients.per_rank=2"),
                  timeout=240)
    assert res.returncode == 0, res.stderr
    assert_same_metrics(run, reference[0])


def test_kill_9_then_resume_draws_the_same_batches_and_noise_from_the_clients_keys(
        tmp_path, data_root):
    """A run with secret keys; a second run folder given the same key files, killed at step 25
    and resumed from 20, ends identical; a third with other keys differs (the noise and the
    batches come from the keys, not from run.seed)."""
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    res = run_mpi(4, train_args(first, data_root, *JOB, "privacy.noise_multiplier=1.1"),
                  timeout=240)
    assert res.returncode == 0, res.stderr
    keys = sorted((first / "privacy").glob("client_*.key"))
    assert len(keys) == 4
    (second / "privacy").mkdir(parents=True)
    for key in keys:
        shutil.copy2(key, second / "privacy" / key.name)
    args = train_args(second, data_root, *JOB, "privacy.noise_multiplier=1.1")
    res = run_mpi(4, args, env={"MHD_INJECT_FAULT": "2:25:kill"}, timeout=240)
    assert res.returncode != 0
    res = run_mpi(4, args, timeout=240)
    assert res.returncode == 0, res.stderr
    assert "resuming every client from step 20" in res.stdout
    assert_same_metrics(second, first)
    res = run_mpi(4, train_args(third, data_root, *JOB, "privacy.noise_multiplier=1.1"),
                  timeout=240)
    assert res.returncode == 0, res.stderr
    with h5py.File(first / "metrics.h5") as a, h5py.File(third / "metrics.h5") as c:
        assert not np.array_equal(a["train/loss_total"][()], c["train/loss_total"][()])


def test_privacy_with_batch_norm_stops_every_rank_naming_the_key(tmp_path, data_root):
    res = run_mpi(2, train_args(tmp_path / "run", data_root, "clients.count=2",
                                "privacy.enabled=true", "privacy.target_epsilon=4"),
                  timeout=120)
    assert res.returncode == 2
    assert "config error at 'model.norm'" in res.stderr
    assert not (tmp_path / "run").exists()


def test_the_membership_audit_attacks_every_client_through_a_peers_pool(tmp_path, data_root):
    run = tmp_path / "run"
    res = run_mpi(4, train_args(run, data_root, *JOB, *SEEDED, "exchange.mode=pool",
                                "exchange.pool_every=5", "exchange.pool_transfer_steps=2"),
                  timeout=240)
    assert res.returncode == 0, res.stderr
    out = subprocess.run([sys.executable, "-m", "mhd_hpc.cli.audit", str(run), "--json",
                          "--data-root", str(data_root)], capture_output=True, text=True,
                         cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["client"] for r in results] == [0, 1, 2, 3]
    for r in results:
        assert 0.0 <= r["auc"] <= 1.0 and r["members"] > 100
        assert "pool" in r["weights"] and r["step"] % 5 == 0 and 5 <= r["step"] <= 30
    text = subprocess.run([sys.executable, "-m", "mhd_hpc.cli.audit", str(run), "--client",
                           "1", "--weights", "checkpoint", "--data-root", str(data_root)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("client 1: AUC ") and "own checkpoint" in text.stdout
