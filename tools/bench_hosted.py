"""Benchmark hosted clients (``clients.per_rank``) against one MPI rank per client.

Usage (from the repository root; CPU, about 5 minutes for the defaults on 2 cores)::

    python tools/bench_hosted.py                                  # 8 clients: -np 8 vs -np 2
    python tools/bench_hosted.py --clients 8 --layouts 8x1 2x4 1x8 --repeats 3 --steps 200
    python tools/bench_hosted.py --clients 64 --layouts 2x32 --steps 50 --repeats 1

Each layout ``RxN`` runs ``jobs/fmnist.yaml`` (Fashion-MNIST, cnn_mnist, 3 aux heads, complete
graph, predictions mode) with ``clients.count`` clients on R ranks hosting N clients each; the
layouts alternate, ``--repeats`` rounds, so that the machine's drift hits all of them alike.
Reported per layout (median over the rounds): client-steps per second in the training loop
(clients x steps between the first and the last log row, over the slowest client's
``train/wall_s`` between them: start-up and the first interval excluded), the whole
command's wall time, and the peak resident memory of all the job's processes together
(sampled every 0.2 s from /proc) and per client. ``--json`` writes every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mhd_hpc.run.metrics_file import read_metrics  # noqa: E402

JOB = str(ROOT / "jobs" / "fmnist.yaml")


def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else "mpirun"


def job_rss_bytes(marker: str) -> int:
    """Resident memory of every process whose command line contains ``marker``."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:  # gone meanwhile
            continue
    return total


def run_layout(job: str, ranks: int, per_rank: int, clients: int, steps: int, log_every: int,
               data_root: str, extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_hosted_{ranks}x{per_rank}_")
    cmd = [mpirun(), "--oversubscribe", "-np", str(ranks), sys.executable, "-m",
           "mhd_hpc.train", job, f"run.out_dir={out}", f"data.root={data_root}",
           f"clients.count={clients}", f"clients.per_rank={per_rank}", f"run.steps={steps}",
           f"run.log_every={log_every}", f"run.eval_every={steps}",
           f"run.checkpoint_every={steps}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, job_rss_bytes(out))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    train = read_metrics(Path(out) / "metrics.h5")["train"]
    step, wall_s = np.asarray(train["step"]), np.asarray(train["wall_s"])
    if wall_s.ndim == 2:  # per client: the slowest client's clock
        wall_s = wall_s.max(axis=1)
    rate = clients * (step[-1] - step[0]) / (wall_s[-1] - wall_s[0])
    return {"layout": f"{ranks}x{per_rank}", "client_steps_per_s": float(rate),
            "command_s": wall, "peak_rss_mb": peak / 2 ** 20,
            "rss_mb_per_client": peak / 2 ** 20 / clients, "out": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=JOB, help="the job file (default jobs/fmnist.yaml)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--layouts", nargs="+", default=["8x1", "2x4"],
                        help="RANKSxCLIENTS_PER_RANK; R x N must equal --clients")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-root", default=str(ROOT / "data"))
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args(argv)
    layouts = [tuple(int(x) for x in spec.split("x")) for spec in args.layouts]
    for r, n in layouts:
        if r * n != args.clients:
            parser.error(f"layout {r}x{n} hosts {r * n} clients, not --clients {args.clients}")
    results: dict[str, list[dict]] = {f"{r}x{n}": [] for r, n in layouts}
    for round_ in range(args.repeats):
        for r, n in layouts:
            got = run_layout(args.job, r, n, args.clients, args.steps, args.log_every, args.data_root,
                             args.overrides)
            results[got["layout"]].append(got)
            print(f"round {round_ + 1}: {got['layout']}: {got['client_steps_per_s']:.1f} "
                  f"client-steps/s, {got['command_s']:.1f} s, {got['peak_rss_mb']:.0f} MB",
                  flush=True)
    base = statistics.median(x["client_steps_per_s"] for x in results[args.layouts[0]])
    print(f"\n{args.clients} clients, {args.steps} steps, {Path(args.job).name} "
          f"{' '.join(args.overrides)}; median of {args.repeats}\n")
    print("| ranks x clients per rank | client-steps/s | vs first | command (s) | "
          "peak RSS (MB) | per client (MB) |")
    print("|---|---|---|---|---|---|")
    for spec, runs in results.items():
        rate = statistics.median(x["client_steps_per_s"] for x in runs)
        print(f"| {spec} | {rate:.1f} | {rate / base:.2f}x | "
              f"{statistics.median(x['command_s'] for x in runs):.1f} | "
              f"{statistics.median(x['peak_rss_mb'] for x in runs):.0f} | "
              f"{statistics.median(x['rss_mb_per_client'] for x in runs):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
