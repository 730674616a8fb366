"""What a run tells its user while it trains: progress lines and the rows of training metrics.

Every rank accumulates its step terms over a log interval (:class:`Interval`); at a log step
the rows are gathered on the root, merged per client (:func:`merge_client_rows`), written to
``metrics.h5`` and summarised in one progress line; evaluations get two lines. Only the root
rank prints (:class:`Log`): one terminal, not K copies.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mhd_hpc.runtime.files import atomic_write_text

__all__ = ["Log", "Interval", "Recorder", "merge_client_rows", "train_line", "eval_lines",
           "run_so_far", "TensorBoard", "save_open_interval",
           "restore_open_interval"]


class Log:
    """Progress lines from the root rank only, stamped with the run's wall-clock seconds: since
    this process started, plus the time the run had trained before it resumed."""

    def __init__(self, is_root: bool):
        self.is_root, self.t0 = is_root, time.time()

    def continue_from(self, seconds: float) -> None:
        """A resumed run: stamps continue from the run's previous wall time (``wall_s``)."""
        self.t0 -= seconds

    def __call__(self, msg: str) -> None:
        if self.is_root:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


class Interval:
    """One rank's step terms and wall time over the current log interval."""

    def __init__(self) -> None:
        self.began = time.perf_counter()  # the loop's start: wall_s of every row counts from it
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside out of the interval's ms/step (logging, evaluations,
        checkpoints): ms/step counts training steps only. When the interval restarts inside
        (a log row), only the part after the restart belongs to the new interval and is left
        out of it."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - max(t0, self.start)

    def add(self, terms: dict) -> None:
        """Accumulate one step's terms: 0-dim tensors stay on their device (no wait), floats
        on the host."""
        for name, value in terms.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1

    def row(self, sent: int, received: int, waited: float, lr: float) -> dict[str, float]:
        """Means over the interval (each term over the steps that reported it, e.g. the
        diagnostics of log steps only) plus traffic and timing; starts the next interval."""
        n = max(self.steps, 1)
        names = list(self.sums)
        tensors = [self.sums[k] for k in names if isinstance(self.sums[k], torch.Tensor)]
        values = iter(torch.stack([t.float() for t in tensors]).tolist()
                      if tensors else [])  # the interval's one read of the device
        sums = {k: next(values) if isinstance(self.sums[k], torch.Tensor) else self.sums[k]
                for k in names}
        row = {name: total / self.counts[name] for name, total in sums.items()}
        now = time.perf_counter()
        row.update(step_time_s=(now - self.start) / n, exchange_wait_s=waited / n,
                   bytes_sent=sent, bytes_received=received, lr=lr, wall_s=now - self.began)
        self.reset()
        return row


def merge_client_rows(rows: list[tuple[int, dict]], num_clients: int) -> list[dict]:
    """Per-rank log rows -> one row per client: means over its ranks, byte counts summed."""
    merged = []
    for client in range(num_clients):
        mine = [r for c, r in rows if c == client]
        names = set().union(*mine)
        merged.append({n: (float(np.nansum([r.get(n, np.nan) for r in mine]))
                           if n.startswith("bytes_") else
                           float(np.nanmean([r.get(n, np.nan) for r in mine]))) for n in names})
    return merged


def run_so_far(metrics: dict) -> tuple[float, float]:
    """A resumed run's (wall seconds, bytes sent by all clients) in its metrics (rows after the
    resumed step already cut): the last row's ``wall_s`` (slowest client) and the sum of
    ``bytes_sent``. Files without ``wall_s``: 0 s."""
    train = metrics["train"]
    wall = train.get("wall_s")
    wall_s = float(np.nanmax(wall[-1])) if wall is not None and len(wall) else 0.0
    sent = train.get("bytes_sent")
    return wall_s, float(np.nansum(sent)) if sent is not None else 0.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60} min"


