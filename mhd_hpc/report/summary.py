"""The numbers of one evaluated step of a run, in the shape the report prints and ``--json``
gives; shared by the single-run report, the comparison of runs and the sweep."""

from __future__ import annotations

import numpy as np

from mhd_hpc.run.compat import hop_distances_at
from mhd_hpc.run.metrics_file import MetricsError

__all__ = ["step_summary", "health_failures", "health_state", "HEALTH_STATES",
           "traffic_and_speed", "hops_at", "accuracy_by_distance"]


def step_summary(metrics: dict, step: int | None = None) -> dict:
    """The JSON-shaped summary of one evaluated step (default: the last)."""
    ev = metrics["eval"]
    if not ev or len(ev["step"]) == 0:
        raise MetricsError("the run has no evaluation yet")
    steps = [int(s) for s in ev["step"]]
    if step is None:
        row = len(steps) - 1
    elif step in steps:
        row = steps.index(step)
    else:
        raise MetricsError(f"no evaluation at step {step}; evaluated steps: {steps}")
    heads = metrics["heads"]
    priv, sh = ev["beta_priv"][row], ev["beta_sh"][row]  # (K, H)
    out = {"step": int(steps[row]), "clients": {}, "mean": {}}
    for i, name in enumerate(metrics["clients"]):
        out["clients"][name] = {"heads": {h: {"beta_priv": float(priv[i, j]),
                                              "beta_sh": float(sh[i, j])}
                                          for j, h in enumerate(heads)}}
    for j, h in enumerate(heads):
        out["mean"][h] = {"beta_priv": float(priv[:, j].mean()), "beta_sh": float(sh[:, j].mean())}
    out["health_failures"] = health_failures(metrics, row)
    out["health"] = health_state(metrics, row)
    if "probe_acc" in ev:  # the linear probe on the frozen embedding (an oracle upper bound)
        probe = ev["probe_acc"][row]
        out["linear_probe"] = {"clients": {name: float(probe[i])
                                           for i, name in enumerate(metrics["clients"])},
                               "mean": float(np.nanmean(probe))}
    if "epsilon" in ev:  # privacy.enabled: the budget each client has spent by this step
        eps = ev["epsilon"][row]
        out["epsilon"] = {"clients": {name: float(eps[i])
                                      for i, name in enumerate(metrics["clients"])},
                          "max": float(np.max(eps))}
    return out


def health_failures(metrics: dict, upto_row: int | None = None) -> dict[str, list[int]]:
    """Client name -> the evaluated steps (up to ``upto_row``) at which it failed the health
    check (``eval/health`` == 0); empty when every judged client learned."""
    ev = metrics["eval"]
    if "health" not in ev:
        return {}
    rows = slice(None, None if upto_row is None else upto_row + 1)
    health, steps = ev["health"][rows], ev["step"][rows]
    return {name: [int(s) for s in steps[health[:, i] == 0]]
            for i, name in enumerate(metrics["clients"]) if (health[:, i] == 0).any()}


#: A run's health: some client failed the check; every judged evaluation passed; or the check
#: judged none (a run that ended before its first judged step, the check off, or an old file).
HEALTH_STATES = ("failed", "passed", "not judged")


def health_state(metrics: dict, upto_row: int | None = None) -> str:
    """One of :data:`HEALTH_STATES` over the evaluations up to ``upto_row``: "not judged" is
    not a pass (``eval/health`` is -1 where the check did not judge)."""
    ev = metrics["eval"]
    if health_failures(metrics, upto_row):
        return "failed"
    if "health" not in ev:
        return "not judged"
    rows = slice(None, None if upto_row is None else upto_row + 1)
    return "passed" if (ev["health"][rows] == 1).any() else "not judged"


def traffic_and_speed(metrics: dict) -> dict[str, float]:
    """The whole run's MB sent by all clients, its mean ms per training step and the mean ms
    per step spent waiting for peers."""
    train = metrics["train"]
    return {"mb_sent": float(np.nansum(train.get("bytes_sent", [0.0]))) / 1e6,
            "ms_per_step": 1000 * float(np.nanmean(train.get("step_time_s", [np.nan]))),
            "ms_exchange_wait": 1000 * float(np.nanmean(train.get("exchange_wait_s",
                                                                  [np.nan])))}


def hops_at(metrics: dict, row: int) -> np.ndarray | None:
    """Hop distances (K, K) of the graph of evaluation ``row`` (it may change during a run);
    files from before per-step graphs: the run's one graph (``run.compat``)."""
    return hop_distances_at(metrics, row)


def accuracy_by_distance(metrics: dict, row: int) -> list[tuple[str, list[float]]]:
    """(distance label, per head: the mean accuracy of client i's head on client j's task over
    the pairs j -> i at that distance), nearest first and "unreachable" last; empty without a
    graph or cross-client accuracies."""
    ev = metrics["eval"]
    hops = hops_at(metrics, row)
    if hops is None or "cross_acc" not in ev:
        return []
    cross = ev["cross_acc"][row]  # (K, H, K)
    off = ~np.eye(cross.shape[0], dtype=bool)
    distances = sorted({int(d) for d in hops[off]}, key=lambda d: (d < 0, d))
    return [("unreachable" if d < 0 else f"{d} hop" + ("s" if d > 1 else ""),
             [float(cross[:, j, :][off & (hops == d)].mean()) for j in range(cross.shape[1])])
            for d in distances]
