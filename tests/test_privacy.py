"""Differential privacy without MPI: the per-sample clipped, noised gradient against autograd
one sample at a time, the accounting against Opacus called directly, Poisson sampling, the
client keys, GroupNorm models, the config rules, and the membership-inference statistics."""

import os
import stat

import numpy as np
import pytest
import torch

from mhd_hpc.config import ConfigError, load_config
from mhd_hpc.data.read.batches import PoissonBatches
from mhd_hpc.job import check_job
from mhd_hpc.models import build_model
from mhd_hpc.models.norms import batch_norm_modules, group_count
from mhd_hpc.privacy import accounting
from mhd_hpc.cli.audit import balanced_split, roc_auc, tpr_at_fpr
from mhd_hpc.privacy.dp_sgd import PrivateGradient, private_parameter_names
from mhd_hpc.privacy.secret import client_key, key_path

CPU = torch.device("cpu")


def model_and_batch(n: int = 6):
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 2, 1, 8, 0, "group")
    return model, torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


def per_sample_reference(model, x, y, clip: float) -> dict[str, torch.Tensor]:
    """Sum over samples of each sample's gradient (autograd, one at a time) scaled to norm
    at most ``clip``."""
    names = private_parameter_names(model)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        _, logits = model(x[i:i + 1])
        torch.nn.functional.cross_entropy(logits[0], y[i:i + 1]).backward()
        g = {n: params[n].grad.clone() for n in names}
        norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
        for n in names:
            total[n] += g[n] * min(1.0, clip / (float(norm) + 1e-6))
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("clip", [1e9, 0.5])
def test_the_private_gradient_is_the_sum_of_clipped_per_sample_gradients(clip):
    model, x, y = model_and_batch()
    expected = per_sample_reference(model, x, y, clip)
    dp = PrivateGradient(model, clip_norm=clip, noise_multiplier=0.0, expected_batch=4.0,
                         key=1, device=CPU, chunk=4)  # chunks of 4 and 2
    terms = dp(1, x, y)
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name] / 4.0, rtol=1e-4, atol=1e-6)
        else:  # the aux heads: this term does not reach them
            assert name.startswith("heads.aux") and param.grad is None
    assert terms["dp_batch"] == 6.0
    assert float(terms["dp_clipped"]) == (1.0 if clip == 0.5 else 0.0)


def test_the_noise_has_the_promised_scale_and_comes_from_the_key_and_step():
    model, x, y = model_and_batch(0)
    dp = PrivateGradient(model, clip_norm=2.0, noise_multiplier=1.5, expected_batch=10.0,
                         key=7, device=CPU)
    terms = dp(3, x, y)  # an empty Poisson batch: noise only
    assert "loss_ce" not in terms and terms["dp_batch"] == 0.0
    first = torch.cat([p.grad.flatten() for p in dp.params])
    assert first.numel() > 20000
    assert abs(float(first.std()) - 1.5 * 2.0 / 10.0) < 0.01
    assert abs(float(first.mean())) < 0.005
    dp(3, x, y)
    assert torch.equal(torch.cat([p.grad.flatten() for p in dp.params]), first)
    dp(4, x, y)
    assert not torch.equal(torch.cat([p.grad.flatten() for p in dp.params]), first)
    other = PrivateGradient(model, clip_norm=2.0, noise_multiplier=1.5, expected_batch=10.0,
                            key=8, device=CPU)
    other(3, x, y)
    assert not torch.equal(torch.cat([p.grad.flatten() for p in other.params]), first)


def test_epsilon_is_opacus_rdp_accountant_called_directly():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.1, 0.01, 500)]
    direct = acc.get_epsilon(delta=1e-5, alphas=accounting.ALPHAS)
    assert accounting.epsilon(1.1, 0.01, 500, 1e-5) == pytest.approx(direct, rel=1e-12)
    assert accounting.epsilon(1.1, 0.01, 0, 1e-5) == 0.0
    assert accounting.epsilon(1.1, 0.01, 1000, 1e-5) > direct