def train_line(step: int, total: int, per_client: list[dict],
               batch_sizes: tuple[int, int] = (0, 0), eta_s: float | None = None,
               sent_total_bytes: float | None = None) -> str:
    """``step 100/600 | ce 0.3 aux1 0.9 (unweighted) | weighted total 0.7 | 28 ms/step, 1700 +
    1700 samples/s per client (private + public), exchange wait 6 ms | sent 0.19 MB/client this
    interval (12.3 MB total) | ETA 14 s``: loss terms are means over clients and the interval;
    ``batch_sizes``: (private, public) images one client processes per step;
    ``sent_total_bytes``: all clients since the run began (resumes included)."""
    names = sorted(set().union(*per_client))
    mean = {n: float(np.nanmean([r.get(n, np.nan) for r in per_client])) for n in names}
    terms = " ".join(f"{n.removeprefix('loss_')} {mean[n]:.3f}" for n in names
                     if n.startswith("loss_") and n != "loss_total")
    # The total is what the optimizer minimises: the terms weighted (and ramped by the warm-up).
    weighted = (f" | weighted total {mean['loss_total']:.3f}" if "loss_total" in mean else "")
    loss_txt = f"{terms} (unweighted){weighted}" if terms else weighted.removeprefix(" | ")
    private, public = batch_sizes
    rate = (f", {private / mean['step_time_s']:.0f} + {public / mean['step_time_s']:.0f} "
            "samples/s per client (private + public)"
            if private + public and mean["step_time_s"] > 0 else "")
    eta = f" | ETA {_duration(eta_s)}" if eta_s is not None and step < total else ""
    sent = sum(r["bytes_sent"] for r in per_client) / max(len(per_client), 1) / 1e6
    total_txt = (f" ({sent_total_bytes / 1e6:.1f} MB total)" if sent_total_bytes is not None
                 else "")
    return (f"step {step:>6}/{total} | {loss_txt} | {1000 * mean['step_time_s']:.0f} ms/step"
            f"{rate}, exchange wait {1000 * mean['exchange_wait_s']:.0f} ms | "
            f"sent {sent:.2f} MB/client this interval{total_txt}{eta}")


def eval_lines(step: int, summary: dict, heads: list[str]) -> list[str]:
    """Mean beta_sh / beta_priv per head (and the linear probe), and main/last-head beta_sh per
    client."""
    sh, priv = summary["beta_sh"], summary["beta_priv"]
    probe = (f" | linear probe {np.nanmean(summary['probe_acc']):.3f}"
             if "probe_acc" in summary else "")
    if "epsilon" in summary:
        probe += (f" | epsilon per client " + " ".join(f"{e:.2f}" for e in summary["epsilon"]))
    return [f"eval @ {step}: mean over clients  beta_sh " + " ".join(
                f"{h} {sh[:, i].mean():.3f}" for i, h in enumerate(heads))
            + " | beta_priv " + " ".join(f"{h} {priv[:, i].mean():.3f}"
                                         for i, h in enumerate(heads)) + probe,
            f"  per client beta_sh {heads[0]}/{heads[-1]}: " + "  ".join(
                f"c{i} {sh[i, 0]:.2f}/{sh[i, -1]:.2f}" for i in range(sh.shape[0]))]


