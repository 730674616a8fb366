"""The training loop of one client, the same for MHD and the baselines (design §1, §3).

Reads top to bottom: set up the run folder, data and client, resume, then per step one training
step (``step.TrainStep``: forward, exchange, MHD losses, SGD), and logging, evaluation and
checkpoints on their schedules. Everything random is derived from (run.seed, purpose, step,
client), so a resumed run takes exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mhd_hpc import topology
from mhd_hpc.checkpointer import Checkpointer
from mhd_hpc.config import ConfigError, JobConfig
from mhd_hpc.data.embedded import build_digits_shards
from mhd_hpc.data.manifest import client_split, content_digest, load_manifest, verify_shards
from mhd_hpc.data.stream_factory import open_stream
from mhd_hpc.devices import (Precision, pick_device, resolve_channels_last,
                             resolve_precision, to_device)
from mhd_hpc.distributed.exchange import ClientExchange
from mhd_hpc.distributed.intra import SingleRank, make_intra
from mhd_hpc.distributed.world import ClientLayout, World
from mhd_hpc.evaluation import evaluate, health_after
from mhd_hpc.losses import aux_head_weight
from mhd_hpc.metrics import MetricsWriter
from mhd_hpc.models import build_model
from mhd_hpc.progress import Interval, Log, Reporter, TensorBoard
from mhd_hpc.run_dir import (RunFolder, claim_run_dir, fingerprint, legacy_fingerprint,
                             schedule_change_note)
from mhd_hpc.schedules import lr_at
from mhd_hpc.seeds import INIT, PRIVATE_ORDER, PUBLIC_ORDER, seed_of
from mhd_hpc.signals import EXIT_RESUMABLE, Fault, StopSignal, die
from mhd_hpc.step import DistillSettings, TrainStep
from mhd_hpc.strategies import make_strategy
from mhd_hpc.targets import LiveTargets, NoTargets, PoolTargets


@dataclass
class Data:
    """The dataset of this run, read once: folder, manifest and this rank's streams."""

    folder: str
    manifest: dict
    private: object
    public: object
    test: object | None  # leaders only evaluate
    backend: str
    probe: object | None = None  # leaders, eval.probe: the labelled public set, whole

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
    if d.dataset == "digits":
        log(f"dataset digits: preparing shards under {d.root} (built once, then reused)")
        folder = build_digits_shards(d.root, k, d.public_fraction, d.label_assignment,
                                     d.labels_per_client, d.skew, cfg.run.seed, d.public_source)
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
    if cfg.exchange.top_k > c:
        return d.root, None, ("exchange.top_k", f"{cfg.exchange.top_k} > the {c} classes of "
                              f"{d.root}")
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
        found = (RunSetup(dataset_dir, manifest,
                          (fingerprint(cfg, digest), legacy_fingerprint(cfg)),
                          folder.old_config, folder.notes) if error is None else None, error)
    setup, error = world.bcast(found)
    if error:
        raise ConfigError(*error)
    for note in setup.notes:
        log(note)
    return setup, folder


def verify_dataset(cfg: JobConfig, world: World, setup: RunSetup, log: Log) -> None:
    """Collective (``data.verify_shards``): every rank hashes its share of the shards."""
    checked, problems = verify_shards(setup.dataset_dir, setup.manifest, world.rank, world.size)
    reports = world.allgather((checked, problems))
    problems = sorted({p for _, found in reports for p in found})
    if problems:
        raise ConfigError("data.verify_shards", f"{len(problems)} shard problem(s) in "
                          f"{setup.dataset_dir}: " + "; ".join(problems[:5]))
    log(f"data.verify_shards: {sum(n for n, _ in reports)} shards match their sha256")


