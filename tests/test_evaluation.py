"""Evaluation math (mhd_hpc/run/evaluation.py): accuracies, the health rule, the linear probe."""

import numpy as np

from mhd_hpc.run.evaluation import (accuracy_summary, chance_accuracy, check_health, health_after,
                                linear_probe, per_class_accuracy, pooled_task, prior_entropy,
                                short_run_note)
from mhd_hpc.method.schedules import distill_ramp


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


def test_health_rule_on_hand_made_numbers():
    dist = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(chance_accuracy(dist), [0.5, 0.25])
    np.testing.assert_allclose(prior_entropy(dist), [np.log(2), np.log(4)])
    # Client 0 learns (0.9 > 0.67); client 1 sits at chance with CE at its prior's: fails.
    ok, reasons = check_health(np.array([0.9, 0.3]), dist, np.array([0.1, 1.38]))
    assert ok.tolist() == [True, False]
    assert len(reasons) == 1 and reasons[0].startswith("client 1 is not learning")
    # Low accuracy but a CE far below the prior's is a slow learner, not a failure.
    ok, _ = check_health(np.array([0.9, 0.3]), dist, np.array([0.1, 0.2]))
    assert ok.all()
    # Without a training CE the accuracy alone decides.
    assert check_health(np.array([0.9, 0.3]), dist, None)[0].tolist() == [True, False]


def test_one_model_for_all_clients_is_judged_on_their_pooled_task():
    # Two clients with disjoint labels and one shared model that knows client 0's classes well,
    # client 1's badly: on client 1's own labels it fails, on the union it learns.
    dist = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    acc_main = np.tile([0.95, 0.95, 0.3, 0.3], (2, 1))
    ce = np.array([0.1, 1.0])
    assert check_health(np.array([0.95, 0.3]), dist, ce)[0].tolist() == [True, False]
    beta, union, mean_ce = pooled_task(acc_main, dist, ce)
    np.testing.assert_allclose(beta, [0.625, 0.625])
    np.testing.assert_allclose(union, np.full((2, 4), 0.25))
    np.testing.assert_allclose(mean_ce, [0.55, 0.55])
    assert check_health(beta, union, mean_ce)[0].all()
    # A shared model at chance on the union, with CE at the union prior's, still fails.
    beta, union, mean_ce = pooled_task(np.full((2, 4), 0.25), dist, np.full(2, 1.39))
    assert not check_health(beta, union, mean_ce)[0].any()
    assert pooled_task(acc_main, dist, None)[2] is None


def test_when_the_check_starts_and_the_distillation_ramp():
    assert health_after(600, 0, 100, 0) == 150
    assert health_after(600, 0, 300, 0) == 300
    assert health_after(600, 50, 300, 0) == 50
    assert [distill_ramp(s, 4) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert distill_ramp(1, 0) == 1.0


def test_linear_probe_on_separable_embeddings():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(size=(400, 16))
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], 4) == 1.0
    noise = rng.normal(size=(400, 16))  # labels unrelated to the features: about chance
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], 4) < 0.5


def test_a_run_shorter_than_its_warm_ups_says_so_naming_the_keys_and_steps():
    warmups = {"distill.warmup_steps": 100, "optim.warmup_steps": 0}
    note = short_run_note(60, warmups, health_after(60, 0, 100, 0))
    assert note.startswith("NOTE: this short run (run.steps=60)")
    assert "distill.warmup_steps=100" in note and "optim.warmup_steps" not in note
    assert "first judged step 100" in note and "not judged" in note
    # Only the health check is out of reach (an explicit eval.health_after past the end).
    note = short_run_note(60, {"optim.warmup_steps": 10}, 80)
    assert "warm-up" not in note.split(";")[0] and "first judged step 80" in note
    # The check off: only the warm-ups are named.
    assert "health" not in short_run_note(60, {"optim.warmup_steps": 70}, None)
    assert short_run_note(600, warmups, health_after(600, 0, 100, 0)) is None
    assert short_run_note(100, warmups, 100) is None  # the last step is judged, fully ramped