class TensorBoard:
    """The same rows and evaluations as TensorBoard scalars (``run.tensorboard``): one writer
    (a TensorBoard "run") per client, ``LOG_DIR/client<i>``, and one for the mean over clients,
    ``LOG_DIR/mean``, all with the same tags (``train/<name>``, ``eval/<metric>/<head>``): the
    clients overlay in one chart per tag."""

    def __init__(self, log_dir: str | Path, start_step: int, clients: list[str]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events at or after it: a resumed run has no duplicated steps.
        self.writers = {name: SummaryWriter(str(Path(log_dir) / name),
                                            purge_step=start_step + 1)
                        for name in [*clients, "mean"]}

    def scalars(self, tag: str, step: int, values: np.ndarray, clients: list[str]) -> None:
        """One value per client (each into its writer), and their mean."""
        values = np.asarray(values, dtype=float)
        if not np.isnan(values).all():  # a value no client reported: no point, not NaN
            self.writers["mean"].add_scalar(tag, float(np.nanmean(values)), step)
        for name, v in zip(clients, values):
            self.writers[name].add_scalar(tag, float(v), step)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class Recorder:
    """The root rank's side of a run's output: metric rows into ``metrics.h5`` (and TensorBoard),
    progress and evaluation lines, and the health check of every client at evaluation steps."""

    def __init__(self, metrics, log: Log, *, total_steps: int, heads: list[str],
                 distribution: np.ndarray, health_from: int | None, start_step: int = 0,
                 batch_sizes: tuple[int, int] = (0, 0), tensorboard: TensorBoard | None = None,
                 one_model: bool = False, before: tuple[float, float] = (0.0, 0.0),
                 privacy: list | None = None):
        """``health_from``: the first step the health check judges (None: no check);
        ``one_model``: the method trains one model for all clients, judged on their pooled task;
        ``batch_sizes``: (private, public) images one client processes per step; ``before``:
        a resumed run's wall seconds and bytes sent (all clients) up to ``start_step``, which
        the rows' ``wall_s`` and the progress line's total continue from."""
        self.metrics, self.log, self.total_steps = metrics, log, total_steps
        self.heads, self.distribution, self.health_from = heads, distribution, health_from
        self.clients = [f"client{i}" for i in range(len(distribution))]
        self.train_ce: np.ndarray | None = None  # per client, from the latest log interval
        self.failures: dict[int, list[int]] = {}  # client -> steps at which it failed
        self.start_step, self.batch_sizes, self.tb = start_step, batch_sizes, tensorboard
        self.wall_before_s, self.sent_bytes = before
        self.one_model = one_model
        self.privacy = privacy
        self.last_row_step = start_step
        self.started = time.perf_counter()

    def epsilons(self, step: int) -> np.ndarray | None:
        """epsilon spent by every client at ``step`` (None: not a private run)."""
        return (np.array([b.epsilon_at(step) for b in self.privacy]) if self.privacy
                else None)

    def _budget_lines(self, step: int) -> list[str]:
        """Clients whose privacy budget ran out since the last row."""
        return [f"privacy: client {b.client} spent its budget (epsilon "
                f"{b.epsilon_at(b.private_steps):.3g} of {b.target_epsilon:g} at delta "
                f"{b.delta:g}) at step {b.private_steps}: from step {b.private_steps + 1} it "
                "trains on public distillation only, its private data no longer used"
                for b in self.privacy or []
                if b.target_epsilon and self.last_row_step <= b.private_steps < step]

    def eta_s(self, step: int) -> float:
        """Seconds left at the pace since this process started (eval and checkpoints included)."""
        done = step - self.start_step
        return (time.perf_counter() - self.started) / max(done, 1) * (self.total_steps - step)

    def train_rows(self, step: int, rows: list[tuple[int, dict]]) -> None:
        per_client = merge_client_rows(rows, len(self.distribution))
        for r in per_client:  # the run's wall time, not this process's
            if "wall_s" in r:
                r["wall_s"] += self.wall_before_s
        names = sorted(set().union(*per_client))
        columns = {n: [r.get(n, np.nan) for r in per_client] for n in names}
        eps = self.epsilons(step)
        if eps is not None:
            columns["epsilon"] = list(eps)
        self.metrics.write_train(step, columns)
        self.sent_bytes += float(np.nansum(columns.get("bytes_sent", [0.0])))
        if self.tb:
            for n, values in columns.items():
                self.tb.scalars(f"train/{n}", step, np.asarray(values), self.clients)
            self.tb.flush()
        self.train_ce = np.array([r.get("loss_ce", np.nan) for r in per_client])
        line = train_line(step, self.total_steps, per_client, self.batch_sizes,
                          self.eta_s(step), self.sent_bytes)
        if eps is not None:
            line += f" | epsilon {eps.mean():.2f} (max {eps.max():.2f})"
        self.log(line)
        for note in self._budget_lines(step):
            self.log(note)
        self.last_row_step = step

    def evaluation(self, step: int, accs: list[np.ndarray], probes: list[float | None],
                   hop_distances: np.ndarray | None) -> None:
        """Record one evaluation of every client: per-class accuracies (K of (H, C)), linear
        probe accuracies (None without the probe), and the graph distances at this step."""
        from mhd_hpc.run.evaluation import HEALTH_HINT, accuracy_summary, check_health, pooled_task

        summary = accuracy_summary(np.stack(accs), self.distribution)
        if hop_distances is not None:  # None: the method uses no graph
            summary["hop_distances"] = np.asarray(hop_distances, dtype=np.int64)
        if any(p is not None for p in probes):
            summary["probe_acc"] = np.array([np.nan if p is None else p for p in probes])
        eps = self.epsilons(step)
        if eps is not None:
            summary["epsilon"] = eps
        health = np.full(len(self.distribution), -1, dtype=np.int8)  # -1: not judged yet
        if self.health_from is not None and step >= self.health_from:
            judged = (pooled_task(summary["per_class_acc"][:, 0], self.distribution, self.train_ce)
                      if self.one_model else
                      (summary["beta_priv"][:, 0], self.distribution, self.train_ce))
            ok, reasons = check_health(*judged)
            health = ok.astype(np.int8)
            for i in np.flatnonzero(~ok):
                self.failures.setdefault(int(i), []).append(step)
            for reason in reasons:
                self.log(f"WARNING health at step {step}: {reason}; {HEALTH_HINT}")
        summary["health"] = health
        self.metrics.write_eval(step, summary)
        if self.tb:
            for key in ("beta_sh", "beta_priv"):
                for h, head in enumerate(self.heads):
                    self.tb.scalars(f"eval/{key}/{head}", step, summary[key][:, h], self.clients)
            if "probe_acc" in summary:
                self.tb.scalars("eval/linear_probe", step, summary["probe_acc"], self.clients)
            if eps is not None:
                self.tb.scalars("eval/epsilon", step, eps, self.clients)
            self.tb.flush()
        for line in eval_lines(step, summary, self.heads):
            self.log(line)

    def close(self) -> None:
        if self.tb:
            self.tb.close()

    def closing_lines(self) -> list[str]:
        if not self.failures:
            if self.health_from is None or self.health_from <= self.total_steps:  # judged
                return []
            return [f"NOTE: the health check judged no evaluation of this run (its first judged "
                    f"step is {self.health_from}, the run ends at step {self.total_steps}): its "
                    "health is not judged, which is not a pass"]
        who = ", ".join(f"client {c} (steps {', '.join(map(str, s))})"
                        for c, s in sorted(self.failures.items()))
        return [f"WARNING: {len(self.failures)} client(s) failed the health check: {who}. This "
                "run did not train as intended; do not read its numbers as a result."]


def _open_interval_file(out_dir: str, rank: int, step: int) -> Path:
    return Path(out_dir) / "intervals" / f"step_{step:09d}_rank_{rank:05d}.json"


def save_open_interval(out_dir: str, rank: int, step: int, interval: Interval) -> None:
    """A stop between log steps: this rank's terms of the open log interval, so that the row
    the resumed run writes at the next log step is the one an unbroken run writes (float32
    sums kept exactly: a float64 holds every float32)."""
    path = _open_interval_file(out_dir, rank, step)
    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps({"sums": {k: float(v) for k, v in interval.sums.items()},
                                        "counts": interval.counts, "steps": interval.steps}))


def restore_open_interval(out_dir: str, rank: int, step: int, interval: Interval) -> None:
    """Resuming at ``step`` where the run stopped between log steps: take up its interval."""
    path = _open_interval_file(out_dir, rank, step)
    if path.is_file():
        saved = json.loads(path.read_text())
        interval.sums, interval.counts = saved["sums"], saved["counts"]
        interval.steps = saved["steps"]

