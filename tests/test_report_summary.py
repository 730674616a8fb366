"""The numbers of an evaluated step (mhd_hpc/report/summary.py): accuracy by graph distance,
the step summary, traffic."""

import numpy as np

from mhd_hpc.method import topology
from mhd_hpc.report.summary import accuracy_by_distance, step_summary, traffic_and_speed


def _metrics(hops):
    k, h = 4, 2
    cross = np.zeros((1, k, h, k))
    for i in range(k):
        for j in range(k):
            d = hops[i, j] if hops is not None else 0
            # head 0: 0.1 per hop; head 1: 0.2 + 0.1 per hop; unreachable (-1): 0.9
            cross[0, i, :, j] = [0.9, 0.9] if d < 0 else [0.1 * d, 0.2 + 0.1 * d]
    ev = {"step": np.array([10]), "beta_sh": np.full((1, k, h), 0.5),
          "beta_priv": np.full((1, k, h), 0.7), "cross_acc": cross}
    if hops is not None:
        ev["hop_distances"] = hops[None]
    return {"clients": [f"client{i}" for i in range(k)], "heads": ["main", "aux1"], "eval": ev,
            "train": {"bytes_sent": np.array([[1e6, 2e6]] * 2),
                      "step_time_s": np.array([[0.01, 0.03]] * 2),
                      "exchange_wait_s": np.array([[0.002, 0.004]] * 2)}}


def test_accuracy_by_hop_distance_on_a_ring_and_on_islands():
    """The transitive-distillation tables (docs/results) rests on this grouping: client i's accuracy
    on client j's task averaged over the pairs j -> i at each hop distance, unreachable last."""
    ring = topology.hop_distances(topology.cycle(4))  # 1, 2 and 3 hops
    rows = accuracy_by_distance(_metrics(ring), 0)
    assert [label for label, _ in rows] == ["1 hop", "2 hops", "3 hops"]
    for d, (_, means) in enumerate(rows, start=1):
        assert np.allclose(means, [0.1 * d, 0.2 + 0.1 * d])
    islands = topology.hop_distances(topology.islands(4, 2))  # 1 hop within, none across
    rows = accuracy_by_distance(_metrics(islands), 0)
    assert [label for label, _ in rows] == ["1 hop", "unreachable"]
    assert np.allclose(rows[1][1], [0.9, 0.9])


def test_no_distance_table_without_a_graph():
    assert accuracy_by_distance(_metrics(None), 0) == []


def test_step_summary_and_traffic():
    m = _metrics(topology.hop_distances(topology.complete(4)))
    s = step_summary(m)
    assert s["step"] == 10 and s["mean"]["aux1"] == {"beta_priv": 0.7, "beta_sh": 0.5}
    t = traffic_and_speed(m)
    assert t["mb_sent"] == 6.0 and abs(t["ms_per_step"] - 20) < 1e-9
    assert abs(t["ms_exchange_wait"] - 3) < 1e-9


def test_health_is_failed_passed_or_not_judged():
    from mhd_hpc.report.summary import health_state

    m = _metrics(None)
    assert health_state(m) == "not judged" and step_summary(m)["health"] == "not judged"
    for rows, state in (([[-1, -1, -1, -1]], "not judged"), ([[1, 1, 1, 1]], "passed"),
                        ([[1, 0, 1, 1]], "failed")):
        m["eval"]["health"] = np.array(rows, dtype=np.int8)
        assert health_state(m) == state and step_summary(m)["health"] == state


def test_a_missing_step_is_named_without_numpy_reprs():
    import pytest

    from mhd_hpc.run.metrics_file import MetricsError

    with pytest.raises(MetricsError) as err:
        step_summary(_metrics(None), 5)
    assert str(err.value) == "no evaluation at step 5; evaluated steps: [10]"


def _write_run(run_dir, health):
    from mhd_hpc.run.metrics_file import MetricsWriter

    dist = np.array([[1.0, 0.0], [0.0, 1.0]])
    w = MetricsWriter(run_dir / "metrics.h5", clients=["client0", "client1"], heads=["main"],
                      label_distribution=dist, fingerprint="f", resume_step=0)
    acc = np.full((2, 1, 2), 0.9)
    w.write_eval(60, {"per_class_acc": acc, "beta_sh": np.full((2, 1), 0.9),
                      "beta_priv": np.full((2, 1), 0.9), "cross_acc": np.full((2, 1, 2), 0.9),
                      "health": np.array(health, dtype=np.int8)})


def test_the_report_shows_a_run_never_judged_as_not_judged(tmp_path, capsys):
    """Not "0 failing", the same as a pass: its own line in the table and its own JSON value."""
    import json

    from mhd_hpc.report import main as report_main

    for health, state in (([-1, -1], "not judged"), ([1, 1], "passed")):
        run = tmp_path / state.replace(" ", "_")
        run.mkdir()
        _write_run(run, health)
        assert report_main([str(run)]) == 0
        assert ("HEALTH NOT JUDGED" in capsys.readouterr().out) == (state == "not judged")
        assert report_main([str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["health"] == state
