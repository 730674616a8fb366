"""Benchmark clients of different speeds on the digits job: lock-step against the two ways not
to wait (asynchronous pool mode, and dropping late peers), and the overlapped step.

Usage (from the repository root; CPU, about 25 minutes on 2 cores)::

    python tools/bench_stragglers.py                      # all scenarios, seeds 1-3
    python tools/bench_stragglers.py --only slow --seeds 1 --steps 200 --json out.json

Scenarios (4 clients, one MPI rank each, ``jobs/digits.yaml``):

* ``slow``: rank 3 made 3x slower from step 1 (``MHD_INJECT_FAULT=3:1:slow:3``);
* ``hetero``: client 0 a ResNet-18 among cnn_small clients (slower by itself);

each run in pool mode lock-step (``exchange.pool_async=false``) and at the clients' own pace
(``true``; ``--max-lead R`` bounds the fast clients' lead, ``exchange.pool_max_lead=R``).
Reported per scenario, mean over seeds: the fast clients' steps per second (steps
over the wall time of their own loop, ``train/wall_s``) and their last aux head's beta_sh at
the last step, in both modes. Then ``drop``: the ``slow`` scenario in prediction mode with
``exchange.late_peers=drop`` against the same job without the straggler (the fast clients' own
compute) and lock-step (``wait``): the fast clients' step times and how many peers were left
out. And ``overlap``: the default job (no straggler) with ``exchange.overlap`` off and on:
exchange wait per step and the aux heads' beta_sh. Prints markdown tables; ``--json`` writes
every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mhd_hpc.run.metrics_file import read_metrics  # noqa: E402

JOB = str(ROOT / "jobs" / "digits.yaml")
SLOW = "3:1:slow:3"


def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else "mpirun"


def train(out: Path, data: Path, overrides: list[str], fault: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("MHD_INJECT_FAULT", None)
    if fault:
        env["MHD_INJECT_FAULT"] = fault
    cmd = [mpirun(), "--oversubscribe", "-np", "4", sys.executable, "-m", "mhd_hpc.train", JOB,
           f"run.out_dir={out}", f"data.root={data}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return read_metrics(out / "metrics.h5")


def per_client(m: dict) -> dict:
    """Steps per second over each client's own loop, mean step time and exchange wait, the
    last aux head's beta_sh at the last evaluation, peers dropped per step."""
    t, ev = m["train"], m["eval"]
    steps, wall = t["step"], t["wall_s"]  # (T,), (T, K)
    rate = (steps[-1] - steps[0]) / (wall[-1] - wall[0])
    out = {"steps_per_s": rate, "step_ms": 1000 * np.nanmean(t["step_time_s"], axis=0),
           "wait_ms": 1000 * np.nanmean(t["exchange_wait_s"], axis=0),
           "last_aux_sh": ev["beta_sh"][-1][:, -1], "aux_sh_mean": ev["beta_sh"][-1][:, 1:].mean(1)}
    if "dropped_peers" in t:
        out["dropped"] = np.nanmean(t["dropped_peers"], axis=0)
    return out


def scenario(name: str, seeds: list[int], steps: int, work: Path, data: Path,
             max_lead: float = 0.0, modes: tuple[str, ...] = ("lockstep", "async")) -> dict:
    base = [f"run.steps={steps}", f"run.eval_every={steps}", "run.log_every=10",
            f"run.checkpoint_every={steps}", "exchange.mode=pool", "exchange.pool_every=10"]
    fault, fast = (SLOW, [0, 1, 2]) if name == "slow" else (None, [1, 2, 3])
    if name == "hetero":
        base += ["clients.arch=[resnet18, cnn_small, cnn_small, cnn_small]",
                 "model.embedding_dim=64", "optim.lr=0.02", "optim.warmup_steps=50"]
    result: dict = {"fast_clients": fast}
    result["max_lead"] = max_lead
    for mode in modes:
        rows = []
        lead = [f"exchange.pool_max_lead={max_lead}"] if mode == "async" and max_lead else []
        for seed in seeds:
            m = train(work / f"{name}-{mode}-{seed}", data,
                      [*base, f"run.seed={seed}", f"exchange.pool_async={mode == 'async'}",
                       *lead], fault)
            rows.append(per_client(m))
        result[mode] = {
            "fast_steps_per_s": float(np.mean([r["steps_per_s"][fast].mean() for r in rows])),
            "slow_steps_per_s": float(np.mean([np.delete(r["steps_per_s"], fast).mean()
                                               for r in rows])),
            "fast_last_aux_sh": float(np.mean([r["last_aux_sh"][fast].mean() for r in rows])),
            "per_seed_fast_last_aux_sh": [float(r["last_aux_sh"][fast].mean()) for r in rows]}
    if len(modes) < 2:  # one mode alone: its rows, no comparison
        return result
    result["speedup"] = result["async"]["fast_steps_per_s"] / result["lockstep"]["fast_steps_per_s"]
    result["aux_sh_diff"] = result["async"]["fast_last_aux_sh"] - \
        result["lockstep"]["fast_last_aux_sh"]
    return result