def open_data(cfg: JobConfig, world: World, setup: RunSetup) -> Data:
    """This rank's slice (client-local rank) of its client's streams, and the test stream on
    leaders."""
    folder, manifest = setup.dataset_dir, setup.manifest
    d = cfg.data
    opts = {"backend": d.loader, "part": world.local_rank, "num_parts": world.local_size,
            "threads": d.loader_threads, "manifest": manifest}
    private, backend = open_stream(folder, client_split(world.client), d.batch_size,
                                   seed_of(cfg.run.seed, PRIVATE_ORDER, world.client), "train",
                                   **opts)
    public, _ = open_stream(folder, "public", d.public_batch_size,  # one seed: aligned
                            seed_of(cfg.run.seed, PUBLIC_ORDER), "public", **opts)
    def whole(split: str):  # leaders evaluate on whole splits, in order
        return open_stream(folder, split, 256, 0, "eval", backend=d.loader,
                           threads=d.loader_threads, manifest=manifest)[0]
    test = whole("test") if world.is_leader else None
    probe = whole("public") if world.is_leader and cfg.eval.probe else None
    return Data(folder, manifest, private, public, test, backend, probe)


def make_targets(cfg: JobConfig, world: World, graph_at, build, model,
                 public, num_classes: int, send_embedding: bool, device: torch.device,
                 precision: Precision) -> NoTargets:
    """Where this client's distillation targets come from (``exchange.mode``)."""
    if cfg.method != "mhd" or cfg.topology.kind == "none":
        return NoTargets()
    ex, delta, seed = cfg.exchange, cfg.distill.targets_per_step, cfg.run.seed
    if ex.mode == "pool":
        return PoolTargets(world, graph_at, cfg.client_archs(), build,
                           ex.pool_size or cfg.clients.count, ex.pool_every,
                           ex.pool_transfer_steps, delta, seed, ex.timeout_s, send_embedding,
                           precision)
    exchange = ClientExchange(world, model.num_heads, num_classes, cfg.data.public_batch_size,
                              ex.top_k, model.embedding_dim if send_embedding else 0,
                              ex.timeout_s, device)
    return LiveTargets(world, graph_at, exchange, public, delta, seed, send_embedding)


@dataclass
class Client:
    """This rank's part of the run: model, optimizer, targets, method and the step."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    source: NoTargets
    intra: SingleRank
    strategy: object
    train_step: TrainStep
    graph_at: Callable[[int], list[list[int]]]  # the communication graph of a step
    memory_format: torch.memory_format  # of the images (channels_last or not)


def build_client(cfg: JobConfig, world: World, data: Data, device: torch.device,
                 log: Log) -> Client:
    """Collective (intra-client backends start here): model, optimizer and communication."""
    intra, why = make_intra(cfg.backend.intra, world, device)
    precision, why_precision = resolve_precision(cfg.backend.precision, device)
    layout = (torch.channels_last if resolve_channels_last(cfg.backend.channels_last, device)
              else torch.contiguous_format)
    log(f"{cfg.clients.count} clients on {world.size} ranks (ranks per client "
        f"{cfg.client_ranks()}), method={cfg.method}, device {device.type}, loader "
        f"{data.backend}; {why}; {why_precision}, channels_last "
        f"{layout == torch.channels_last}")
    log(f"{data.private.num_samples} private samples on client 0, {data.public.num_samples} "
        f"public, {data.manifest['counts']['test']} test, {data.num_classes} classes; run "
        f"folder {cfg.run.out_dir}")
    strategy = make_strategy(cfg.method, world, intra, cfg.fedavg.every, cfg.fedmd.revisit_steps)
    torch.manual_seed(seed_of(cfg.run.seed, INIT, 0 if strategy.shared_init else world.client))
    shape = data.manifest["image_shape"]

    def build(arch: str) -> torch.nn.Module:
        return build_model(arch, data.num_classes, cfg.model.aux_heads, shape[0], shape[-1],
                           cfg.model.embedding_dim).to(device, memory_format=layout)

    model = build(cfg.client_archs()[world.client])
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    t = cfg.topology
    graph_at = topology.graph_schedule(t.kind, cfg.clients.count, t.islands, t.edges, t.degree,
                                       t.resample_every, cfg.run.seed)
    nu_emb = cfg.distill.nu_emb if cfg.method == "mhd" else 0.0
    source = make_targets(cfg, world, graph_at, build, model, data.public, data.num_classes,
                          nu_emb > 0, device, precision)
    nu_aux = aux_head_weight(cfg.distill.nu_aux, cfg.model.aux_heads, cfg.distill.aux_weighting)
    distill = DistillSettings(nu_aux, nu_emb, cfg.distill.selection,
                              cfg.distill.skip_less_confident, cfg.distill.warmup_steps,
                              cfg.fedmd.weight)
    step = TrainStep(model, opt, strategy, source, distill, cfg.run.seed, world.client, device,
                     precision)
    return Client(model, opt, source, intra, strategy, step, graph_at, layout)


def evaluate_all(client: Client, data: Data, world: World, device: torch.device,
                 reporter: Reporter | None, step: int) -> None:
    """Collective: every leader evaluates its client; the root records, checks and prints."""
    result = (evaluate(client.model, data.test, data.num_classes, device,
                       client.train_step.precision, client.memory_format, data.probe)
              if world.is_leader else None)
    results = [r for r in world.gather(result) or [] if r is not None]  # one per client
    if reporter is not None:
        reporter.evaluation(step, [a for a, _ in results], [p for _, p in results],
                            topology.hop_distances(client.graph_at(step)))


def log_interval(cfg: JobConfig, world: World, client: Client, interval: Interval,
                 reporter: Reporter | None, step: int) -> None:
    """Collective: gather every rank's interval row; the root records and prints."""
    client.train_step.check_finite(step)
    sent, received, waited = client.source.take_counters()
    row = interval.row(sent + client.strategy.take_bytes(), received, waited,
                       lr_at(step - 1, cfg.optim.lr, cfg.run.steps, cfg.optim.warmup_steps,
                             cfg.optim.schedule))
    rows = world.gather((world.client, row))
    if reporter is not None:
        reporter.train_rows(step, rows)


