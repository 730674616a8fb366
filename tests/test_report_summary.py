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
