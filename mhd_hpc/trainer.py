"""The composition root of a run (docs/design.md): the run folder, the dataset, this rank's
client (model, optimizer, method, targets, step), its resumed state and the root's recorder,
put together once and handed to the loop (:mod:`mhd_hpc.loop`).

Reads top to bottom: :func:`run` prepares the run on the root (dataset, run folder) and tells
every rank, opens this rank's data, builds the client, resumes it, then trains. Everything
random is derived from (run.seed, purpose, step, client), so a resumed run takes exactly the
steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mhd_hpc.config import ConfigError, JobConfig
from mhd_hpc.data.build.builtin import BUILTIN_CLASSES
from mhd_hpc.data.dataset import Data, find_dataset, open_data
from mhd_hpc.data.manifest import Manifest, client_split, content_digest, verify_shards
from mhd_hpc.distributed.codec import top_k_problem
from mhd_hpc.distributed.exchange import ClientExchange
from mhd_hpc.distributed.intra import make_intra
from mhd_hpc.distributed.world import ClientLayout, World
from mhd_hpc.job import check_models
from mhd_hpc.loop import Client, Session, train
from mhd_hpc.method import topology
from mhd_hpc.method.losses import aux_head_weight
from mhd_hpc.method.pool_targets import (AsyncPoolTargets, PoolSettings, PoolTargets,
                                         make_pool_targets)
from mhd_hpc.method.schedules import schedule_change_note
from mhd_hpc.method.step import DistillSettings, TrainStep
from mhd_hpc.method.strategies import Strategy, make_strategy
from mhd_hpc.method.targets import LiveTargets, NoTargets, TargetSource
from mhd_hpc.models import build_model
from mhd_hpc.run.client_state import ClientState
from mhd_hpc.run.evaluation import health_after, short_run_note
from mhd_hpc.run.folder import RunFolder, claim_run_dir, fingerprints
from mhd_hpc.run.metrics_file import MetricsWriter, read_metrics
from mhd_hpc.run.progress import Log, Recorder, TensorBoard, run_so_far
from mhd_hpc.run.reporting import make_reports
from mhd_hpc.runtime.devices import (Placement, Precision, place, resolve_channels_last,
                                     resolve_precision, usable_cpus)
from mhd_hpc.privacy.accounting import ClientBudget, plan
from mhd_hpc.privacy.dp_sgd import PrivateGradient
from mhd_hpc.privacy.secret import client_key
from mhd_hpc.runtime.seeds import DP, DP_SAMPLING, INIT, seed_of
from mhd_hpc.runtime.signals import EXIT_CONFIG, Fault, StopSignal


@dataclass
class RunSetup:
    """What the root found and decided before training, sent to every rank."""

    dataset_dir: str
    manifest: Manifest
    fingerprints: tuple[str, ...]  # the run's own first, then older spellings files may carry
    old_config: JobConfig | None  # the config the run started with, when resuming
    notes: list[str]
    privacy: list[ClientBudget] | None = None  # privacy.enabled: every client's budget


def prepare_run(cfg: JobConfig, world: World, log: Log) -> tuple[RunSetup, RunFolder | None]:
    """Collective: the root prepares the dataset (reading its manifest, the one read of a run)
    and claims the run folder (lock, checks, then writes) while the others wait in a bcast;
    every rank then stops with the same config error, or gets the setup."""
    found, folder = None, None
    if world.is_root:
        dataset_dir, manifest, error = find_dataset(cfg.data, cfg.clients.count, cfg.run.seed,
                                                    log)
        if error is None and cfg.data.dataset not in BUILTIN_CLASSES:  # its classes known now
            problem = top_k_problem(cfg.exchange.top_k, manifest.num_classes)
            error = ("exchange.top_k", f"{problem} ({dataset_dir})") if problem else None
            if error is None:  # and its image shape: plug-in backbones are tried on it
                try:
                    check_models(cfg, manifest.image_shape)
                except ConfigError as exc:
                    error = (exc.key, exc.message)
        budgets = None
        if error is None and cfg.privacy.enabled:  # before the folder is claimed
            budgets, error = privacy_plan(cfg, manifest)
        if error is None:
            digest = content_digest(manifest.raw)
            folder, problem = claim_run_dir(cfg, digest, manifest.raw["partition"])
            error = ("run.out_dir", problem) if problem else None
        old = folder.old_config if error is None else None
        if error is None and budgets and old and old.run.steps != cfg.run.steps:
            budgets, error = privacy_plan(cfg, manifest, old.run.steps)  # the noise it began with
        found = (RunSetup(dataset_dir, manifest, fingerprints(cfg, digest), old,
                          folder.notes, budgets) if error is None else None, error)
    setup, error = world.bcast(found)
    if error:
        raise ConfigError(*error)
    for note in setup.notes:
        log(note)
    return setup, folder


def privacy_plan(cfg: JobConfig, manifest: Manifest, first_steps: int | None = None
                 ) -> tuple[list[ClientBudget] | None, tuple[str, str] | None]:
    """(every client's privacy budget, None) or (None, (key, problem)). ``first_steps``: a
    resumed run's steps as first started, which its calibrated noise was chosen for."""
    p = cfg.privacy
    samples = [manifest.counts[client_split(i)] for i in range(cfg.clients.count)]
    try:
        return plan(samples, cfg.data.batch_size, cfg.run.steps,
                    noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon,
                    delta=p.delta, calibration_steps=first_steps), None
    except ConfigError as exc:
        return None, (exc.key, exc.message)


def privacy_lines(cfg: JobConfig, budgets: list[ClientBudget]) -> list[str]:
    p = cfg.privacy
    return [f"privacy: DP-SGD on each client's private term: per-sample gradients clipped to "
            f"C={p.clip_norm:g}, Gaussian noise sigma x C, Poisson sampling of the private "
            f"batch (expected {cfg.data.batch_size}; the sampling the accountant assumes), "
            f"randomness {p.randomness}"
            + (" (keys in RUN_DIR/privacy/, never sent)" if p.randomness == "secret" else
               " (from run.seed: NO guarantee against anyone who knows it)")
            + f"; epsilon at delta {p.delta:g} from Opacus's RDP accountant"
            ] + [f"privacy: {b.describe()}" for b in budgets]


def verify_dataset(world: World, setup: RunSetup, log: Log) -> None:
    """Collective (``data.verify_shards``): every rank hashes its share of the shards."""
    checked, problems = verify_shards(setup.dataset_dir, setup.manifest.raw, world.rank,
                                      world.size)
    reports = world.allgather((checked, problems))
    problems = sorted({p for _, found in reports for p in found})
    if problems:
        raise ConfigError("data.verify_shards", f"{len(problems)} shard problem(s) in "
                          f"{setup.dataset_dir}: " + "; ".join(problems[:5]))
    log(f"data.verify_shards: {sum(n for n, _ in reports)} shards match their sha256")


def open_rank_data(cfg: JobConfig, world: World, setup: RunSetup, device: torch.device,
                   privacy: tuple[ClientBudget, int] | None = None) -> Data:
    """This rank's slice (client-local rank) of its client's streams, and the test stream on
    leaders. ``privacy``: (the client's budget, its key): Poisson sampling of its private
    stream."""
    poisson = ((privacy[0].sample_rate, seed_of(privacy[1], DP, DP_SAMPLING)) if privacy
               else None)
    return open_data(setup.dataset_dir, setup.manifest, cfg.data, client=world.client,
                     part=world.local_rank, num_parts=world.local_size, seed=cfg.run.seed,
                     leader=world.is_leader, probe=cfg.eval.probe, device=device,
                     poisson=poisson)


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
        return make_pool_targets(world, graph_at, cfg.client_archs(), build, settings)
    drop = ex.late_peers == "drop"
    exchange = ClientExchange(world, num_heads=model.num_heads - 1,  # the last head: no target
                              num_classes=data.num_classes,
                              batch_size=cfg.data.public_batch_size, top_k=ex.top_k,
                              embedding_dim=model.embedding_dim if send_embedding else 0,
                              timeout_s=ex.timeout_s, device=device,
                              late_deadline_s=ex.late_deadline_s if drop else None)
    return LiveTargets(world, graph_at, exchange, data.public, delta=delta, seed=seed,
                       send_embedding=send_embedding, drops_late=drop)


def build_client(cfg: JobConfig, world: World, data: Data, placement: Placement,
                 log: Log, privacy: tuple[ClientBudget, int] | None = None) -> Client:
    """Collective (intra-client backends start here): model, optimizer and communication.
    ``privacy``: (the client's budget, its key) for DP-SGD."""
    device = placement.device
    intra, why = make_intra(cfg.backend.intra, world, device, placement.gpus)
    mapping = placement.describe(why)
    decoding = data.loader in ("wds", "dali")  # memory, raw: no loader threads run
    for line in ([mapping] if mapping else []) + placement.cpu_lines(
            torch.get_num_threads(), cfg.data.loader_threads if decoding else 0):
        log(line)
    precision, why_precision = resolve_precision(cfg.backend.precision, device)
    layout = (torch.channels_last if resolve_channels_last(cfg.backend.channels_last, device)
              else torch.contiguous_format)
    log(f"{cfg.clients.count} clients on {cfg.num_ranks()} ranks ({_hosting_note(cfg)}), "
        f"method={cfg.method}, device {device.type}, loader "
        f"{data.loader}; {why}; {why_precision}, channels_last "
        f"{layout == torch.channels_last}")
    log(f"{data.private.num_samples} private samples on client 0, {data.public.num_samples} "
        f"public, {data.manifest.counts['test']} test, {data.num_classes} classes; run "
        f"folder {cfg.run.out_dir}")
    strategy = make_strategy(cfg.method, world, intra, total_steps=cfg.run.steps,
                             fedavg_every=cfg.fedavg.every,
                             fedmd_revisit_steps=cfg.fedmd.revisit_steps,
                             fedmd_weight=cfg.fedmd.weight,
                             separate_self_distill=cfg.separate.self_distill)
    torch.manual_seed(seed_of(cfg.run.seed, INIT, 0 if strategy.shared_init else world.client))
    shape = data.manifest.image_shape

    def build(arch: str) -> torch.nn.Module:
        return build_model(arch, data.num_classes, cfg.model.aux_heads, shape[0], shape[-1],
                           cfg.model.embedding_dim, cfg.model.norm).to(device,
                                                                       memory_format=layout)

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
    private = None
    if privacy:
        budget, key = privacy
        private = PrivateGradient(model, clip_norm=cfg.privacy.clip_norm,
                                  noise_multiplier=budget.noise_multiplier,
                                  expected_batch=cfg.data.batch_size, key=key, device=device)
    step = TrainStep(model, opt, strategy=strategy, source=source, distill=distill,
                     seed=cfg.run.seed, client=world.client, device=device, precision=precision,
                     overlap=cfg.exchange.overlap, private=private,
                     private_steps=privacy[0].private_steps if privacy else 0)
    return Client(model, opt, source, intra, strategy, step, graph_at, layout)


def resume(cfg: JobConfig, world: World, setup: RunSetup, client: Client,
           log: Log) -> tuple[int, ClientState]:
    """Collective: restart every client from the newest step all have intact (or start fresh
    from the leaders' weights)."""
    state = ClientState(cfg.run.out_dir, world, keep=cfg.run.keep_checkpoints,
                        fingerprints=setup.fingerprints, arch=cfg.client_archs()[world.client],
                        with_pool=isinstance(client.source, (PoolTargets, AsyncPoolTargets)),
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
    check's schedule (a run too short for its warm-ups or the check says so here)."""
    heads, dist = client.model.head_names, data.label_distribution()
    metrics = MetricsWriter(Path(cfg.run.out_dir) / "metrics.h5",
                            clients=[f"client{i}" for i in range(cfg.clients.count)],
                            heads=heads, label_distribution=dist,
                            fingerprint=setup.fingerprints[0], resume_step=start,
                            hop_distances=hops_at(client, start),
                            accept=setup.fingerprints[1:])
    health_from = (health_after(cfg.run.steps, cfg.eval.health_after, cfg.distill.warmup_steps,
                                cfg.optim.warmup_steps) if cfg.eval.health_check else None)
    distills = client.strategy.uses_public  # else no distillation term: no ramp
    note = short_run_note(cfg.run.steps, {**({"distill.warmup_steps": cfg.distill.warmup_steps}
                                              if distills else {}),
                                           "optim.warmup_steps": cfg.optim.warmup_steps},
                          health_from)
    if note:
        log(note)
    before = run_so_far(read_metrics(metrics.path)) if start else (0.0, 0.0)
    if start:
        log.continue_from(before[0])
    clients = [f"client{i}" for i in range(cfg.clients.count)]
    tb = (TensorBoard(Path(cfg.run.out_dir) / "tensorboard", start, clients)
          if cfg.run.tensorboard else None)
    return Recorder(metrics, log, total_steps=cfg.run.steps, heads=heads, distribution=dist,
                    health_from=health_from, start_step=start,
                    batch_sizes=(cfg.data.batch_size, cfg.data.public_batch_size),
                    tensorboard=tb, one_model=client.strategy.one_model, before=before,
                    privacy=setup.privacy)


def _hosting_note(cfg: JobConfig) -> str:
    if cfg.clients.per_rank > 1:
        return f"{cfg.clients.per_rank} clients per rank, stepped in turn"
    return f"ranks per client {cfg.client_ranks()}"


@dataclass
class Hosting:
    """What the clients hosted by one process share (``clients.per_rank > 1``): the stop
    signal (handlers live in the main thread) and the process's placement (its GPU, its CPUs)."""

    stop: StopSignal
    placement: Placement


def run(cfg: JobConfig, world: World, hosting: Hosting | None = None) -> int:
    """Train this rank's client (or, with ``hosting``, this hosted client); returns the process
    exit code. Whatever happens, the run releases what it holds (loaders, the run folder's
    lock, TensorBoard) on the way out; the collective shutdown of the intra-client backend only
    after a clean end (after an error the job is being aborted, and a collective would wait for
    ranks that are gone)."""
    log = Log(world.is_root)
    world.assign_clients(ClientLayout.contiguous(cfg.client_ranks()))
    torch.set_num_threads(cfg.run.threads or usable_cpus())  # 0: one per CPU the rank has
    stop = hosting.stop if hosting else StopSignal(announce=world.is_root)
    fault = Fault.for_rank(world.rank)
    with contextlib.ExitStack() as held:
        setup, folder = prepare_run(cfg, world, log)  # the root holds the folder's lock
        if folder:
            held.callback(folder.lock.release)
        if cfg.data.verify_shards:
            verify_dataset(world, setup, log)
        placement = (hosting.placement if hosting else  # DALI decodes there
                     place(cfg.backend.device, world.rank, world.allgather))
        device = placement.device
        privacy = None
        if setup.privacy:
            for line in privacy_lines(cfg, setup.privacy):
                log(line)
            key, _ = client_key(cfg.run.out_dir, world.client, cfg.privacy.randomness,
                                cfg.run.seed)
            privacy = (setup.privacy[world.client], key)
        data = open_rank_data(cfg, world, setup, device, privacy)
        held.callback(data.close)
        client = build_client(cfg, world, data, placement, log, privacy)
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
        # Clients at their own pace, or dropping late peers: nothing that runs every few steps
        # (log rows, evaluations) may wait for a late client; its rows are filled in later.
        at_own_pace = cfg.exchange.pool_async or cfg.exchange.late_peers == "drop"
        reports = make_reports(world, recorder, asynchronous=at_own_pace,
                               num_clients=cfg.clients.count,
                               hops_at=lambda step: hops_at(client, step),
                               timeout_s=cfg.exchange.timeout_s)
        vote = world.stop_vote(within_client=at_own_pace)
        return train(Session(cfg, world, log, device, data, client, state, reports, recorder,
                             stop, fault, vote), start)


def run_hosted(cfg: JobConfig, world: World) -> int:
    """``clients.per_rank > 1``: this process trains its clients, each with :func:`run` in a
    thread of its own over a hosted world (``distributed.hosted``), one at a time. A config
    error found by the clients is raised here, once; any other error aborts the job from the
    client's thread (``World.guard``). Returns the exit code (the clients agree on it)."""
    from mhd_hpc.distributed.hosted import HostedProcess

    hosting = Hosting(StopSignal(announce=world.is_root),
                      place(cfg.backend.device, world.rank, world.allgather))
    process = HostedProcess(world.comm, cfg.clients.per_rank)
    Log(world.is_root)(f"hosted clients: a wait for a peer also lasts while the other "
                       f"{cfg.clients.per_rank - 1} clients of its rank take their turns "
                       f"(evaluations and checkpoints included); exchange.timeout_s="
                       f"{cfg.exchange.timeout_s:g} and late_deadline_s count that time too")
    errors: list[ConfigError] = []

    def client(vrank: int) -> int:
        if hosting.placement.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(hosting.placement.device)
        hosted_world = World(process.world_comm(vrank))
        with hosted_world.guard():
            try:
                return run(cfg, hosted_world, hosting)
            except ConfigError as exc:  # every client reaches it: raised once, below
                errors.append(exc)
                return EXIT_CONFIG

    codes = process.run_clients(client)
    if errors:
        raise errors[0]
    process.close()
    return next((c for c in codes if c), 0)


def check_placement(cfg: JobConfig, world: World) -> int:
    """``--dry-run``: place every rank (GPU, CPUs), start the intra-client backends and log the
    mapping, then stop: nothing is trained and no dataset or run folder is touched. Run it with
    the allocation and launcher of the long job, to check the binding before spending it."""
    log = Log(world.is_root)
    hosted = cfg.clients.per_rank > 1  # then the ranks' placement is what the clients share
    world.assign_clients(ClientLayout.one_rank_per_client(world.size) if hosted
                         else ClientLayout.contiguous(cfg.client_ranks()))
    torch.set_num_threads(cfg.run.threads or usable_cpus())
    placement = place(cfg.backend.device, world.rank, world.allgather)
    intra, why = make_intra(cfg.backend.intra, world, placement.device, placement.gpus)
    log(f"{cfg.clients.count} clients on {world.size} ranks ({_hosting_note(cfg)}), device "
        f"{placement.device.type}; {why}")
    decoding = cfg.data.dataset == "shards"  # built-in datasets are served from memory
    for line in [placement.describe(why)] + placement.cpu_lines(
            torch.get_num_threads(), cfg.data.loader_threads if decoding else 0):
        if line:
            log(line)
    intra.shutdown()
    log("dry run: placement checked; nothing trained, no dataset or run folder touched")
    return 0

