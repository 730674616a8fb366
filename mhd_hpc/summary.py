"""The numbers of one evaluated step of a run, in the shape the report prints and ``--json``
gives; shared by the single-run report, the comparison of runs and the sweep."""

from __future__ import annotations

import numpy as np

from mhd_hpc.metrics import MetricsError

__all__ = ["summary_at", "health_failures"]


def summary_at(metrics: dict, step: int | None = None) -> dict:
    """The JSON-shaped summary of one evaluated step (default: the last)."""
    ev = metrics["eval"]
    if not ev or len(ev["step"]) == 0:
        raise MetricsError("the run has no evaluation yet")
    steps = list(ev["step"])
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
    if "probe_acc" in ev:  # the linear probe on the frozen embedding (an oracle upper bound)
        probe = ev["probe_acc"][row]
        out["linear_probe"] = {"clients": {name: float(probe[i])
                                           for i, name in enumerate(metrics["clients"])},
                               "mean": float(np.nanmean(probe))}
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