def test_calibration_spends_at_most_the_target_and_nearly_all_of_it():
    sigma = accounting.calibrate(4.0, 1e-5, 32 / 7000, 2000)
    eps = accounting.epsilon(sigma, 32 / 7000, 2000, 1e-5)
    assert 0.97 * 4.0 <= eps <= 4.0


def test_a_fixed_noise_stops_at_the_last_step_within_the_budget():
    n = accounting.steps_within(2.0, 0.8, 0.01, 1e-5, upto=5000)
    assert 0 < n < 5000
    assert accounting.epsilon(0.8, 0.01, n, 1e-5) <= 2.0 < accounting.epsilon(0.8, 0.01, n + 1,
                                                                               1e-5)


def test_the_plan_per_client_and_its_errors():
    budgets = accounting.plan([7000, 3000], 32, 1000, noise_multiplier=0.0, target_epsilon=4.0,
                              delta=1e-5)
    assert [b.client for b in budgets] == [0, 1]
    assert budgets[1].sample_rate == pytest.approx(32 / 3000)
    assert budgets[1].noise_multiplier > budgets[0].noise_multiplier  # less data, more noise
    assert all(b.calibrated and b.private_steps == 1000 for b in budgets)
    assert all(b.epsilon_at(1000) <= 4.0 for b in budgets)
    assert budgets[0].epsilon_at(5000) == budgets[0].epsilon_at(1000)  # no private step after
    with pytest.raises(ValueError, match="client 1 has 20 private samples"):
        accounting.plan([100, 20], 32, 10, noise_multiplier=1.0, target_epsilon=0, delta=1e-5)
    with pytest.raises(ValueError, match="one step at noise_multiplier 0.5 .* already spends"):
        accounting.plan([300], 32, 10, noise_multiplier=0.5, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="privacy.delta=0.01 is not below 1 / 200"):
        accounting.plan([200], 32, 10, noise_multiplier=1.0, target_epsilon=0, delta=0.01)


def test_poisson_batches_are_a_function_of_seed_and_step_with_the_expected_size():
    order = PoissonBatches(5000, 0.01, seed=3)
    assert np.array_equal(order.indices(17), PoissonBatches(5000, 0.01, 3).indices(17))
    sizes = [len(order.indices(s)) for s in range(400)]
    assert abs(np.mean(sizes) - 50) < 2.5 and np.std(sizes) > 4  # binomial(5000, 0.01)
    assert max(sizes) <= order.max_rows
    assert not np.array_equal(order.indices(1), order.indices(2))
    with pytest.raises(ValueError, match="rate"):
        PoissonBatches(10, 1.5, 0)


def test_a_client_key_is_drawn_once_kept_private_and_read_back(tmp_path):
    key, note = client_key(tmp_path, 3, "secret", run_seed=0)
    assert note and "never sent" in note
    path = key_path(tmp_path, 3)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert client_key(tmp_path, 3, "secret", run_seed=0) == (key, None)
    assert client_key(tmp_path, 4, "secret", run_seed=0)[0] != key
    seeded = client_key(tmp_path, 3, "seeded", run_seed=5)[0]
    assert seeded == client_key(tmp_path / "other", 3, "seeded", run_seed=5)[0] != key
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="not a key written by mhd_hpc"):
        client_key(tmp_path, 3, "secret", run_seed=0)


@pytest.mark.parametrize("arch", ["cnn_small", "cnn_mnist", "resnet18", "resnet50"])
def test_group_norm_models_have_no_batch_statistics(arch):
    size = 28 if arch == "cnn_mnist" else 16
    model = build_model(arch, 10, 1, 3, size, 0, "group")
    assert batch_norm_modules(model) == []
    assert batch_norm_modules(build_model(arch, 10, 1, 3, size, 0, "batch"))
    emb, logits = model(torch.randn(2, 3, size, size))
    assert emb.shape[0] == 2 and len(logits) == 2
    # one sample's output does not depend on the others in the batch (train mode)
    x = torch.randn(3, 3, size, size)
    torch.testing.assert_close(model(x)[1][0][:1], model(x[:1])[1][0], rtol=1e-4, atol=1e-5)