def resume(cfg: JobConfig, world: World, setup: RunSetup, client: Client, data: Data,
           log: Log) -> tuple[int, Checkpointer, Reporter | None]:
    """Collective: restart every client from the newest step all have intact (or start fresh
    from the leaders' weights), and open the root's metrics from that step on."""
    ckpt = Checkpointer(cfg.run.out_dir, world, cfg.run.keep_checkpoints, setup.fingerprints,
                        cfg.client_archs()[world.client], isinstance(client.source, PoolTargets),
                        client.train_step.precision.name)
    start, notes = ckpt.resume(client.model, client.opt, client.source,
                               client.train_step.scaler)
    notes.append(schedule_change_note(setup.old_config, cfg, start))
    for note in filter(None, notes):
        log(note)
    if start:
        log(f"resuming every client from step {start} ({ckpt.folder})")
    else:  # replicas of a client start from its leader's weights
        client.intra.broadcast_(list(client.model.state_dict().values()))
    if not world.is_root:
        return start, ckpt, None
    heads = client.model.head_names
    metrics = MetricsWriter(Path(cfg.run.out_dir) / "metrics.h5",
                            [f"client{i}" for i in range(cfg.clients.count)], heads,
                            data.label_distribution(), setup.fingerprints[0], start,
                            topology.hop_distances(client.graph_at(start)),
                            setup.fingerprints[1:])
    health_from = (health_after(cfg.run.steps, cfg.eval.health_after, cfg.distill.warmup_steps,
                                cfg.optim.warmup_steps) if cfg.eval.health_check else None)
    tb = (TensorBoard(Path(cfg.run.out_dir) / "tensorboard", start) if cfg.run.tensorboard
          else None)
    return start, ckpt, Reporter(metrics, log, cfg.run.steps, heads, data.label_distribution(),
                                 health_from, start,
                                 cfg.data.batch_size + cfg.data.public_batch_size, tb)


