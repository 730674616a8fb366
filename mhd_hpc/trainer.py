"""The training loop of one client, the same for MHD and the baselines (docs/design.md).

Reads top to bottom: set up the run folder, data and client, resume, then per step one training
step (``step.TrainStep``: forward, exchange, MHD losses, SGD), and logging, evaluation and
checkpoints on their schedules. Everything random is derived from (run.seed, purpose, step,
client), so a resumed run takes exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mhd_hpc.method import topology
from mhd_hpc.distributed.codec import top_k_problem
from mhd_hpc.config import ConfigError, JobConfig
from mhd_hpc.data.build.array_shards import PartitionSettings
from mhd_hpc.data.build.builtin import BUILTIN_CLASSES, build_builtin
from mhd_hpc.data.build.sources import DatasetFileError
from mhd_hpc.data.manifest import client_split, content_digest, load_manifest, verify_shards
from mhd_hpc.data.read.stream_factory import open_stream
from mhd_hpc.data.read.streams import BatchStream
from mhd_hpc.runtime.devices import (BatchFeed, Precision, pick_device, resolve_channels_last,
                             resolve_precision)
from mhd_hpc.distributed.exchange import ClientExchange
from mhd_hpc.distributed.intra import IntraBackend, make_intra
from mhd_hpc.distributed.world import ClientLayout, World
from mhd_hpc.run.evaluation import evaluate, health_after
from mhd_hpc.method.losses import aux_head_weight
from mhd_hpc.models import build_model
from mhd_hpc.distributed.p2p import Poller
from mhd_hpc.run.progress import (EVALS_TAG, ROWS_TAG, AsyncRecords, Interval, Log, Recorder,
                              TensorBoard)
from mhd_hpc.run.client_state import ClientState
from mhd_hpc.run.folder import RunFolder, claim_run_dir, fingerprints
from mhd_hpc.run.metrics_file import MetricsWriter
from mhd_hpc.method.schedules import learning_rate, schedule_change_note
from mhd_hpc.runtime.seeds import INIT, PRIVATE_ORDER, PUBLIC_ORDER, seed_of
from mhd_hpc.runtime.signals import EXIT_RESUMABLE, Fault, StopSignal, die
from mhd_hpc.method.step import DistillSettings, TrainStep
from mhd_hpc.method.strategies import Strategy, make_strategy
from mhd_hpc.method.targets import LiveTargets, NoTargets, PoolSettings, PoolTargets, TargetSource


@dataclass
class Data:
    """The dataset of this run, read once: folder, manifest and this rank's streams."""

    folder: str
    manifest: dict
    private: BatchStream
    public: BatchStream
    test: BatchStream | None  # leaders only evaluate
    loader: str  # the loader actually used (data.loader resolved)
    probe: BatchStream | None = None  # leaders, eval.probe: the labelled public set, whole

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def label_distribution(self) -> np.ndarray:
        """(K, C) private label distribution p_i(c) of every client."""
        counts = np.asarray(self.manifest["partition"]["counts"], dtype=np.float64)
        return counts / counts.sum(axis=1, keepdims=True)

    def close(self) -> None:
        for stream in (self.private, self.public, self.test, self.probe):
            if stream is not None:
                stream.close()


