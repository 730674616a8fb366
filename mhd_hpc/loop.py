"""The training loop of one client, the same for MHD, the baselines and every exchange mode
(docs/design.md): per step one training step (``method.step.TrainStep``: forward, targets, MHD
losses, SGD), then logging, evaluation and checkpoints on their schedules. How rows reach the
root (in lock-step or at each client's own pace) is the session's ``reports``; the loop does
not branch on the mode.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from mhd_hpc.config import JobConfig
from mhd_hpc.method.schedules import learning_rate
from mhd_hpc.run.client_state import ClientState
from mhd_hpc.run.evaluation import evaluate
from mhd_hpc.run.progress import (Interval, Log, Recorder, restore_open_interval,
                                  save_open_interval)
from mhd_hpc.run.reporting import AsyncReports, LockstepReports
from mhd_hpc.data.read.feed import BatchFeed
from mhd_hpc.runtime.signals import EXIT_RESUMABLE, Fault, StopSignal, die, under_mpirun

if TYPE_CHECKING:
    from mhd_hpc.data.dataset import Data
    from mhd_hpc.distributed.intra import IntraBackend
    from mhd_hpc.distributed.world import StopVote, World
    from mhd_hpc.method.step import TrainStep
    from mhd_hpc.method.strategies import Strategy
    from mhd_hpc.method.targets import TargetSource

__all__ = ["Client", "Session", "train"]


@dataclass
class Client:
    """This rank's part of the run: model, optimizer, targets, method and the step."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    source: TargetSource
    intra: IntraBackend
    strategy: Strategy
    train_step: TrainStep
    graph_at: Callable[[int], list[list[int]]]  # the communication graph of a step
    memory_format: torch.memory_format  # of the images (channels_last or not)


@dataclass
class Session:
    """What the loop works with, put together by :func:`mhd_hpc.trainer.run`."""

    cfg: JobConfig
    world: World
    log: Log
    device: torch.device
    data: Data
    client: Client
    state: ClientState
    reports: LockstepReports | AsyncReports
    recorder: Recorder | None  # the root's
    stop: StopSignal
    fault: Fault | None
    vote: StopVote  # the step all ranks (or, at own pace, a client's ranks) stop at


def train(s: Session, start: int) -> int:
    """The loop, from the step after ``start`` to ``run.steps``; returns the exit code."""
    o, client = s.cfg.optim, s.client
    lr = learning_rate(o.lr, s.cfg.run.steps, o.warmup_steps, o.schedule)
    # Batches on the device one step ahead (read, and on a GPU copied, while a step trains).
    private, public = (BatchFeed(stream, s.device, client.memory_format)
                       for stream in (s.data.private, s.data.public))
    try:
        return _loop(s, start, lr, private, public)
    finally:
        private.close()
        public.close()


def _loop(s: Session, start: int, lr: Callable[[int], float], private_feed: BatchFeed,
          public_feed: BatchFeed) -> int:
    """The steps after ``start``; returns the exit code."""
    cfg, client, r = s.cfg, s.client, s.cfg.run
    model, opt, fault = client.model, client.opt, s.fault
    client.strategy.start(model, resumed=start > 0)
    floats = [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics
    interval = Interval()
    if start:  # a run stopped between log steps takes up that interval
        restore_open_interval(s.cfg.run.out_dir, s.world.rank, start, interval)
    for step in range(start + 1, r.steps + 1):
        if fault:
            fault.at_step_start(step)
        for group in opt.param_groups:
            group["lr"] = lr(step)
        private, public = private_feed.batch(step), public_feed.batch(step)
        last = step == r.steps
        logging = step % r.log_every == 0 or last
        started = time.perf_counter()
        interval.add(client.train_step(step, private, public,
                                       grad_norms=logging and cfg.eval.grad_norms))
        if fault:  # a straggler (MHD_INJECT_FAULT=RANK:STEP:slow:FACTOR) takes longer
            fault.after_step(step, time.perf_counter() - started)

        with interval.paused():  # ms/step counts training steps only
            # A signal reaches ranks at different steps: they agree on one step to stop at.
            signum = s.vote.step(s.stop.received)
            stopping = bool(signum) and not last
            if logging:
                log_interval(s, interval, step, lr(step))
            evaluating = step % r.eval_every == 0 or last
            saving = step % r.checkpoint_every == 0 or last or stopping
            if evaluating or saving:
                client.train_step.check_finite(step)  # never evaluate or save a diverged model
                client.strategy.settle_buffers(floats)  # BatchNorm statistics: the method's
            if evaluating:
                evaluate_all(s, step)
            if saving:
                client.source.flush(step)  # nothing in flight: the saved pool is this step's
                client.intra.check_in_sync(model, step)
                s.state.save(step, model, opt, client.source, client.train_step.scaler,
                             before_commit=die if fault and fault.in_checkpoint(step) else None)
        if stopping:
            if not logging:  # mid-interval: the resumed run completes this interval's row
                save_open_interval(s.cfg.run.out_dir, s.world.rank, step, interval)
            finish(s)
            s.log(f"stopping at step {step} on {signal.Signals(signum).name}: checkpoint saved; "
                  f"rerun the same command to continue (exit code {EXIT_RESUMABLE}: resumable)"
                  + ("; Open MPI's notice that a process exited with non-zero status follows, "
                     "as expected" if under_mpirun() else ""))
            return EXIT_RESUMABLE
    finish(s)
    for line in s.recorder.closing_lines() if s.recorder else []:
        s.log(line)
    s.log(f"done: {r.steps} steps. Report: python -m mhd_hpc.report {r.out_dir}")
    return 0


def log_interval(s: Session, interval: Interval, step: int, lr: float) -> None:
    """Every rank's row of the interval to the root, which records and prints."""
    client = s.client
    client.train_step.check_finite(step)
    sent, received, waited = client.source.take_counters()
    s.reports.train_row(step, interval.row(sent + client.strategy.take_bytes(), received,
                                           waited, lr))


def evaluate_all(s: Session, step: int) -> None:
    """Every leader evaluates its client; the root records, checks and prints."""
    client, data = s.client, s.data
    result = (evaluate(client.model, data.test, data.num_classes, s.device,
                       precision=client.train_step.precision,
                       memory_format=client.memory_format, probe_train=data.probe)
              if s.world.is_leader else None)
    s.reports.evaluation(step, result)


def finish(s: Session) -> None:
    """Collective: settle the messages still in flight (late ones, pool transfers, posts to
    the root, which records the last steps), then meet every rank."""
    s.vote.close()
    s.client.source.finish()
    s.reports.finish()
    s.world.barrier()
