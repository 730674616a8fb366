"""Several runs side by side (``python -m mhd_hpc.report RUN_A RUN_B ...``): the settings that
differ between them, and per run the mean over clients of beta_priv and beta_sh per head, the
bytes sent and the step time, at each run's latest evaluation (a run still training shows its
latest complete one)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mhd_hpc.config import BOOKKEEPING_KEYS, ConfigError, config_from_saved
from mhd_hpc.report.summary import step_summary, traffic_and_speed
from mhd_hpc.run.folder import flatten_keys
from mhd_hpc.run.metrics_file import MetricsError, read_metrics

__all__ = ["load_runs", "comparison", "format_comparison"]



def load_runs(run_dirs: list[str]) -> list[tuple[str, dict, dict]]:
    """(name, metrics, flattened config) per run folder; MetricsError naming a bad one."""
    out = []
    for d in run_dirs:
        metrics = read_metrics(Path(d) / "metrics.h5")
        try:
            config = flatten_keys(config_from_saved(
                yaml.safe_load((Path(d) / "config.yaml").read_text()) or {}).to_dict())
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            raise MetricsError(f"{d}: no readable config.yaml ({exc})") from exc
        out.append((Path(d).name or str(d), metrics, config))
    names = [n for n, _, _ in out]
    if len(set(names)) < len(names):  # e.g. .../mhd/seed0 and .../separate/seed0
        out = [(str(Path(d)), m, c) for d, (_, m, c) in zip(run_dirs, out)]
    return out


def comparison(runs: list[tuple[str, dict, dict]]) -> dict:
    """The JSON shape: ``{"differing": [keys], "runs": [{"run", "settings", "step", "mean":
    {HEAD: {"beta_priv", "beta_sh"}}, "mb_sent", "ms_per_step", "health_failures", "health"}]}``
    (``health``: "failed", "passed" or "not judged")."""
    keys = sorted(set().union(*(c.keys() for _, _, c in runs)))
    differing = [k for k in keys if k not in BOOKKEEPING_KEYS
                 and len({repr(c.get(k)) for _, _, c in runs}) > 1]
    rows = []
    for name, metrics, config in runs:
        summary = step_summary(metrics)
        rows.append({"run": name, "settings": {k: config.get(k) for k in differing},
                     "step": summary["step"], "mean": summary["mean"],
                     **traffic_and_speed(metrics),
                     "health_failures": summary["health_failures"],
                     "health": summary["health"]})
    return {"differing": differing, "runs": rows}


def format_comparison(comp: dict) -> str:
    """A Markdown table: run, the differing settings, then beta_priv / beta_sh per head."""
    heads = list(dict.fromkeys(h for r in comp["runs"] for h in r["mean"]))
    head = (["run"] + comp["differing"] + ["step"]
            + [f"{h} {m}" for h in heads for m in ("priv", "sh")] + ["MB sent", "ms/step"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comp["runs"]:
        cells = [r["run"]] + [str(r["settings"][k]) for k in comp["differing"]] + [str(r["step"])]
        for h in heads:
            v = r["mean"].get(h)
            cells += ([f"{v['beta_priv']:.3f}", f"{v['beta_sh']:.3f}"] if v else ["-", "-"])
        cells += [f"{r['mb_sent']:.1f}", f"{r['ms_per_step']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failing = [f"{r['run']}: {', '.join(r['health_failures'])}" for r in comp["runs"]
               if r["health_failures"]]
    if failing:
        lines += ["", "HEALTH WARNING (clients that failed the health check): " +
                  "; ".join(failing)]
    unjudged = [r["run"] for r in comp["runs"] if r.get("health") == "not judged"]
    if unjudged:
        lines += ["", "HEALTH NOT JUDGED (no evaluation was judged; not a pass): "
                  + ", ".join(unjudged)]
    return "\n".join(lines)