def prepare_dataset(cfg: JobConfig, log: Log) -> tuple[str, dict | None, tuple[str, str] | None]:
    """Root only: (dataset folder, its manifest, None), or (path, None, (key, message)) when the
    dataset does not fit the job, so that every rank can stop with the same config error."""
    d, k = cfg.data, cfg.clients.count
    if d.dataset in BUILTIN_CLASSES:
        log(f"dataset {d.dataset}: preparing shards under {d.root} (built once, then reused)")
        partition = PartitionSettings(k, d.public_fraction, d.label_assignment,
                                      d.labels_per_client, d.skew, cfg.run.seed,
                                      d.public_source)
        try:
            folder = build_builtin(d.dataset, d.root, d.source, partition)
        except DatasetFileError as exc:
            return d.root, None, ("data.source", str(exc))
        return folder, load_manifest(folder), None
    try:
        manifest = load_manifest(d.root)
    except (OSError, ValueError) as exc:
        return d.root, None, ("data.root", f"not a dataset folder from tools/make_shards.py: "
                              f"{exc}")
    n, c = manifest["partition"]["num_clients"], manifest["num_classes"]
    if n != k:
        return d.root, None, ("clients.count", f"{d.root} was partitioned for {n} clients, "
                              f"the job has {k}: rebuild the shards with --clients {k} or set "
                              f"clients.count={n}")
    built = manifest.get("public_source", "split")
    if built != d.public_source:
        return d.root, None, ("data.public_source", f"{d.root} was built with public source "
                              f"{built!r}, the job asks for {d.public_source!r}: rebuild with "
                              f"tools/make_shards.py --public-source {d.public_source} or set "
                              f"data.public_source={built}")
    problem = top_k_problem(cfg.exchange.top_k, c)
    if problem:
        return d.root, None, ("exchange.top_k", f"{problem} ({d.root})")
    log(f"dataset {d.root}: {manifest.get('dataset', '?')} shards, {c} classes, partition "
        f"fixed at build time ({manifest['partition'].get('settings', {})})")
    return d.root, manifest, None


@dataclass
class RunSetup:
    """What the root found and decided before training, sent to every rank."""

    dataset_dir: str
    manifest: dict
    fingerprints: tuple[str, ...]  # the run's own first, then older spellings files may carry
    old_config: JobConfig | None  # the config the run started with, when resuming
    notes: list[str]


def prepare_run(cfg: JobConfig, world: World, log: Log) -> tuple[RunSetup, RunFolder | None]:
    """Collective: the root prepares the dataset (reading its manifest, the one read of a run)
    and claims the run folder (lock, checks, then writes) while the others wait in a bcast;
    every rank then stops with the same config error, or gets the setup."""
    found, folder = None, None
    if world.is_root:
        dataset_dir, manifest, error = prepare_dataset(cfg, log)
        if error is None:
            digest = content_digest(manifest)
            folder, problem = claim_run_dir(cfg, digest, manifest["partition"])
            error = ("run.out_dir", problem) if problem else None
        found = (RunSetup(dataset_dir, manifest, fingerprints(cfg, digest), folder.old_config,
                          folder.notes) if error is None else None, error)
    setup, error = world.bcast(found)
    if error:
        raise ConfigError(*error)
    for note in setup.notes:
        log(note)
    return setup, folder


def verify_dataset(world: World, setup: RunSetup, log: Log) -> None:
    """Collective (``data.verify_shards``): every rank hashes its share of the shards."""
    checked, problems = verify_shards(setup.dataset_dir, setup.manifest, world.rank, world.size)
    reports = world.allgather((checked, problems))
    problems = sorted({p for _, found in reports for p in found})
    if problems:
        raise ConfigError("data.verify_shards", f"{len(problems)} shard problem(s) in "
                          f"{setup.dataset_dir}: " + "; ".join(problems[:5]))
    log(f"data.verify_shards: {sum(n for n, _ in reports)} shards match their sha256")


def open_data(cfg: JobConfig, world: World, setup: RunSetup, device: torch.device) -> Data:
    """This rank's slice (client-local rank) of its client's streams, and the test stream on
    leaders."""
    folder, manifest, d = setup.dataset_dir, setup.manifest, cfg.data
    opts = {"loader": d.loader, "threads": d.loader_threads, "manifest": manifest,
            "pin": device.type == "cuda", "prefetch": d.prefetch}
    mine = {"part": world.local_rank, "num_parts": world.local_size, **opts}
    private, loader = open_stream(folder, client_split(world.client), d.batch_size,
                                  seed_of(cfg.run.seed, PRIVATE_ORDER, world.client), "train",
                                  **mine)
    public, _ = open_stream(folder, "public", d.public_batch_size,  # one seed: aligned
                            seed_of(cfg.run.seed, PUBLIC_ORDER), "public", **mine)

    def whole(split: str) -> BatchStream:  # leaders evaluate on whole splits, in order
        return open_stream(folder, split, 256, 0, "eval", **opts)[0]
    test = whole("test") if world.is_leader else None
    probe = whole("public") if world.is_leader and cfg.eval.probe else None
    return Data(folder, manifest, private, public, test, loader, probe)


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