def drop(seed: int, steps: int, work: Path, data: Path, deadline: float) -> dict:
    base = [f"run.steps={steps}", f"run.eval_every={steps}", "run.log_every=10",
            f"run.checkpoint_every={steps}", f"run.seed={seed}"]
    own = per_client(train(work / "drop-own", data, base))
    wait = per_client(train(work / "drop-wait", data, base, SLOW))
    dropped = per_client(train(work / "drop-drop", data, [*base, "exchange.late_peers=drop",
                                                          f"exchange.late_deadline_s={deadline}"],
                               SLOW))
    fast = [0, 1, 2]
    return {"deadline_ms": 1000 * deadline,
            "own_step_ms": own["step_ms"][fast].tolist(),
            "wait_step_ms": wait["step_ms"][fast].tolist(),
            "drop_step_ms": dropped["step_ms"][fast].tolist(),
            "drop_wait_ms": dropped["wait_ms"][fast].tolist(),
            "dropped_per_step": dropped["dropped"][fast].tolist(),
            "within_own_plus_deadline": bool(np.all(
                dropped["step_ms"][fast] <= own["step_ms"][fast] + 1000 * deadline)),
            "drop_last_aux_sh": float(dropped["last_aux_sh"][fast].mean()),
            "wait_last_aux_sh": float(wait["last_aux_sh"][fast].mean())}


def overlap(seeds: list[int], work: Path, data: Path) -> dict:
    out = {}
    for on in (False, True):
        rows = [per_client(train(work / f"overlap-{on}-{seed}", data,
                                 [f"run.seed={seed}", "run.log_every=20",
                                  f"exchange.overlap={str(on).lower()}"]))
                for seed in seeds]
        out["on" if on else "off"] = {
            "wait_ms": float(np.mean([r["wait_ms"].mean() for r in rows])),
            "step_ms": float(np.mean([r["step_ms"].mean() for r in rows])),
            "aux_sh": float(np.mean([r["aux_sh_mean"].mean() for r in rows])),
            "last_aux_sh": float(np.mean([r["last_aux_sh"].mean() for r in rows])),
            "per_seed_aux_sh": [float(r["aux_sh_mean"].mean()) for r in rows]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--deadline", type=float, default=0.05, help="exchange.late_deadline_s")
    p.add_argument("--only", choices=("slow", "hetero", "drop", "overlap"), default=None)
    p.add_argument("--max-lead", type=float, default=0.0,
                   help="exchange.pool_max_lead of the asynchronous runs (0: unbounded)")
    p.add_argument("--modes", default="lockstep,async",
                   help="slow/hetero: which of lockstep,async to run (one alone: no comparison)")
    p.add_argument("--data", default=None, help="data.root (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work, data = Path(tmp), Path(args.data or Path(tmp) / "data")
        for name in ("slow", "hetero"):
            if args.only in (None, name):
                results[name] = scenario(name, args.seeds, args.steps, work, data,
                                         args.max_lead, tuple(args.modes.split(",")))
        if args.only in (None, "drop"):
            results["drop"] = drop(args.seeds[0], args.steps, work, data, args.deadline)
        if args.only in (None, "overlap"):
            results["overlap"] = overlap(args.seeds, work, data)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def print_tables(r: dict) -> None:
    if "slow" in r or "hetero" in r:
        print("| scenario | fast clients' steps/s: lock-step | at their own pace | speed-up | "
              "their last aux beta_sh: lock-step | own pace | difference |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in ("slow", "hetero"):
            if name in r and "speedup" not in r[name]:
                for mode in ("lockstep", "async"):
                    if mode in r[name]:
                        m = r[name][mode]
                        print(f"| {name} ({mode}, max_lead {r[name]['max_lead']:g}) | fast "
                              f"clients {m['fast_steps_per_s']:.2f} steps/s, slow "
                              f"{m['slow_steps_per_s']:.2f}; last aux beta_sh "
                              f"{m['fast_last_aux_sh']:.3f} (per seed "
                              f"{np.round(m['per_seed_fast_last_aux_sh'], 3).tolist()}) |")
            elif name in r:
                s = r[name]
                print(f"| {name} | {s['lockstep']['fast_steps_per_s']:.2f} | "
                      f"{s['async']['fast_steps_per_s']:.2f} | {s['speedup']:.2f}x | "
                      f"{s['lockstep']['fast_last_aux_sh']:.3f} | "
                      f"{s['async']['fast_last_aux_sh']:.3f} | {s['aux_sh_diff']:+.3f} |")
    if "drop" in r:
        d = r["drop"]
        print(f"\nlate_peers=drop (deadline {d['deadline_ms']:.0f} ms), fast clients' ms/step: "
              f"own compute {np.round(d['own_step_ms'], 1).tolist()}, waiting for the "
              f"straggler {np.round(d['wait_step_ms'], 1).tolist()}, dropping it "
              f"{np.round(d['drop_step_ms'], 1).tolist()} (peers dropped per step "
              f"{np.round(d['dropped_per_step'], 2).tolist()}); within own + deadline: "
              f"{d['within_own_plus_deadline']}; last aux beta_sh wait {d['wait_last_aux_sh']:.3f}"
              f", drop {d['drop_last_aux_sh']:.3f}")
    if "overlap" in r:
        o = r["overlap"]
        print("\n| exchange.overlap | exchange wait ms/step | ms/step | aux beta_sh (mean of the "
              "aux heads) | last aux beta_sh |\n|---|---:|---:|---:|---:|")
        for k in ("off", "on"):
            print(f"| {k} | {o[k]['wait_ms']:.1f} | {o[k]['step_ms']:.1f} | {o[k]['aux_sh']:.3f} | "
                  f"{o[k]['last_aux_sh']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
