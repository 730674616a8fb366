"""Robustness benchmark (issue 8): does MHD train with its defaults on every aux-head count,
topology and seed? Runs jobs/paper/robustness.yaml (digits job; aux heads 1-4 x complete, cycle,
islands x 5 seeds, plus `separate` per seed) through the sweep runner and prints, per setting:

    main beta_priv     mean and worst over seeds (each run: mean over clients)
    last aux beta_sh   mean and worst over seeds
    gain               last aux beta_sh minus `separate`'s main beta_sh of the same seed (worst)
    health             runs in which a client failed the health check

Usage::

    python tools/bench_robustness.py [--sweep jobs/paper/robustness.yaml] [--json out.json]

Finished runs are reused (the sweep skips them): rerunning prints the table without training.
About 65 runs of ~30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

try:
    from mhd_hpc import sweep
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mhd_hpc import sweep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import default_launcher  # noqa: E402  (tools/sweep.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table(rows: list[dict]) -> tuple[str, list[dict]]:
    """The benchmark's table and its rows as dicts (for --json)."""
    separate = {r["seed"]: r["main/beta_sh"] for r in rows if r["setting"] == "separate"}
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows if r["setting"] != "separate"):
        mine = [r for r in rows if r["setting"] == setting]
        priv = np.array([r["main/beta_priv"] for r in mine])
        last = np.array([r["last/beta_sh"] for r in mine])
        gain = np.array([r["last/beta_sh"] - separate[r["seed"]] for r in mine
                         if r["seed"] in separate])
        out.append({"setting": setting, "seeds": [r["seed"] for r in mine],
                    "main_priv_mean": float(priv.mean()), "main_priv_worst": float(priv.min()),
                    "last_sh_mean": float(last.mean()), "last_sh_worst": float(last.min()),
                    "gain_worst": float(gain.min()) if gain.size else None,
                    "health_failed_runs": int(sum(r["health_failed"] for r in mine))})
    lines = ["| setting | seeds | main beta_priv mean | worst | last aux beta_sh mean | worst "
             "| gain over separate (worst) | runs failing health |",
             "|---|---|---|---|---|---|---|---|"]
    for e in out:
        gain = "-" if e["gain_worst"] is None else f"{e['gain_worst']:+.3f}"
        lines.append(f"| {e['setting']} | {len(e['seeds'])} | {e['main_priv_mean']:.3f} | "
                     f"{e['main_priv_worst']:.3f} | {e['last_sh_mean']:.3f} | "
                     f"{e['last_sh_worst']:.3f} | {gain} | {e['health_failed_runs']} |")
    sep = np.array(list(separate.values()))
    if sep.size:
        lines.append(f"\n`separate` main beta_sh over the same seeds: mean {sep.mean():.3f}, "
                     f"min {sep.min():.3f}, max {sep.max():.3f}")
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=os.path.join(ROOT, "jobs", "paper", "robustness.yaml"))
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--table", action="store_true", help="only tabulate finished runs")
    args = p.parse_args(argv)
    spec = sweep.load_sweep(args.sweep)
    runs = sweep.plan(spec)
    if not args.table:
        sweep.run_pending(spec, runs, default_launcher(), log=lambda m: print(m, flush=True))
    rows = sweep.collect(runs)
    text, out = table(rows)
    print(text)
    print(f"\n{len(rows)}/{len(runs)} runs finished ({spec.out_dir})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if len(rows) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