def test_group_counts():
    assert [group_count(c) for c in (16, 32, 64, 128, 2048, 6)] == [4, 8, 16, 32, 32, 1]


DP = ["privacy.enabled=true", "privacy.target_epsilon=4"]


@pytest.mark.parametrize("overrides,key", [
    (DP, "model.norm"),
    (DP[:1] + ["model.norm=group"], "privacy.noise_multiplier"),
    (DP + ["model.norm=group", "method=fedavg"], "privacy.enabled"),
    (DP + ["model.norm=group", "clients.ranks_per_client=2"], "privacy.enabled"),
    (DP + ["model.norm=group", "data.loader=dali"], "data.loader"),
    (DP + ["model.norm=group", "backend.precision=fp16"], "backend.precision"),
    (DP + ["model.norm=group", "eval.grad_norms=true"], "eval.grad_norms"),
    (DP + ["model.norm=group", "data.public_source=all"], "data.public_source"),
    (["privacy.delta=1.5"], "privacy.delta"),
    (["model.norm=layer"], "model.norm"),
    (["privacy.randomness=os"], "privacy.randomness"),
])
def test_privacy_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key


def test_a_plug_in_backbone_with_batch_norm_is_refused_under_privacy(tmp_path, monkeypatch):
    (tmp_path / "bn_plugin.py").write_text(
        "import torch\n"
        "def net(c, s):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(c, 8, 3), torch.nn.BatchNorm2d(8),\n"
        "                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["clients.arch=bn_plugin:net", "model.norm=group", *DP])
    with pytest.raises(ConfigError) as err:
        check_job(cfg)
    assert err.value.key == "clients.arch" and "BatchNorm" in err.value.message


def test_attack_statistics():
    rng = np.random.default_rng(0)
    same = rng.normal(size=2000)
    assert abs(roc_auc(same[:1000], same[1000:]) - 0.5) < 0.04
    assert roc_auc(np.ones(5), np.zeros(5)) == 1.0
    assert roc_auc(np.zeros(4), np.zeros(4)) == 0.5  # ties count half
    assert tpr_at_fpr(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000)) > 0.5
    assert tpr_at_fpr(same[:1000], same[1000:]) < 0.03
    ours, others = np.array([0, 0, 0, 1, 2]), np.array([0, 1, 1, 1, 3])
    mine, theirs = balanced_split(ours, others, seed=0)
    assert len(mine) == len(theirs) == 2 and 3 in mine and 0 in theirs  # labels 0 and 1 once
    assert sorted(ours[mine].tolist()) == sorted(others[theirs].tolist()) == [0, 1]


def test_a_resumed_run_keeps_its_noise_and_its_budget():
    """run.steps raised on resume: calibrated noise stays the first start's (chosen for 500
    steps), so the budget is spent after about 500 private steps of the 800; a fixed noise with a
    target may use every step its budget allows."""
    first = accounting.plan([7000], 32, 500, noise_multiplier=0.0, target_epsilon=2.0,
                            delta=1e-5)[0]
    resumed = accounting.plan([7000], 32, 800, noise_multiplier=0.0, target_epsilon=2.0,
                              delta=1e-5, calibration_steps=500)[0]
    assert resumed.noise_multiplier == first.noise_multiplier
    assert 500 <= resumed.private_steps < 560 and resumed.epsilon_at(800) <= 2.0
    fixed = accounting.plan([7000], 32, 800, noise_multiplier=0.9, target_epsilon=2.0,
                            delta=1e-5, calibration_steps=500)[0]
    assert fixed.private_steps == accounting.steps_within(2.0, 0.9, 32 / 7000, 1e-5, 800)