def make_targets(cfg: JobConfig, world: World, strategy: Strategy, graph_at, build, model,
                 data: Data, device: torch.device, precision: Precision) -> TargetSource:
    """Where this client's distillation targets come from (``exchange.mode``)."""
    send_embedding = cfg.distill.nu_emb > 0
    if (not strategy.exchanges_targets or cfg.topology.kind == "none"
            or not (cfg.model.aux_heads or send_embedding)):  # nothing a peer could teach
        return NoTargets()
    ex, delta, seed = cfg.exchange, cfg.distill.targets_per_step, cfg.run.seed
    if ex.mode == "pool":
        settings = PoolSettings(capacity=ex.pool_size or cfg.clients.count, every=ex.pool_every,
                                transfer_steps=ex.pool_transfer_steps, delta=delta, seed=seed,
                                timeout_s=ex.timeout_s, send_embedding=send_embedding,
                                precision=precision, asynchronous=ex.pool_async,
                                max_lead=ex.pool_max_lead)
        return PoolTargets(world, graph_at, cfg.client_archs(), build, settings)
    drop = ex.late_peers == "drop"
    exchange = ClientExchange(world, num_heads=model.num_heads - 1,  # the last head: no target
                              num_classes=data.num_classes,
                              batch_size=cfg.data.public_batch_size, top_k=ex.top_k,
                              embedding_dim=model.embedding_dim if send_embedding else 0,
                              timeout_s=ex.timeout_s, device=device,
                              late_deadline_s=ex.late_deadline_s if drop else None)
    return LiveTargets(world, graph_at, exchange, data.public, delta=delta, seed=seed,
                       send_embedding=send_embedding, drops_late=drop)


def build_client(cfg: JobConfig, world: World, data: Data, device: torch.device,
                 log: Log) -> Client:
    """Collective (intra-client backends start here): model, optimizer and communication."""
    intra, why = make_intra(cfg.backend.intra, world, device)
    precision, why_precision = resolve_precision(cfg.backend.precision, device)
    layout = (torch.channels_last if resolve_channels_last(cfg.backend.channels_last, device)
              else torch.contiguous_format)
    log(f"{cfg.clients.count} clients on {world.size} ranks (ranks per client "
        f"{cfg.client_ranks()}), method={cfg.method}, device {device.type}, loader "
        f"{data.loader}; {why}; {why_precision}, channels_last "
        f"{layout == torch.channels_last}")
    log(f"{data.private.num_samples} private samples on client 0, {data.public.num_samples} "
        f"public, {data.manifest['counts']['test']} test, {data.num_classes} classes; run "
        f"folder {cfg.run.out_dir}")
    strategy = make_strategy(cfg.method, world, intra, total_steps=cfg.run.steps,
                             fedavg_every=cfg.fedavg.every,
                             fedmd_revisit_steps=cfg.fedmd.revisit_steps,
                             fedmd_weight=cfg.fedmd.weight)
    torch.manual_seed(seed_of(cfg.run.seed, INIT, 0 if strategy.shared_init else world.client))
    shape = data.manifest["image_shape"]

    def build(arch: str) -> torch.nn.Module:
        return build_model(arch, data.num_classes, cfg.model.aux_heads, shape[0], shape[-1],
                           cfg.model.embedding_dim).to(device, memory_format=layout)

    model = build(cfg.client_archs()[world.client])
    o, t = cfg.optim, cfg.topology
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    graph_at = topology.graph_schedule(t.kind, cfg.clients.count, islands=t.islands,
                                       edges=t.edges, degree=t.degree,
                                       resample_every=t.resample_every, seed=cfg.run.seed)
    source = make_targets(cfg, world, strategy, graph_at, build, model, data, device, precision)
    dist = cfg.distill
    distill = DistillSettings(
        aux_head_weight=aux_head_weight(dist.nu_aux, cfg.model.aux_heads, dist.aux_weighting),
        nu_emb=dist.nu_emb if strategy.exchanges_targets else 0.0, selection=dist.selection,
        skip_less_confident=dist.skip_less_confident, warmup_steps=dist.warmup_steps)
    step = TrainStep(model, opt, strategy=strategy, source=source, distill=distill,
                     seed=cfg.run.seed, client=world.client, device=device, precision=precision,
                     overlap=cfg.exchange.overlap)
    return Client(model, opt, source, intra, strategy, step, graph_at, layout)