def run(cfg: JobConfig, world: World) -> int:
    """Train this rank's client; returns the process exit code."""
    log = Log(world.is_root)
    world.assign_clients(ClientLayout.contiguous(cfg.client_ranks()))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    stop, fault = StopSignal(), Fault.for_rank(world.rank)

    # -- dataset, run folder (the root checks and claims it), data, client, resume ---------------
    setup, folder = prepare_run(cfg, world, log)  # the root holds the folder's lock till exit
    if cfg.data.verify_shards:
        verify_dataset(cfg, world, setup, log)
    device = pick_device(cfg.backend.device, world.node_local_rank())  # DALI decodes there
    data = open_data(cfg, world, setup)
    client = build_client(cfg, world, data, device, log)
    model, opt = client.model, client.opt
    start, ckpt, reporter = resume(cfg, world, setup, client, data, log)
    if start >= cfg.run.steps:
        log(f"run already complete at step {start}; see python -m mhd_hpc.report "
            f"{cfg.run.out_dir}")
        return finish(client, data, reporter, folder, 0)
    client.strategy.start(model, resumed=start > 0)
    floats = [b for b in model.buffers() if b.is_floating_point()]  # BatchNorm statistics

    # -- the loop -------------------------------------------------------------------------------
    interval = Interval()
    for step in range(start + 1, cfg.run.steps + 1):
        if fault:
            fault.at_step_start(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg.optim.lr, cfg.run.steps, cfg.optim.warmup_steps,
                                cfg.optim.schedule)
        batch, pub = data.private.batch(step), data.public.batch(step)
        images, labels = to_device(batch, device, client.memory_format)
        pub.images, _ = to_device(pub, device, client.memory_format)  # pool peers use it too
        last = step == cfg.run.steps
        logging = step % cfg.run.log_every == 0 or last
        interval.add(client.train_step(step, images, labels, pub,
                                       grad_norms=logging and cfg.eval.grad_norms))

        stopping = False
        if logging:
            log_interval(cfg, world, client, interval, reporter, step)
            # A signal reaches ranks at different steps: agree on one step to stop at.
            stopping = world.max_over_ranks(1.0 if stop.received else 0.0) > 0 and not last
        evaluating = step % cfg.run.eval_every == 0 or last
        saving = step % cfg.run.checkpoint_every == 0 or last or stopping
        # ms/step counts training steps only: leave out what follows, and on a log step also the
        # gather and writes since the log row restarted the interval.
        started = interval.start if logging else time.perf_counter()
        if evaluating or saving:
            client.train_step.check_finite(step)  # never evaluate or save a diverged model
            client.intra.average_(floats)  # replicas' BatchNorm statistics -> their mean
        if evaluating:
            evaluate_all(client, data, world, device, reporter, step)
        if saving:
            client.source.flush(step)  # nothing in flight: the saved pool is this step's pool
            client.intra.check_in_sync(model, step)
            ckpt.save(step, model, opt, client.source, client.train_step.scaler,
                      before_commit=die if fault and fault.in_checkpoint(step) else None)
        interval.exclude(time.perf_counter() - started)
        if stopping:
            world.barrier()
            log(f"stopping at step {step} on signal {stop.received}: checkpoint saved; rerun the "
                f"same command to continue (exit code {EXIT_RESUMABLE})")
            return finish(client, data, reporter, folder, EXIT_RESUMABLE)
    world.barrier()
    for line in reporter.closing_lines() if reporter else []:
        log(line)
    log(f"done: {cfg.run.steps} steps. Report: python -m mhd_hpc.report {cfg.run.out_dir}")
    return finish(client, data, reporter, folder, 0)


def finish(client: Client, data: Data, reporter: Reporter | None, folder: RunFolder | None,
           code: int) -> int:
    """Release what the run holds (loaders, process groups, TensorBoard, the run folder's
    lock) and return the exit code."""
    data.close()
    client.intra.shutdown()
    if reporter:
        reporter.close()
    if folder:
        folder.lock.release()
    return code