def resume(cfg: JobConfig, world: World, setup: RunSetup, client: Client,
           log: Log) -> tuple[int, ClientState]:
    """Collective: restart every client from the newest step all have intact (or start fresh
    from the leaders' weights)."""
    state = ClientState(cfg.run.out_dir, world, keep=cfg.run.keep_checkpoints,
                        fingerprints=setup.fingerprints, arch=cfg.client_archs()[world.client],
                        with_pool=isinstance(client.source, PoolTargets),
                        precision=client.train_step.precision.name)
    start, notes = state.resume(client.model, client.opt, client.source,
                                client.train_step.scaler)
    o = cfg.optim
    notes.append(schedule_change_note(setup.old_config.run.steps if setup.old_config else None,
                                      cfg.run.steps, start, o.lr, o.warmup_steps, o.schedule))
    for note in filter(None, notes):
        log(note)
    if start:
        log(f"resuming every client from step {start} ({state.folder})")
    else:  # replicas of a client start from its leader's weights
        client.intra.broadcast_(list(client.model.state_dict().values()))
    return start, state


def hops_at(client: Client, step: int) -> np.ndarray | None:
    """Hop distances of the step's graph, for accuracy by distance; None when the client's
    targets do not travel along the graph (baselines, nothing to exchange): no such table."""
    return topology.hop_distances(client.graph_at(step)) if client.source.uses_graph else None


def open_recorder(cfg: JobConfig, setup: RunSetup, client: Client, data: Data, log: Log,
                  start: int) -> Recorder:
    """Root only: the metrics file (rows after ``start`` cut), TensorBoard, and the health
    check's schedule."""
    heads, dist = client.model.head_names, data.label_distribution()
    metrics = MetricsWriter(Path(cfg.run.out_dir) / "metrics.h5",
                            clients=[f"client{i}" for i in range(cfg.clients.count)],
                            heads=heads, label_distribution=dist,
                            fingerprint=setup.fingerprints[0], resume_step=start,
                            hop_distances=hops_at(client, start),
                            accept=setup.fingerprints[1:])
    health_from = (health_after(cfg.run.steps, cfg.eval.health_after, cfg.distill.warmup_steps,
                                cfg.optim.warmup_steps) if cfg.eval.health_check else None)
    tb = (TensorBoard(Path(cfg.run.out_dir) / "tensorboard", start) if cfg.run.tensorboard
          else None)
    return Recorder(metrics, log, total_steps=cfg.run.steps, heads=heads, distribution=dist,
                    health_from=health_from, start_step=start,
                    samples_per_step=cfg.data.batch_size + cfg.data.public_batch_size,
                    tensorboard=tb, one_model=client.strategy.one_model)


@dataclass
class Session:
    """What the loop works with, set up by :func:`run`."""

    cfg: JobConfig
    world: World
    log: Log
    device: torch.device
    data: Data
    client: Client
    state: ClientState
    recorder: Recorder | None  # the root's
    stop: StopSignal
    fault: Fault | None
    records: AsyncRecords | None = None  # the root's, exchange.pool_async

    @property
    def asynchronous(self) -> bool:
        """exchange.pool_async: no collective over all ranks while training."""
        return self.cfg.exchange.pool_async


def evaluate_all(s: Session, step: int) -> None:
    """Collective: every leader evaluates its client; the root records, checks and prints.
    (pool_async: the leaders post their results to the root, which records complete steps.)"""
    client, data = s.client, s.data
    result = (evaluate(client.model, data.test, data.num_classes, s.device,
                       precision=client.train_step.precision,
                       memory_format=client.memory_format, probe_train=data.probe)
              if s.world.is_leader else None)
    if s.asynchronous:
        if result is not None:
            s.world.post_to_root((step, s.world.client, *result), EVALS_TAG)
        collect(s)
        return
    results = [r for r in s.world.gather(result) or [] if r is not None]  # one per client
    if s.recorder is not None:
        s.recorder.evaluation(step, [a for a, _ in results], [p for _, p in results],
                              hops_at(client, step))


def log_interval(s: Session, interval: Interval, step: int, lr: float) -> None:
    """Collective: gather every rank's interval row; the root records and prints."""
    client = s.client
    client.train_step.check_finite(step)
    sent, received, waited = client.source.take_counters()
    row = interval.row(sent + client.strategy.take_bytes(), received, waited, lr)
    if s.asynchronous:
        s.world.post_to_root((step, (s.world.client, row)), ROWS_TAG)
        collect(s)
        return
    rows = s.world.gather((s.world.client, row))
    if s.recorder is not None:
        s.recorder.train_rows(step, rows)


def collect(s: Session, until_complete: bool = False) -> None:
    """Root, pool_async: record what the ranks have posted (at the end: until all is in)."""
    if s.records is None:
        return
    poll = Poller()
    while True:
        s.records.take(s.world.root_collect(ROWS_TAG), s.world.root_collect(EVALS_TAG))
        if not until_complete or s.records.complete:
            return
        poll.pause()


def finish(s: Session) -> None:
    """Collective: settle the messages still in flight (late ones, pool transfers) and, when
    clients ran at their own pace, every post to the root (which records the last steps)."""
    s.client.source.finish()
    if s.asynchronous:
        s.world.settle_posts(s.cfg.exchange.timeout_s)
        collect(s, until_complete=True)


def run(cfg: JobConfig, world: World) -> int:
    """Train this rank's client; returns the process exit code. Whatever happens, the run
    releases what it holds (loaders, the run folder's lock, TensorBoard) on the way out; the
    collective shutdown of the intra-client backend only after a clean end (after an error the
    job is being aborted, and a collective would wait for ranks that are gone)."""
    log = Log(world.is_root)
    world.assign_clients(ClientLayout.contiguous(cfg.client_ranks()))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    stop, fault = StopSignal(), Fault.for_rank(world.rank)
    with contextlib.ExitStack() as held:
        setup, folder = prepare_run(cfg, world, log)  # the root holds the folder's lock
        if folder:
            held.callback(folder.lock.release)
        if cfg.data.verify_shards:
            verify_dataset(world, setup, log)
        device = pick_device(cfg.backend.device, world.node_local_rank())  # DALI decodes there
        data = open_data(cfg, world, setup, device)
        held.callback(data.close)
        client = build_client(cfg, world, data, device, log)
        held.push(lambda failed, *_: None if failed else client.intra.shutdown())
        start, state = resume(cfg, world, setup, client, log)
        if start >= cfg.run.steps:  # nothing to do, and nothing written into the folder
            log(f"run already complete at step {start}; see python -m mhd_hpc.report "
                f"{cfg.run.out_dir}")
            return 0
        if folder:
            folder.lock.announce()
        recorder = open_recorder(cfg, setup, client, data, log, start) if world.is_root else None
        if recorder:
            held.callback(recorder.close)
        session = Session(cfg, world, log, device, data, client, state, recorder, stop, fault)
        if recorder and session.asynchronous:
            session.records = AsyncRecords(recorder, world.size, cfg.clients.count,
                                           lambda step: hops_at(client, step))
        return train(session, start)


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
    cfg, world, client, r = s.cfg, s.world, s.client, s.cfg.run
    model, opt, fault = client.model, client.opt, s.fault
    client.strategy.start(model, resumed=start > 0)
    floats = [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics
    interval = Interval()
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

        stopping = False
        with interval.paused():  # ms/step counts training steps only
            if logging:
                log_interval(s, interval, step, lr(step))
                # A signal reaches ranks at different steps: agree on one step to stop at (at
                # their own pace, a client's ranks agree among themselves).
                got = s.stop.received is not None
                stopping = (world.client_any(got) if s.asynchronous
                            else world.max_over_ranks(1.0 if got else 0.0) > 0) and not last
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
            finish(s)
            world.barrier()
            s.log(f"stopping at step {step} on signal {s.stop.received}: checkpoint saved; "
                  f"rerun the same command to continue (exit code {EXIT_RESUMABLE})")
            return EXIT_RESUMABLE
    finish(s)
    world.barrier()
    for line in s.recorder.closing_lines() if s.recorder else []:
        s.log(line)
    s.log(f"done: {r.steps} steps. Report: python -m mhd_hpc.report {r.out_dir}")
    return 0
